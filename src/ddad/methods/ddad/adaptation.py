"""Domain adaptation of the feature extractor (paper Sec. 4.4, Eq. 10, App. 7 and 10.2).

Each batch of defect-free training images is split in two halves: inputs x and targets y. x is noised
to T'_DA and denoised by the trained UNet conditioned on y (Alg. 1, w_DA), giving x0 ~ y. The
extractor phi is fine-tuned so that x0 and y look alike, while a distillation term keeps it close to
the frozen pretrained copy phibar:

    L_DA = sum_j (1 - cos(phi_j(x0), phi_j(y)))
         + lambda_DL sum_j (1 - cos(phi_j(y),  phibar_j(y)))
         + lambda_DL sum_j (1 - cos(phi_j(x0), phibar_j(x0)))                        (Eq. 10)

with j over stages J = {1, 2, 3}; each cosine compares a sample's whole flattened feature map, and
is averaged over the batch. BatchNorm layers keep their ImageNet running statistics unless
``train_batchnorm`` (the authors' choice, kept by ``--recipe paper``). phibar is a deep copy taken
before adaptation: ``requires_grad`` off, evaluated under ``torch.no_grad``, never given to the
optimizer, so it stores no gradient and costs no optimizer state. AdamW, lr 1e-4. A checkpoint of the
adapted extractor is written atomically after every epoch, and adaptation resumes from the last one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ...backbones import FeatureExtractor, create_backbone
from ...checkpoint import Checkpoint, save_checkpoint
from ...engine.recipe import epoch_seed
from ...runs import RunDir
from ...runtime import autocast, resolve_device
from .detector import Detector
from .extractors import adapted_checkpoints, adapted_dir
from .loading import load_unet
from ...engine.recipe import check_trained_timestep
from .settings import DDADConfig


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos between each sample's flattened feature maps."""
    return (1.0 - F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)).mean()


@dataclass
class AdaptLoss:
    total: torch.Tensor
    similarity: torch.Tensor  # sum_j 1 - cos(phi(x0), phi(y))
    distill_target: torch.Tensor  # sum_j 1 - cos(phi(y), phibar(y))
    distill_recon: torch.Tensor  # sum_j 1 - cos(phi(x0), phibar(x0))


def adaptation_loss(
    phi: FeatureExtractor, phibar: FeatureExtractor, x0: torch.Tensor, y: torch.Tensor,
    layers: Sequence[int], lambda_dl: float,
) -> AdaptLoss:
    """Eq. 10 for one batch; gradients flow into ``phi`` only."""
    n = x0.shape[0]
    feats = phi(torch.cat([x0, y]), layers)
    f_x0, f_y = [f[:n] for f in feats], [f[n:] for f in feats]
    with torch.no_grad():
        frozen = phibar(torch.cat([x0, y]), layers)
    fb_x0, fb_y = [f[:n] for f in frozen], [f[n:] for f in frozen]
    sim = sum(cosine_distance(a, b) for a, b in zip(f_x0, f_y))
    d_y = sum(cosine_distance(a, b) for a, b in zip(f_y, fb_y))
    d_x0 = sum(cosine_distance(a, b) for a, b in zip(f_x0, fb_x0))
    return AdaptLoss(sim + lambda_dl * (d_y + d_x0), sim, d_y, d_x0)


def frozen_copy(extractor: FeatureExtractor) -> FeatureExtractor:
    """phibar: a copy that is in eval mode and can never receive a gradient."""
    copy_ = copy.deepcopy(extractor).eval()
    copy_.requires_grad_(False)
    return copy_


StepHook = Callable[[int, int, AdaptLoss], None]


def adapt(
    run: RunDir,
    config: DDADConfig,
    images: torch.Tensor,
    resume: bool = True,
    progress: bool = True,
    on_step: StepHook | None = None,
) -> list[dict]:
    """Fine-tune the run's backbone on ``images`` (defect-free, N x C x H x W in [-1, 1]).

    Returns one record per epoch done now (the mean of each loss term)."""
    from tqdm.auto import tqdm

    ac = config.adapt
    detect = config.detect
    if ac.epochs < 1:
        raise ValueError("adapt.epochs is 0: nothing to do (pass --epochs N)")
    device = resolve_device(config.runtime.device)
    # The same conditioned sampler as detection, with the adaptation's T'_DA / w_DA (no extractor needed).
    recon_cfg = replace(detect, sampler=ac.sampler, scoring=replace(detect.scoring, mode="pixel"))
    check_trained_timestep(config.train, ac.sampler.start_step, detect.force_timestep, what="adapt")
    reconstructor = Detector(load_unet(run, config.model, device, config.weights), recon_cfg, config.schedule,
                             runtime=config.runtime, device=device)
    layers = tuple(sorted(set(ac.layers) | set(detect.scoring.feature_layers)))
    phi = create_backbone(detect.backbone, layers, config.weights.backbone_weights,
                          config.runtime.allow_download).to(device)
    phibar = frozen_copy(phi)
    optimizer = torch.optim.AdamW(phi.parameters(), lr=ac.lr, weight_decay=ac.weight_decay)
    start = 0
    done = adapted_checkpoints(run)
    if resume and done:
        ckpt = Checkpoint(done[-1][1])
        phi.load_state_dict(ckpt.state_dict("extractor"))  # phibar stays the pretrained weights
        optimizer.load_state_dict(ckpt.optimizer_state())
        start = int(ckpt.info["epoch"])
        run.log(f"adaptation resumed from epoch {start}")
    elif done:
        raise ValueError(f"run {run.root} already has an adapted extractor; resume it or delete {adapted_dir(run)}")

    n = images.shape[0]
    half = ac.batch_size // 2
    if n < 2:
        raise ValueError("domain adaptation needs at least 2 training images")
    half = min(half, n // 2)
    steps = n // (2 * half)
    records = []
    bar = tqdm(total=(ac.epochs - start) * steps, desc="adapt", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(start, ac.epochs):
        gen = torch.Generator().manual_seed(epoch_seed(ac.seed, epoch))
        perm = torch.randperm(n, generator=gen)
        phi.train(ac.train_batchnorm)
        sums = {"total": 0.0, "similarity": 0.0, "distill_target": 0.0, "distill_recon": 0.0}
        t0 = time.perf_counter()
        for b in range(steps):
            idx = perm[b * 2 * half:(b + 1) * 2 * half]
            x, y = images[idx[:half]].to(device), images[idx[half:]].to(device)
            seeds = torch.randint(0, 2**62, (half,), generator=gen).tolist()
            x0 = reconstructor.reconstruct(x, seeds, target=y).clone()  # clone: a normal tensor for autograd
            with autocast(device, detect.precision):
                loss = adaptation_loss(phi, phibar, x0, y, ac.layers, ac.lambda_dl)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            for k in sums:
                sums[k] += getattr(loss, k).item()
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{ac.epochs}", sim=f"{loss.similarity.item():.4f}",
                            dl_y=f"{loss.distill_target.item():.4f}", dl_x0=f"{loss.distill_recon.item():.4f}")
            if on_step is not None:
                on_step(epoch, b, loss)
        record = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()},
                  "seconds": time.perf_counter() - t0}
        records.append(record)
        run.log("adapt epoch {epoch} loss {total:.5g} (similarity {similarity:.5g}, distill y {distill_target:.5g}, "
                "distill x0 {distill_recon:.5g})".format(**record))
        save_checkpoint(adapted_dir(run) / f"epoch-{epoch + 1:03d}.safetensors",
                        {"extractor": phi},
                        {"epoch": epoch + 1, "backbone": detect.backbone, "layers": list(layers),
                         "adapt": ac.to_dict()}, optimizer)
    bar.close()
    return records

