"""Issue 28, wall 6: an undertrained model says so, at the end of its training and whenever it is tested, by
the stated rule (:mod:`ddad.engine.undertraining`)."""

from __future__ import annotations

import json

import pytest

from ddad.checkpoint import Checkpoint
from ddad.cli import main
from ddad.engine import undertraining
from ddad.runs import RunDir

from .test_training import images, tiny_config, train


def test_recent_loss_is_the_mean_of_the_last_tenth_and_at_least_ten():
    losses = [float(i) for i in range(1, 251)]  # 250 steps: the last 25
    assert undertraining.recent_loss(losses) == pytest.approx(sum(range(226, 251)) / 25)
    assert undertraining.recent_loss(losses[:40]) == pytest.approx(sum(range(31, 41)) / 10)  # window 10
    assert undertraining.recent_loss([2.0, 4.0]) == 3.0 and undertraining.recent_loss([]) is None


def test_the_rule_warm_up_then_steps_then_settled_loss():
    Rule, rule = undertraining.Rule, undertraining.undertrained
    assert "warm-up" in rule(99, 100, 0.01, Rule(settled_loss=0.15))
    assert rule(100, 100, 0.15, Rule(settled_loss=0.15)) is None  # at the threshold: settled
    assert "0.151" in rule(100, 100, 0.151, Rule(settled_loss=0.15))
    assert rule(100, 100, 5.0, Rule()) is None  # no loss rule for this kind of model
    assert "fewer than the 135" in rule(134, 0, None, Rule(min_steps=135)) and rule(135, 0, None, Rule(135)) is None
    assert "refiner" in rule(3, 100, None, None, "refiner")
    assert undertraining.diffusion_rule(None).settled_loss == undertraining.SETTLED_EPS_LOSS
    from ddad.engine.recipe import TrainConfig

    assert undertraining.diffusion_rule(TrainConfig(loss_reduction="sum")).settled_loss is None


def test_training_and_testing_say_when_the_loss_has_not_settled(tmp_path, monkeypatch):
    """Past the warm-up (0 steps here), the rule is the mean of the last 10 step losses (all of them after 6
    steps; reported by the training loop itself) against the settled loss: patched to sit above, then below."""
    seen = []
    cfg = tiny_config(epochs=3, every=1)  # 10 images, batch 4: 3 steps an epoch
    cfg = cfg.replace(train=cfg.train.__class__(**{**cfg.train.__dict__, "warmup_steps": 0, "max_steps": 6}))
    monkeypatch.setattr(undertraining, "SETTLED_EPS_LOSS", 1e3)
    result = train(RunDir(tmp_path / "a"), cfg, images(10), progress=False,
                   on_step=lambda e, s, loss: seen.append(loss))
    assert result.warning is None and len(seen) == 6
    info = Checkpoint(RunDir(tmp_path / "a").latest_checkpoint()).info
    assert info["recent_loss"] == pytest.approx(sum(seen) / 6) and info["settled_loss"] == 1e3
    monkeypatch.setattr(undertraining, "SETTLED_EPS_LOSS", 1e-6)
    result = train(RunDir(tmp_path / "b"), cfg, images(10), progress=False)
    assert result.warning and f"{sum(seen) / 6:.3g}" in result.warning and "above 1e-06" in result.warning


def test_a_run_stopped_in_its_warm_up_warns_at_train_and_at_test(synth_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(synth_root), "--category", "washer", "--model", "tiny", "--image-size",
                 "16", "--max-steps", "3", "--batch-size", "4", "--backbone-weights", "random", "--quiet",
                 "--run-dir", str(run)]) == 0
    err = capsys.readouterr().err
    assert "warning: the model is undertrained: its 3 steps stopped inside the learning-rate warm-up (100 steps)" in err
    assert "undertrained" in (run / "train.log").read_text()
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0
    assert "undertrained: its 3 steps" in capsys.readouterr().err
    info = json.loads((run / "test" / "metrics.json").read_text())
    assert len(info["undertrained"]) == 1 and "warm-up" in info["undertrained"][0]
    assert main(["report", str(run)]) == 0  # the report says it too
    page = (run / "report" / "index.html").read_text()
    assert "<p class='note'>Warning: the model is undertrained: its 3 steps" in page
    # trained on to the warm-up's end, the warm-up rule is silent (the loss rule may still speak)
    assert main(["train", "--resume", "--run-dir", str(run), "--max-steps", "100", "--quiet"]) == 0
    assert "warm-up" not in capsys.readouterr().err
    record = Checkpoint(RunDir(run).latest_checkpoint()).info
    assert record["step"] == 100 and record["warmup_steps"] == 100


def test_drdc_names_which_of_its_models_is_undertrained(synth_root, tmp_path, capsys):
    from .test_drdc_refinement import _train

    assert _train(synth_root, tmp_path / "run", "--max-steps", "2") == 0
    err = capsys.readouterr().err
    assert "the base model is undertrained" in err and "the refiner model is undertrained" in err
    assert main(["test", str(tmp_path / "run"), "--quiet", "--no-images"]) == 0
    err = capsys.readouterr().err
    assert "the base model is undertrained" in err and "the refiner model is undertrained" in err
