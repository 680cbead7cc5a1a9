"""The training engine: one loop for every method's trainable model.

A method gives a model factory and an objective (``draw`` the batch's random inputs from the epoch's
generator, then ``loss``; e.g. :class:`ddad.diffusion.objective.DDPMObjective`). The engine owns the rest:
the seeded data order, optimizer, learning-rate warm-up, gradient clipping, the exponential moving average
of the weights, step and time budgets, atomic checkpoints and exact resumption.

The settings and the parts of a step (optimizer, warm-up, EMA) are in :mod:`ddad.engine.recipe`.

Nothing is lost on interruption: SIGINT (Ctrl-C) or SIGTERM lets the current step finish, saves a
checkpoint there and returns (``stopped_by="interrupted"``; a second signal stops at once), and a checkpoint
is also written every ``checkpoint_minutes`` of training (each replacing the previous one of its kind).

Training is deterministic given the seed: the data order and random draws of epoch e come from a
generator seeded with (seed, e), so resuming from the checkpoint of epoch e continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import copy
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from ..checkpoint import Checkpoint, save_checkpoint
from ..runs import RunDir
from ..runtime import autocast, resolve_device
from .distributed import context
from .interruption import StopSignals, rng_state, set_rng_state
from .memory import require_step_fits
from .undertraining import Rule, recent_loss, undertrained
from .recipe import TrainConfig, ema_decay_at, ema_update, epoch_seed, learning_rate, make_optimizer


@dataclass
class TrainResult:
    epochs_done: int
    last_loss: float
    checkpoint: str
    images_per_second: float
    steps_done: int = 0
    stopped_by: str = "epochs"  # epochs | max_steps | max_minutes | interrupted
    warning: str | None = None  # why it is undertrained, a line per model (:mod:`ddad.engine.undertraining`)


StepHook = Callable[[int, int, float], None]  # (epoch, global step, loss)
clock = time.perf_counter  # the training-time clock (a module attribute, so tests can control it)


class Objective(Protocol):
    """What a method trains against: its batch's random draws, then the loss (see module docstring)."""

    def draw(self, n: int, sample_shape: Sequence[int], generator: torch.Generator) -> tuple[torch.Tensor, ...]: ...

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor: ...


def as_float_images(batch: torch.Tensor) -> torch.Tensor:
    """Training images as float in [-1, 1]: float tensors pass through, uint8 ones (0..255) are scaled."""
    if batch.dtype == torch.uint8:
        return batch.float() / 127.5 - 1.0
    return batch


def fit(
    run: RunDir,
    tc: TrainConfig,
    build_model: Callable[[], torch.nn.Module],
    build_objective: Callable[[torch.device], Objective],
    images: torch.Tensor,
    info: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: StepHook | None = None,
    started: float | None = None,
    label: str | None = None,
    rule: Rule | None = None,
) -> TrainResult:
    """Train the model of ``build_model`` on ``images`` (N, ...; float in [-1, 1], or uint8) into ``run``.

    With ``resume``, continue from the run's latest checkpoint (weights, EMA, optimizer, epoch and the
    step inside it), exactly as an uninterrupted run would. Training ends after ``tc.epochs``, or
    earlier at ``tc.max_steps`` / ``tc.max_minutes`` (saved, and resumable with a larger budget).
    ``info`` is stored in every checkpoint (e.g. the run's config). ``started`` (a :data:`clock` reading,
    default this call) is when this session's time began: ``tc.max_minutes`` counts from it, setup included
    (loading images, building the model, the memory check), as a user's ``--minutes`` counts from the command.
    ``label`` names the model on the progress bar (default the run part's name: DRDC's ``refine``). ``rule``:
    what a trained model of this kind has reached (steps, loss; :mod:`ddad.engine.undertraining`; None: the
    warm-up only); a model short of it is logged and returned with a ``warning``."""
    from tqdm.auto import tqdm

    device = resolve_device(tc.device)
    ctx = context(device.type)  # a single process, or this rank of a torchrun job
    device = ctx.device(device)
    if ctx.distributed and tc.batch_size % ctx.world_size:
        raise ValueError(f"the global batch size {tc.batch_size} is not divisible by the world size "
                         f"{ctx.world_size}: choose a batch size that is, or another number of processes")
    log = run.log if ctx.is_main else (lambda message: None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)  # initial weights follow the seed, without touching the caller's RNG
        model = build_model()
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    ema = None
    if tc.ema_decay > 0:
        ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, tc, device)
    objective = build_objective(device)
    forward = model  # what the objective calls: the model, or its DDP wrapper that averages gradients
    if ctx.distributed:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    start_epoch, step, trained_s = 0, 0, 0.0
    losses: list[float] = []  # this session's, for the undertraining rule
    rule = rule or Rule()
    resumed_loss = None
    last_path: Path | None = None
    resumed_rng: dict[str, torch.Tensor] | None = None
    if resume:
        path = run.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"--resume: run {run.root} has no checkpoint to resume from")
        ckpt = Checkpoint(path)
        model.load_state_dict(ckpt.state_dict("model"))
        if ema is not None:
            ema.load_state_dict(ckpt.state_dict("ema") if ckpt.has("ema") else ckpt.state_dict("model"))
        opt_state = ckpt.optimizer_state()
        if opt_state is None:
            raise ValueError(f"checkpoint {path} holds no optimizer state and cannot be resumed")
        optimizer.load_state_dict(opt_state)
        start_epoch, step = int(ckpt.info["epoch"]), int(ckpt.info["step"])
        trained_s = float(ckpt.info.get("train_seconds", 0.0))
        last_path = path
        resumed_rng = ckpt.state_dict("rng") if ckpt.has("rng") else None
        resumed_loss = ckpt.info.get("recent_loss")
        log(f"resumed from {path.name} (epoch {start_epoch}, step {step}); world size {ctx.world_size}, "
            f"backend {ctx.backend}")
    else:
        log(f"training started: {len(images)} images, device {device}, precision {tc.precision}; world size "
            f"{ctx.world_size}, backend {ctx.backend}")

    n = images.shape[0]
    batch = min(tc.batch_size, n)
    steps_per_epoch = -(-n // batch)
    skip_batches = step - start_epoch * steps_per_epoch  # > 0 when resuming from a mid-epoch checkpoint
    if not 0 <= skip_batches < steps_per_epoch:
        raise ValueError(f"checkpoint step {step} does not fit epoch {start_epoch} of {steps_per_epoch} steps; "
                         f"was the batch size or the training set changed?")
    images_cpu = images.contiguous()
    model.train()
    require_step_fits(model, objective, as_float_images(images_cpu[:1]), -(-batch // ctx.world_size), device, ctx)
    data_on_device = images_cpu.to(device) if device.type == "cuda" else images_cpu
    last_loss = float("nan")
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    marks = set(tc.checkpoint_steps)
    stop: str | None = None  # why training ends early: max_steps | max_minutes | interrupted
    if tc.max_minutes is not None and trained_s >= 60 * tc.max_minutes:
        stop = "max_minutes"  # resumed with its time budget already spent: nothing to train
    elif step >= total_steps and step < tc.epochs * steps_per_epoch:
        stop = "max_steps"

    timed: Path | None = None  # the last checkpoint written only because time had passed

    def save(epoch_done: int, mid_epoch: bool, by_time: bool = False) -> Path:
        # Step marks, budget ends and interruptions carry their step in the name, so pruning never removes them.
        nonlocal timed, last_save
        named = mid_epoch or step in marks or stop is not None
        path = run.checkpoint_path(epoch_done, step if named else None)
        modules = {"model": model} if ema is None else {"model": model, "ema": ema}
        modules["rng"] = rng_state(device)  # dropout's generator: a mid-epoch resume continues it exactly
        record = {"epoch": epoch_done, "step": step, "train_seconds": trained_s + clock() - t_start,
                  "recent_loss": recent_loss(losses) if losses else resumed_loss, "warmup_steps": tc.warmup_steps,
                  "min_steps": rule.min_steps, "settled_loss": rule.settled_loss, **(info or {})}
        if ctx.is_main:
            save_checkpoint(path, modules, record, optimizer)
        if timed is not None and timed != path:
            timed.unlink(missing_ok=True)  # superseded
        timed = path if by_time and mid_epoch and step not in marks else None
        last_save = clock()
        return path

    # With a time budget the bar counts training seconds, so its total and ETA are the budget's.
    budget_s = None if tc.max_minutes is None else max(60 * tc.max_minutes - trained_s, 0.0)
    bar = tqdm(total=max(total_steps - step, 0) if budget_s is None else round(budget_s),
               desc=" ".join(["train", *filter(None, [label or run.part])]),
               unit="step" if budget_s is None else "s", disable=not progress or not ctx.is_main, dynamic_ncols=True)
    t_start = clock() if started is None else min(started, clock())  # this session's time: setup included
    t_loop, seen = clock(), 0
    shown = 0.0  # training seconds the time bar has shown
    last_save = t_loop
    signals = StopSignals().install()
    try:
        for epoch in range(start_epoch, tc.epochs):
            if stop or step >= total_steps:
                break
            gen = torch.Generator().manual_seed(epoch_seed(tc.seed, epoch))
            torch.manual_seed(epoch_seed(tc.seed, epoch) + 1)  # dropout
            if skip_batches and resumed_rng is not None:  # resumed mid-epoch: dropout's state at that step
                set_rng_state(resumed_rng, device)
            perm = torch.randperm(n, generator=gen)
            epoch_loss, t_epoch, done_in_epoch = 0.0, clock(), 0
            for b in range(steps_per_epoch):
                idx = perm[b * batch:(b + 1) * batch]
                draws = objective.draw(len(idx), images.shape[1:], gen)  # drawn for skipped batches too
                if b < skip_batches:  # resumed mid-epoch: trained before the checkpoint
                    continue
                share = 1.0
                if ctx.distributed:  # this rank's part of the global batch and of its draws
                    part = ctx.shard(len(idx))
                    draws = tuple(d[part] if d.ndim and d.shape[0] == len(idx) else d for d in draws)
                    share = (part.stop - part.start) * ctx.world_size / len(idx)  # DDP's mean = the batch mean
                    idx = idx[part]
                x0 = as_float_images(data_on_device[idx.to(data_on_device.device)]).contiguous(
                    memory_format=memory_format)
                draws = tuple(d.to(device) for d in draws)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(tc, step, epoch)
                with autocast(device, tc.precision):
                    loss = objective.loss(forward, x0, draws)
                    if share != 1.0:
                        loss = loss * share
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema_update(ema, model, ema_decay_at(step, tc.ema_decay))
                step += 1
                done_in_epoch += 1
                last_loss = loss.item()
                epoch_loss += last_loss
                losses.append(last_loss)
                seen += len(idx)
                rate = seen / max(clock() - t_loop, 1e-9)
                if budget_s is None:
                    bar.update(1)
                else:
                    elapsed = min(clock() - t_start, budget_s)
                    bar.update(round(elapsed) - round(shown))
                    shown = elapsed
                bar.set_postfix(epoch=f"{epoch + 1}/{tc.epochs}", step=step, loss=f"{last_loss:.4g}",
                                img_s=f"{rate:.1f}")
                if on_step is not None:
                    on_step(epoch, step, last_loss)
                end_of_epoch = b == steps_per_epoch - 1
                signalled, out_of_time = ctx.any(signals.received is not None, tc.max_minutes is not None and
                                                 trained_s + clock() - t_start >= 60 * tc.max_minutes)  # any rank's
                stop = ("interrupted" if signalled else "max_minutes" if out_of_time else
                        "max_steps" if tc.max_steps is not None and step >= tc.max_steps else stop)
                time_due = tc.checkpoint_minutes is not None and clock() - last_save >= 60 * tc.checkpoint_minutes
                if not end_of_epoch and (stop or step in marks or time_due):
                    last_path = save(epoch, mid_epoch=True, by_time=time_due and not stop and step not in marks)
                if stop:
                    break
            skip_batches = 0
            if step == (epoch + 1) * steps_per_epoch:  # the epoch is complete
                done = epoch + 1
                log(f"epoch {done} step {step} loss {epoch_loss / max(done_in_epoch, 1):.6g} "
                        f"({done_in_epoch * batch / max(clock() - t_epoch, 1e-9):.2f} img/s)")
                time_due = tc.checkpoint_minutes is not None and clock() - last_save >= 60 * tc.checkpoint_minutes
                if done % tc.checkpoint_every == 0 or done == tc.epochs or step in marks or stop or time_due:
                    last_path = save(done, mid_epoch=False)
                    if ctx.is_main:
                        _prune(run, tc.keep_checkpoints)
            if stop:
                break
    except KeyboardInterrupt:
        bar.close()
        where = f"the checkpoint {last_path}" if last_path else "no checkpoint yet"
        log(f"interrupted; last saved: {where}")
        raise
    finally:
        signals.restore()
    bar.close()
    ctx.barrier()  # rank 0 has written its last checkpoint before any rank returns
    if stop == "interrupted":
        name = signal.Signals(signals.received).name if signals.received else "a stop signal on another rank"
        log(f"{name} received: saved {last_path} at step {step}")
    rate = seen / max(clock() - t_loop, 1e-9)
    epochs_done = step // steps_per_epoch
    stopped_by = stop or "epochs"
    log(f"training stopped ({stopped_by}) at step {step}, epoch {epochs_done} ({rate:.2f} img/s)")
    warning = undertrained(step, tc.warmup_steps, recent_loss(losses) if losses else resumed_loss, rule,
                           label or run.part) if ctx.is_main else None  # said once, by rank 0
    if warning:
        log(f"warning: {warning}")
    return TrainResult(epochs_done, last_loss, str(last_path), rate, step, stopped_by, warning)


def _prune(run: RunDir, keep: int) -> None:
    """Keep the newest ``keep`` end-of-epoch checkpoints; mid-epoch (step-mark) checkpoints are kept."""
    if keep <= 0:
        return
    ends = [path for _, path in run.checkpoints() if "-step-" not in path.name]
    for path in ends[:-keep]:
        path.unlink(missing_ok=True)
