"""When a model has seen too few steps for its settings (issue 28, wall 6): the rule ``ddad train`` warns by
and ``ddad test`` repeats, from what the training checkpoint records.

    warm-up   training stopped before the learning-rate warm-up ended (step < ``warmup_steps``): the rate
              never reached its setting
    steps     fewer steps than a model of its kind needs to reach its level (:data:`TRANSFORMER_MIN_STEPS`
              for DRDC's transformer base, whose loss has no fixed scale)
    loss      for a diffusion model trained on the mean epsilon-prediction error (DDAD's UNet, DRDC's refiner),
              the mean loss of the last tenth of the steps (at least 10) above :data:`SETTLED_EPS_LOSS`

Measured (BENCHMARKS.md, "When is a model trained enough?"; ``benchmarks/undertrained.py``): DDAD's default
recipe on KolektorSDD at 64 px grey, quality and loss at step marks of one run. The threshold sits where the
test figures stop moving: above it they were still far from their level at the run's end, below it within
the step-to-step noise. It is a statement about the training, not the data: a model under it may still be a
weak detector, and one above it is surely undertrained. DRDC's transformer base (BENCHMARKS.md, "Budget
curve"): its first measured point, 135 steps of batch 32 on the 13 categories, already had its figures at 270
steps within 0.007 (image AUROC) and 0.003 (pixel AUROC), and its loss had fallen by 33 % within the first
58 steps; nothing shorter was measured, so fewer steps than that are called undertrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

SETTLED_EPS_LOSS = 0.15  # mean epsilon-MSE of the last tenth of the steps (module docstring)
TRANSFORMER_MIN_STEPS = 135  # DRDC's transformer base (module docstring)
MIN_WINDOW = 10


@dataclass(frozen=True)
class Rule:
    """What a model of one kind needs beyond its warm-up: ``min_steps``, and its loss at or below
    ``settled_loss`` (None: its loss has no fixed scale)."""

    min_steps: int = 0
    settled_loss: float | None = None


def diffusion_rule(tc=None) -> Rule:
    """The rule of a diffusion model trained with the recipe ``tc`` (a :class:`ddad.engine.recipe.TrainConfig`;
    None: the mean epsilon-MSE always, as Eq. 10's inpainting objective): the settled loss only where the loss
    is the plain mean epsilon-MSE (not summed over pixels, not min-SNR weighted)."""
    plain = tc is None or (tc.loss_reduction == "mean" and tc.timestep_weighting == "uniform")
    return Rule(settled_loss=SETTLED_EPS_LOSS if plain else None)


def recent_loss(losses: Sequence[float]) -> float | None:
    """The mean of the last tenth of ``losses`` (at least :data:`MIN_WINDOW` of them); None without losses."""
    if not losses:
        return None
    window = max(MIN_WINDOW, len(losses) // 10)
    tail = list(losses)[-window:]
    return float(sum(tail) / len(tail))


def undertrained(step: int, warmup_steps: int, loss: float | None, rule: Rule | None = None,
                 name: str | None = None) -> str | None:
    """Why a model (``name``: which one, where a run trains several) trained ``step`` steps is undertrained by
    ``rule`` and its warm-up (module docstring), or None."""
    rule = rule or Rule()
    model = f"the {name} model" if name else "the model"
    if step < warmup_steps:
        return (f"{model} is undertrained: its {step} steps stopped inside the learning-rate warm-up "
                f"({warmup_steps} steps); train at least {warmup_steps} steps")
    if step < rule.min_steps:
        return (f"{model} is undertrained: {step} steps, fewer than the {rule.min_steps} a model of its kind needs "
                f"(BENCHMARKS.md, 'When is a model trained enough?'); continue it with ddad train --resume and a "
                f"larger --max-steps, --minutes or --epochs")
    if rule.settled_loss is not None and loss is not None and loss > rule.settled_loss:
        return (f"{model} is undertrained: the mean loss of its last steps is {loss:.3g}, above {rule.settled_loss:g} "
                f"(a diffusion model still far from its level: BENCHMARKS.md, 'When is a model trained enough?'); "
                f"continue it with ddad train --resume and a larger --max-steps, --minutes or --epochs")
    return None


def checkpoint_warning(record: dict, name: str | None = None) -> str | None:
    """:func:`undertrained` for a checkpoint's record (what the trainer stored with it; a checkpoint of an
    earlier version, without these facts, says nothing)."""
    if "warmup_steps" not in record:
        return None
    rule = Rule(int(record.get("min_steps") or 0), record.get("settled_loss"))
    return undertrained(int(record["step"]), int(record["warmup_steps"]), record.get("recent_loss"), rule, name)
