"""Issue 28, wall 1: a training step that would not fit in memory is refused before it starts, with the numbers
and a batch size that fits; the estimate is checked against exact counts and a real step's memory."""

from __future__ import annotations

import re
import subprocess
import sys

import torch
from torch import nn

from ddad.cli import main
from ddad.engine.memory import StepMemory, step_memory


def test_the_step_estimate_counts_each_saved_activation_once_and_the_parameters_apart():
    b, n_in, hidden, n_out = 32, 100, 200, 10
    model = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
    loss = lambda m, x, draws: m(x).square().mean()  # noqa: E731
    need = step_memory(model, loss, torch.randn(b, n_in), ())
    # saved for backward: the input (first weight's gradient), ReLU's output (its own backward and the second
    # weight's gradient: one storage), the output (square's backward); the weights are counted apart
    assert need.activations == 4 * b * (n_in + hidden + n_out)
    assert need.parameters == 4 * (n_in * hidden + hidden + hidden * n_out + n_out)
    assert need.total == need.activations + 4 * need.parameters
    half = StepMemory(need.activations, need.parameters, b)
    per_image = need.activations / b
    room = 10 * 2**20
    assert half.largest_batch(room) == int((0.8 * room - 4 * need.parameters) // per_image)


REAL_STEP = """
import torch
from ddad.diffusion.unet import UNet, UNetConfig
from ddad.engine.memory import step_memory

def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field))

torch.manual_seed(0)
model = UNet(UNetConfig.preset("compact", 64, 3))
opt = torch.optim.AdamW(model.parameters(), 1e-3)
x, t = torch.randn(8, 3, 64, 64), torch.randint(0, 1000, (8,))
loss = lambda m, x, d: m(x, d[0]).square().mean()
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # the peak (VmHWM) starts again from now
loss(model, x, (t,)).backward()
opt.step()
after = status("VmHWM:")
opt.zero_grad(set_to_none=True)
need = step_memory(model, loss, x, (t,))
print(need.total, after - before)
"""


def test_the_estimate_is_near_a_real_steps_memory():
    out = subprocess.run([sys.executable, "-c", REAL_STEP], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    estimated, measured = map(int, out.stdout.split())
    assert 0.7 * measured <= estimated <= 1.5 * measured, (estimated, measured)


def test_a_training_that_would_not_fit_stops_before_its_first_step_with_a_batch_that_fits(synth_root, tmp_path,
                                                                                         monkeypatch, capsys):
    from ddad.engine import memory

    def train(run, batch):
        return main(["train", "--data-root", str(synth_root), "--category", "washer", "--model", "tiny",
                     "--image-size", "32", "--max-steps", "1", "--batch-size", str(batch), "--val-ratio", "0",
                     "--backbone-weights", "random", "--quiet", "--run-dir", str(run)])

    monkeypatch.setattr(memory, "available_memory", lambda device: 60 * 2**20)  # 60 MB left
    capsys.readouterr()
    assert train(tmp_path / "big", 16) == 2
    err = capsys.readouterr().err
    assert "one training step needs about" in err and "of the 0.1 GB available on cpu" in err
    fits = int(re.search(r"--batch-size (\d+) fits", err).group(1))
    assert 0 < fits < 16
    assert not list((tmp_path / "big" / "checkpoints").glob("*.safetensors"))  # nothing trained
    assert train(tmp_path / "fits", fits) == 0  # the suggested batch passes the same check and trains
    monkeypatch.setattr(memory, "available_memory", lambda device: None)  # unknown: no check
    assert train(tmp_path / "unknown", 16) == 0
