"""Training-loop speed of one source tree: 60 optimizer steps of the tiny UNet at 32 px on random images
(the demo's model and batch). Run it alternately on two trees to compare versions:

    python benchmarks/train_ab.py OLD_CHECKOUT/src ; python benchmarks/train_ab.py src

Works with ddad 0.1 (``ddad.training.train``) and 0.2 (``DDAD().fit``).
"""

from __future__ import annotations

import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "src").resolve()
    sys.path.insert(0, str(src))
    import torch

    from ddad.data.formats import DataConfig
    from ddad.diffusion.unet import UNetConfig
    from ddad.runs import RunDir

    if (src / "ddad" / "methods").is_dir():
        from ddad import DDADConfig as Settings
        from ddad.engine.recipe import TrainConfig
        from ddad.methods.ddad import DDAD

        fit = DDAD().fit
    else:
        Settings = importlib.import_module("ddad.config").RunConfig
        training = importlib.import_module("ddad.training")
        TrainConfig, fit = training.TrainConfig, training.train
    config = Settings(data=DataConfig(root="x", category="y", image_size=32), model=UNetConfig.tiny(32, 3),
                      train=TrainConfig(epochs=20, batch_size=16, checkpoint_every=1000))
    images = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    folder = Path(tempfile.mkdtemp())
    try:
        run = RunDir(folder)
        run.save_config(config)
        t0 = time.perf_counter()
        fit(run, config, images, progress=False)
        print(f"{src}: {time.perf_counter() - t0:.2f} s for 60 steps ({torch.get_num_threads()} threads)")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
