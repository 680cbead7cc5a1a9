"""Will a training step fit in memory? Measured before the first step, not found out by the system's
out-of-memory killer two minutes later (issue 28, wall 1).

    step bytes = activations saved for the backward pass by one forward of the batch
                 + 4 x the parameters (weights, gradients, and the optimizer's two moments)

The activations are measured, not guessed: the objective's loss runs once on fake tensors
(``torch._subclasses.FakeTensorMode``: shapes and dtypes, no data, no arithmetic), and every distinct
storage the autograd graph saves is counted (``torch.autograd.graph.saved_tensors_hooks``), parameters
apart. A loss that branches on a draw's value (DRDC's jitter coin) cannot run on fake tensors: such a step
is trained unchecked (DRDC's token features are small; its refiner's UNet is checked). On this machine's
UNets the estimate was within 5 % of the measured growth of the process's peak memory over one real step (compact at 64 px, batch 16: 0.70 GB estimated, 0.72 GB measured; DDAD-S at 128 px,
batch 4: 0.89 / 0.91 GB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from ..config import ConfigError

# the share of the available memory a step may take: the data, the moving average and the allocator need room
USABLE_SHARE = 0.8


@dataclass(frozen=True)
class StepMemory:
    activations: int  # bytes saved for the backward pass by one step's batch
    parameters: int  # bytes of the trained parameters (counted four times: weights, gradients, two moments)
    batch: int
    fixed: int = 0  # the part of ``activations`` that does not grow with the batch (measured at batch 1)

    @property
    def total(self) -> int:
        return self.activations + 4 * self.parameters

    def largest_batch(self, available: int) -> int:
        """The largest batch whose step fits in :data:`USABLE_SHARE` of ``available`` bytes (0: none), the
        activations taken as ``fixed`` + a per-image share."""
        per_image = (self.activations - self.fixed) / max(self.batch, 1)
        room = USABLE_SHARE * available - 4 * self.parameters - self.fixed
        return max(0, int(room // per_image)) if per_image > 0 else self.batch


def available_memory(device: torch.device) -> int | None:
    """Bytes this process may still take: the GPU's free memory, or the system's MemAvailable (Linux);
    None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def step_memory(model: nn.Module, loss: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor],
                batch: torch.Tensor, draws: Any) -> StepMemory:
    """The memory of one training step of ``model`` on ``batch`` (real tensors, any device), measured on fake
    tensors: ``loss(model, batch, draws)`` runs once without arithmetic."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    params = [p for p in model.parameters() if p.requires_grad]
    saved: dict[int, int] = {}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(p) for p in params]  # kept alive: a freed storage's address is reused
        own = {f.untyped_storage()._cdata for f in fakes}

        kept: list[torch.Tensor] = []  # every saved tensor stays alive until counted, for the same reason

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage._cdata not in own:
                saved.setdefault(storage._cdata, storage.nbytes())
            kept.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss(model, mode.from_tensor(batch), draws)
    return StepMemory(sum(saved.values()), sum(p.numel() * p.element_size() for p in params), int(batch.shape[0]))


def require_step_fits(model: nn.Module, objective, sample: torch.Tensor, batch_size: int, device: torch.device,
                      ctx=None) -> None:
    """A :class:`ConfigError` with the numbers and a batch size that fits, where one training step of
    ``batch_size`` images like ``sample`` (1, ...) (``objective``: the trainer's, with ``draw`` and ``loss``;
    ``ctx``: the torchrun context, each rank training its share) would take more than :data:`USABLE_SHARE` of
    the memory available now. Nothing is checked where the memory or the measurement is unavailable. The
    caller's random state is left as it was."""
    available = available_memory(device)
    if available is None:
        return
    world_size = 1 if ctx is None else ctx.world_size
    batch = sample.expand(batch_size, *sample.shape[1:])
    try:
        with torch.random.fork_rng(devices=[]):
            draws = objective.draw(len(batch), batch.shape[1:], torch.Generator().manual_seed(0))
            need = step_memory(model, objective.loss, batch, tuple(d.to(device) for d in draws))
            if need.total > USABLE_SHARE * available and len(batch) > 1:  # the part that does not grow with it
                firsts = tuple((d[:1] if d.ndim and d.shape[0] == len(batch) else d).to(device) for d in draws)
                one = step_memory(model, objective.loss, batch[:1], firsts)
                slope = (need.activations - one.activations) / (len(batch) - 1)
                need = replace(need, fixed=max(0, int(one.activations - slope)))
    except Exception:  # noqa: BLE001 - an op fake tensors cannot run: train unchecked rather than refuse
        return
    if need.total <= USABLE_SHARE * available:
        return
    gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731
    fits = need.largest_batch(available) * world_size
    raise ConfigError(
        f"one training step needs about {gb(need.total)} ({gb(need.activations)} of activations for a batch of "
        f"{need.batch} images of {'x'.join(map(str, batch.shape[1:]))}, {gb(4 * need.parameters)} of weights, "
        f"gradients and optimizer state), more than {USABLE_SHARE:.0%} of the {gb(available)} available on "
        f"{device.type}. " + (f"--batch-size {fits} fits (or a smaller --image-size or model)" if fits else
                              "Not even one image fits: choose a smaller --image-size or model"))
