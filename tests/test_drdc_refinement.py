"""DRDC part 2: inpainting masks, dual conditioning (Eq. 10-13), spatio-temporal fusion (Eq. 14-17), the
paper's Table 5 as configurations, batch independence, and training and resuming both models of a run."""

from __future__ import annotations

import itertools
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from ddad.backbones import create_backbone
from ddad.checkpoint import Checkpoint
from ddad.cli import main
from ddad.config import merge
from ddad.diffusion.inpainting import InpaintingNoise, InpaintingObjective, combine_sets, inpaint, inpainting_masks
from ddad.diffusion.schedule import ScheduleConfig, alphas_cumprod, q_sample
from ddad.diffusion.unet import UNet
from ddad.methods.drdc.detector import DRDCDetector
from ddad.methods.drdc.fusion import difference_map, fuse, mean_filter, spatio_temporal_heatmap
from ddad.methods.drdc.model import FeatureReconstructor
from ddad.methods.drdc.refiner import Refiner, refinement_steps
from ddad.methods.drdc.settings import TABLE5, DRDCConfig, DRDCDetect, FeatureConfig, ReconstructionConfig, RefineConfig
from ddad.runs import RunDir
from ddad.scoring import ScoreScale

from .conftest import interrupt_on_call

TABLE = alphas_cumprod(ScheduleConfig()).float()


@pytest.mark.parametrize("cell,sets", [(4, 2), (8, 3), (2, 5)])
def test_masks_are_disjoint_cover_every_pixel_and_follow_the_seed(cell, sets):
    masks = inpainting_masks(32, 24, cell, sets, torch.Generator().manual_seed(3))
    assert masks.shape == (sets, 1, 32, 24) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(dim=0), torch.ones(1, 32, 24))  # each pixel hidden by exactly one set
    cells = masks[:, 0].unfold(1, cell, cell).unfold(2, cell, cell)  # (sets, rows, cols, cell, cell)
    assert torch.all(cells.amin(dim=(-1, -2)) == cells.amax(dim=(-1, -2)))  # whole cells only
    per_set = cells[..., 0, 0].sum(dim=(1, 2))
    assert per_set.max() - per_set.min() <= 1  # uniform split: sizes differ by at most one cell
    again = inpainting_masks(32, 24, cell, sets, torch.Generator().manual_seed(3))
    other = inpainting_masks(32, 24, cell, sets, torch.Generator().manual_seed(4))
    assert torch.equal(masks, again) and not torch.equal(masks, other)
    with pytest.raises(ValueError, match="divide"):
        inpainting_masks(30, 24, 4, 2, torch.Generator())


def _oracle(x: torch.Tensor, seen: list):
    """The denoiser that knows the clean image: eps = (x_t - sqrt(a_t) x) / sqrt(1 - a_t)."""

    def denoise(xt, t, cond):
        seen.append((xt.clone(), cond))
        a = TABLE[t].view(-1, 1, 1, 1)
        return (xt - a.sqrt() * x) / (1 - a).sqrt()

    return denoise


def test_test_time_conditioning_keeps_the_known_pixels_and_an_oracle_inpaints_the_input():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    hidden = torch.stack([inpainting_masks(16, 16, 4, 2, torch.Generator().manual_seed(i))[0] for i in range(3)])
    steps = refinement_steps(DRDCDetect(start_step=250, steps=10))
    assert steps[0][0] == 250 and steps[-1][1] == -1 and len(steps) == 10
    noise = InpaintingNoise.draw([11, 12, 13], (3, 16, 16), steps)
    seen: list = []
    out = inpaint(_oracle(x, seen), x, hidden, TABLE, steps, noise)
    assert torch.allclose(out.sample, x, atol=1e-5)  # the inpainted image equals the input
    a = TABLE[250]
    assert torch.allclose(seen[0][0], a.sqrt() * x + (1 - a).sqrt() * noise.start)  # the input noised to T' (Eq. 4)
    seen_c: list = []
    inpaint(_oracle(x, seen_c), x, hidden, TABLE, steps, noise, start_from_condition=True)
    start = a.sqrt() * torch.where(hidden.bool(), noise.condition, x) + (1 - a).sqrt() * noise.start
    assert torch.allclose(seen_c[0][0], start)  # the other reading: c noised, the hidden cells hold noise only
    known = hidden == 0
    for i, (_, t_next) in enumerate(steps[:-1]):  # the input of step i + 1 is the output of step i
        xt, cond = seen[i + 1]
        expected = q_sample(x, torch.full((3,), t_next), noise.known[i], TABLE)  # Eq. 11
        assert torch.allclose(xt.expand_as(x)[known.expand_as(x)], expected[known.expand_as(x)], atol=1e-6)
        assert torch.equal(cond, torch.where(hidden.bool(), noise.condition, x))  # Eq. 10's c, hidden = noise
    # without test-time conditioning the known pixels follow the model, not the forward process
    seen_free: list = []
    inpaint(_oracle(x, seen_free), x, hidden, TABLE, steps, noise, test_time_conditioning=False)
    xt, _ = seen_free[1]
    expected = q_sample(x, torch.full((3,), steps[0][1]), noise.known[0], TABLE)
    assert not torch.allclose(xt[known.expand_as(x)], expected[known.expand_as(x)], atol=1e-3)
    seen_plain: list = []
    inpaint(_oracle(x, seen_plain), x, hidden, TABLE, steps, noise, model_conditioning=False)
    assert all(cond is None for _, cond in seen_plain)


def test_the_training_objective_hides_one_set_and_conditions_on_noise():
    objective = InpaintingObjective(TABLE, 250, (4, 8), 2)
    draws = objective.draw(6, (3, 16, 16), torch.Generator().manual_seed(0))
    t, noise, cond_noise, hidden = draws
    assert hidden.shape == (6, 1, 16, 16) and t.max() < 250
    assert torch.allclose(hidden.mean(dim=(1, 2, 3)), torch.full((6,), 0.5))  # one of two equal sets
    x0 = torch.rand(6, 3, 16, 16) * 2 - 1
    calls = []

    def model(xt, tt, cond):
        calls.append((xt, cond))
        return torch.zeros_like(xt)

    loss = objective.loss(model, x0, draws)
    xt, cond = calls[0]
    assert torch.allclose(xt, q_sample(x0, t, noise, TABLE))
    assert torch.equal(cond, (1 - hidden) * x0 + hidden * cond_noise)
    assert loss == pytest.approx(noise.square().mean().item())


def _bilinear_up(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of the last two axes with half-pixel centres (align_corners=False), by hand."""
    def weights(n_in: int, n_out: int) -> np.ndarray:
        w = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            i1, f = min(i0 + 1, n_in - 1), src - min(int(np.floor(src)), n_in - 1)
            w[o, i0] += 1 - f
            w[o, i1] += f
        return w

    return weights(a.shape[-2], size[0]) @ a @ weights(a.shape[-1], size[1]).T


def _eq14(x: np.ndarray, pred: np.ndarray, s: int) -> np.ndarray:
    """Eq. 14 by hand: s x s block means, the channel mean of their absolute difference, upsampled back."""
    b, c, h, w = x.shape
    pool = lambda a: a.reshape(b, c, h // s, s, w // s, s).mean(axis=(3, 5))
    diff = np.abs(pool(x) - pool(pred)).mean(axis=1, keepdims=True)
    return diff if s == 1 else _bilinear_up(diff, (h, w))


def _box(m: np.ndarray, k: int) -> np.ndarray:
    """Eq. 16 by hand: the mean of each pixel's k x k window, over the pixels inside the image."""
    out = np.empty_like(m)
    h, w = m.shape[-2:]
    for y in range(h):
        for x in range(w):
            window = m[..., max(y - k // 2, 0):y + k // 2 + 1, max(x - k // 2, 0):x + k // 2 + 1]
            out[..., y, x] = window.mean(axis=(-1, -2))
    return out


def test_fusion_weights_and_heatmaps():
    base, refined = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    assert torch.equal(fuse(base, refined, 0.0), base) and torch.equal(fuse(base, refined, 1.0), refined)
    assert torch.allclose(fuse(base, refined, 0.9), 0.9 * refined + 0.1 * base)
    x, p, q = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    xn, pn, qn = x.double().numpy(), p.double().numpy(), q.double().numpy()
    assert np.allclose(difference_map(x, p).numpy(), _eq14(xn, pn, 1), atol=1e-6)  # Eq. 9
    for scale in (2, 4):  # Eq. 14: compared on s x s averages, then upsampled, at every pixel
        assert np.allclose(difference_map(x, p, scale).numpy(), _eq14(xn, pn, scale), atol=1e-6), scale
    st = spatio_temporal_heatmap(x, [p, q, x], (1, 2, 4))  # Eq. 15: the mean of 9 maps, three of them zero
    expected = sum(_eq14(xn, pred, s) for pred in (pn, qn, xn) for s in (1, 2, 4)) / 9
    assert np.allclose(st.numpy(), expected, atol=1e-6)
    m = torch.rand(2, 1, 7, 9)
    for k in (1, 3, 5):  # Eq. 16, the border averaging only the pixels inside the image
        assert np.allclose(mean_filter(m, k).numpy(), _box(m.double().numpy(), k), atol=1e-6), k


def _tiny_detector(detect: DRDCDetect, refine: RefineConfig, seed: int = 0) -> DRDCDetector:
    torch.manual_seed(seed)
    extractor = create_backbone("mobilenet_v2", (1, 2, 3, 4), weights="random", strides=(2, 4, 8, 16))
    features = FeatureConfig(backbone="mobilenet_v2", grid=4)
    model = FeatureReconstructor(168, 4, ReconstructionConfig(hidden=32, encoder_layers=1, decoder_layers=1,
                                                              heads=4, ffn=64, neighbour=3))
    unet = UNet(refine.unet_config(3))
    for p in unet.parameters():  # a random network predicts noise of some size (the last layer starts at 0)
        torch.nn.init.normal_(p, std=0.05)
    refiner = Refiner(unet, alphas_cumprod(refine.schedule), refine, detect)
    return DRDCDetector(extractor, model, features, detect, "cpu", refiner, ScoreScale(2.0, 3.0, 1))


REFINE = RefineConfig(image_size=32, unet="tiny", cells=(4, 8))
DETECT = DRDCDetect(pool=4, mean_filter=3, steps=4)


def test_a_drdc_score_does_not_depend_on_the_batch():
    detector = _tiny_detector(DETECT, REFINE)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    together = detector(images)
    alone = [detector(images[i:i + 1]) for i in range(5)]
    shuffled = detector(images[[3, 0, 4, 1, 2]])
    for i in range(5):
        assert torch.allclose(alone[i].anomaly_map[0], together.anomaly_map[i], atol=1e-5)
        assert alone[i].score[0] == pytest.approx(together.score[i].item(), rel=1e-5)
    assert torch.allclose(shuffled.anomaly_map, together.anomaly_map[[3, 0, 4, 1, 2]], atol=1e-5)


def test_alpha_chooses_between_the_base_and_the_diffusion_heatmap():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    for alpha, part in ((0.0, "base_map"), (1.0, "diffusion_map")):
        result = _tiny_detector(replace(DETECT, alpha=alpha), REFINE)(images)
        assert torch.allclose(result.anomaly_map, result.extras[part], atol=1e-6)
    result = _tiny_detector(DETECT, REFINE)(images)
    maps = _tiny_detector(DETECT, REFINE).maps(images)
    assert torch.allclose(result.extras["base_map"], maps["base"] / 3.0)  # divided by max_feature
    assert torch.allclose(result.extras["diffusion_map"], maps["diffusion"] / 2.0)  # by max_pixel
    assert not torch.allclose(result.extras["base_map"], result.extras["diffusion_map"])


def test_every_table5_switch_is_a_configuration_that_changes_the_maps():
    for ms, fusion, mc, ttc in itertools.product((False, True), repeat=4):
        config = DRDCConfig.from_dict(merge(DRDCConfig().to_dict(), {
            "refine": {"model_conditioning": mc},
            "detect": {"multiscale_base": ms, "fusion": fusion, "test_time_conditioning": ttc}}))
        assert (config.detect.multiscale_base, config.detect.fusion, config.refine.model_conditioning,
                config.detect.test_time_conditioning) == (ms, fusion, mc, ttc)
        assert config.refine.unet_config(3).cond_channels == (3 if mc else 0)
    rows = {name: DRDCConfig.from_dict(merge(DRDCConfig().to_dict(), row)) for name, row in TABLE5.items()}
    assert not rows["base"].refine.enabled
    assert not rows["+test-time conditioning, fusion"].refine.model_conditioning
    assert rows["+model conditioning"].refine.model_conditioning and not rows["+model conditioning"].detect.multiscale_base
    assert rows["+multi-scale base"].detect.multiscale_base
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = _tiny_detector(DETECT, REFINE).maps(images)
    for change in ({"fusion": False}, {"test_time_conditioning": False}):
        other = _tiny_detector(replace(DETECT, **change), REFINE).maps(images)
        assert torch.allclose(other["base"], reference["base"])
        assert not torch.allclose(other["diffusion"], reference["diffusion"], atol=1e-4), change
    multi = _tiny_detector(replace(DETECT, multiscale_base=True), REFINE).maps(images)
    assert not torch.allclose(multi["base"], reference["base"]) and torch.equal(multi["diffusion"], reference["diffusion"])
    plain = _tiny_detector(DETECT, replace(REFINE, model_conditioning=False)).maps(images)
    assert not torch.allclose(plain["diffusion"], reference["diffusion"], atol=1e-4)


def _train(root, run, *extra) -> int:
    return main(["train", "--method", "drdc", "--data-root", str(root), "--category", "stripes,washer",
                 "--image-size", "32", "--batch-size", "8", "--backbone", "mobilenet_v2", "--backbone-weights",
                 "random", "--set", "features.grid=4", "--set", "model.hidden=32", "--set", "model.heads=4",
                 "--set", "model.encoder_layers=1", "--set", "model.decoder_layers=1", "--set", "model.ffn=64",
                 "--set", "model.neighbour=3", "--set", "refine.image_size=32", "--set", "refine.unet=tiny",
                 "--set", "refine.cells=[4,8]", "--set", "refine_train.batch_size=8", "--set", "detect.pool=4",
                 "--set", "detect.mean_filter=3", "--set", "detect.steps=3", "--run-dir", str(run), "--quiet", *extra])


def test_both_models_train_and_resume_exactly(tmp_path, synth_root, monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(synth_root, full, "--max-steps", "4") == 0
    assert _train(synth_root, part, "--max-steps", "2") == 0
    assert main(["train", "--resume", "--run-dir", str(part), "--max-steps", "4", "--quiet"]) == 0
    for sub in (None, "refine"):
        a = Checkpoint(RunDir(full, sub).latest_checkpoint())
        b = Checkpoint(RunDir(part, sub).latest_checkpoint())
        assert a.info["step"] == b.info["step"] == 4, sub
        for k, v in a.tensors.items():
            assert torch.equal(v, b.tensors[k]), (sub, k)
    log = (part / "train.log").read_text()
    assert "[refine] training started" in log and "[refine] resumed" in log
    # the run tests per category with the fused map, and its calibration is stored under the key
    assert main(["test", str(full), "--quiet", "--no-images"]) == 0
    assert len(list((full / "calibration").glob("scale-*.json"))) == 1
    # Eq. 17's weight, the pooling and the crop do not change the maps: their scale is reused (tuning alpha
    # does not re-run the calibration's diffusion); the number of steps does
    assert main(["test", str(full), "--quiet", "--no-images", "--set", "detect.alpha=0.5", "--set", "detect.pool=2",
                 "--out", str(tmp_path / "alpha")]) == 0
    assert len(list((full / "calibration").glob("scale-*.json"))) == 1
    assert main(["test", str(full), "--quiet", "--no-images", "--set", "detect.steps=2",
                 "--out", str(tmp_path / "steps")]) == 0
    assert len(list((full / "calibration").glob("scale-*.json"))) == 2
    # the stored threshold (of the last test: 2 steps) is refused under another scoring setting, naming it
    images = [str(synth_root / "washer" / "test" / "good"), "--quiet", "--no-images", "--set", "detect.steps=2"]
    assert main(["predict", str(full), *images, "--out", str(tmp_path / "p")]) == 0
    assert main(["predict", str(full), *images, "--out", str(tmp_path / "q"), "--set", "detect.alpha=0.5"]) == 2
    assert "detect.alpha: 0.9 -> 0.5" in capsys.readouterr().err and not (tmp_path / "q").exists()
    _maps_are_reused_across_alpha(full, monkeypatch)


def _maps_are_reused_across_alpha(run_dir, monkeypatch):
    """A split scored again with another alpha or pooling takes the maps of the last scoring (ddad tune runs
    the diffusion once per map setting), and scores exactly as a fresh computation; other steps do not."""
    from ddad import load_config, with_detection
    from ddad.data.splits import load_test_split
    from ddad.methods import get_method

    from ddad.methods.drdc import detector

    detector._last_maps.clear()  # the tests above scored these splits in this process
    run, config, method = RunDir(run_dir), load_config(run_dir), get_method("drdc")
    split = load_test_split(config.data, progress=False)
    calls = []
    original = DRDCDetector.maps
    monkeypatch.setattr(DRDCDetector, "maps", lambda self, x, *rest: calls.append(len(x)) or original(self, x, *rest))
    method.load(run, config, progress=False).score_split(split, True, False)
    assert sum(calls) == len(split.images)
    other = with_detection(config, alpha=0.3, pool=2)
    cached = method.load(run, other, progress=False).score_split(split, True, False)
    assert sum(calls) == len(split.images)  # no map computed again
    fresh = method.load(run, other, progress=False).score_split(split, False, False)
    assert sum(calls) == 2 * len(split.images)
    assert torch.equal(cached.score, fresh.score) and torch.equal(cached.anomaly_map, fresh.anomaly_map)
    method.load(run, with_detection(config, steps=2), progress=False).score_split(split, True, False)
    assert sum(calls) == 3 * len(split.images)  # the steps change the maps (their scale is stored above)
    # a test scores the validation split, then the test split: a second test (another alpha) reuses both
    from ddad.data.splits import load_validation_split

    val = load_validation_split(config.data, progress=False)
    calls.clear()
    for alpha in (0.2, 0.6):
        loaded = method.load(run, with_detection(config, alpha=alpha), progress=False)
        loaded.score_split(val, True, False)
        loaded.score_split(split, True, False)
    assert sum(calls) == len(val.images) + len(split.images)  # each split's maps computed once


def test_a_base_model_run_of_part_one_still_loads_as_the_base_model():
    stored = DRDCConfig().to_dict()
    del stored["refine"], stored["refine_train"]
    config = DRDCConfig.from_mapping(DRDCConfig.upgrade_stored(stored), "config.yaml")
    assert config.refine.enabled is False


def test_a_cpu_run_refines_at_the_cpu_profile_unless_told_otherwise(synth_root):
    from ddad.cli.parser import build_parser
    from ddad.cli.settings import train_settings

    def settings(*extra):
        args = build_parser().parse_args(["train", "--method", "drdc", "--data-root", str(synth_root), "--category",
                                          "washer", "--device", "cpu", "--backbone-weights", "random", *extra])
        return train_settings(args)[0]

    cpu = settings()
    assert (cpu.refine.image_size, cpu.refine.unet, cpu.refine.cells, cpu.detect.mean_filter) == (64, "compact", (4, 8), 3)
    assert cpu.refine_train.device == "cpu"
    chosen = settings("--set", "refine.image_size=32", "--set", "refine.unet=tiny", "--set", "refine.cells=[4]")
    assert (chosen.refine.image_size, chosen.refine.unet, chosen.refine.cells, chosen.detect.mean_filter) == (32, "tiny", (4,), 5)
    budget = settings("--max-steps", "7", "--set", "refine_train.max_steps=3")
    assert budget.train.max_steps == 7 and budget.refine_train.max_steps == 3
    assert settings("--minutes", "2").refine_train.max_minutes == 2.0  # each model's budget


# Another valid value of every field of the sections a DRDC score depends on (a field added to a section
# without one here fails the test below until it is decided whether it changes the maps).
OTHER_VALUES = {
    "features": {"backbone": "mobilenet_v2", "strides": (4, 8, 16), "grid": 7, "base": "bank"},
    "bank": {"fraction": 0.5, "projection_dim": 64, "per_category": True, "seed": 1},
    "model": {"hidden": 128, "encoder_layers": 2, "decoder_layers": 3, "heads": 4, "ffn": 512, "dropout": 0.2,
              "attention_dropout": 0.0, "neighbour": 5, "jitter_scale": 10.0, "jitter_prob": 0.5},
    "refine": {"enabled": False, "image_size": 64, "unet": "compact", "model_conditioning": False, "cells": (4, 8),
               "sets": 3, "schedule": ScheduleConfig(beta_end=0.03)},
    "detect": {"pool": 8, "crop": 0.9, "precision": "bf16", "start_step": 200, "steps": 5,
               "test_time_conditioning": False, "fusion": False, "scales": (1, 2), "mean_filter": 3, "alpha": 0.5,
               "multiscale_base": True, "calibration_images": 8, "seed": 1},
}
SHARES_MAPS = {("detect", "alpha"), ("detect", "pool"), ("detect", "crop")}  # Eq. 17's weight, image score
REFUSED: set = set()  # settings a DRDC config refuses outright (the config's error must name them)


def test_every_scoring_setting_is_in_the_calibration_key_and_a_refusal_names_it(tmp_path):
    """A threshold stored under one setting is refused under another, naming the field (not a section's
    repr); the maps' key (their score scale, the reused maps) changes with every setting but alpha, pooling
    and crop. Checked field by field with the functions ``ddad test`` and ``ddad predict`` use."""
    import dataclasses

    from ddad.engine.calibration import ThresholdMismatch, stored_scale, stored_threshold, store_threshold
    from ddad.methods.drdc.method import SCORING_SECTIONS, calibration_keys

    config = DRDCConfig()
    networks = [["epoch-00001.safetensors", 123, 456]]
    key, maps_key = calibration_keys(config, networks)
    assert set(OTHER_VALUES) == set(SCORING_SECTIONS)
    run = RunDir(tmp_path / "run")
    store_threshold(run, {"threshold": 0.5, "source": "test"}, key)
    computed = []
    stored_scale(run, maps_key, lambda: computed.append(1) or ScoreScale(2.0, 3.0, 1))
    for section, others in OTHER_VALUES.items():
        current = getattr(config, section)
        assert set(others) == {f.name for f in dataclasses.fields(current)}, section
        for name, value in others.items():
            assert getattr(current, name) != value, (section, name)
            if (section, name) in REFUSED:
                with pytest.raises(ValueError, match=f"{section}.{name}"):
                    replace(config, **{section: replace(current, **{name: value})})
                continue
            changed = replace(config, **{section: replace(current, **{name: value})})
            other_key, other_maps_key = calibration_keys(changed, networks)
            with pytest.raises(ThresholdMismatch) as refused:
                stored_threshold(run, other_key, "run ddad test")
            message = str(refused.value)
            assert re.search(rf"algorithm\.{section}\.{name}(: |\.)", message), message
            assert "Config(" not in message and "Detect(" not in message, message  # no section's repr
            before = len(computed)
            scale = stored_scale(run, other_maps_key, lambda: computed.append(1) or ScoreScale(5.0, 7.0, 1))
            if (section, name) in SHARES_MAPS:
                assert other_maps_key == maps_key and len(computed) == before and scale.max_pixel == 2.0
            else:
                assert other_maps_key.digest != maps_key.digest and len(computed) == before + 1, (section, name)
    assert stored_threshold(run, calibration_keys(config, networks)[0], "run ddad test")["threshold"] == 0.5
    assert calibration_keys(config, [["epoch-00002.safetensors", 123, 456]])[0].digest != key.digest  # networks


def test_test_time_conditioning_reimposes_the_known_pixels_at_the_last_step_with_a_real_denoiser():
    """Not an oracle: a denoiser whose predictions are wrong everywhere. With Eq. 13 the final image keeps
    the input exactly on the known pixels (x itself at the last step) and the model's output on the hidden
    ones; without it, the known pixels are the model's too."""
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    hidden = torch.stack([inpainting_masks(16, 16, 4, 2, torch.Generator().manual_seed(i))[0] for i in range(2)])
    steps = refinement_steps(DRDCDetect(start_step=250, steps=5))
    noise = InpaintingNoise.draw([1, 2], (3, 16, 16), steps)

    def wrong(xt, t, cond):
        return 0.5 * xt + 0.2 * torch.sin(3 * xt)

    conditioned = inpaint(wrong, x, hidden, TABLE, steps, noise).sample
    free = inpaint(wrong, x, hidden, TABLE, steps, noise, test_time_conditioning=False).sample
    known, unknown = (hidden == 0).expand_as(x), (hidden == 1).expand_as(x)
    assert torch.equal(conditioned[known], x[known])
    assert (conditioned[unknown] - x[unknown]).abs().mean() > 0.05  # the hidden pixels are the model's guess
    assert (free[known] - x[known]).abs().mean() > 0.05


def _fake_inpainting(monkeypatch, steps: int):
    """The refiner's inpainting replaced by random step predictions; returns what it was given and made."""
    import ddad.methods.drdc.refiner as refiner_module
    from ddad.diffusion.sampler import DenoiseOutput

    record = {}

    def fake(denoiser, x, hidden, table, steps_, noise, model_conditioning, test_time_conditioning):
        g = torch.Generator().manual_seed(7)
        preds = [torch.rand(x.shape, generator=g) * 2 - 1 for _ in range(steps)]
        record.update(x=x.clone(), hidden=hidden.clone(), preds=preds)
        return DenoiseOutput(sample=preds[-1], pred_original_samples=preds)

    monkeypatch.setattr(refiner_module, "inpaint", fake)
    return record


@pytest.mark.parametrize("fusion", [True, False])
def test_the_refiner_combines_sets_and_fuses_steps_and_scales_as_eq_8_and_14_to_16(monkeypatch, fusion):
    """Each pixel of a combined prediction comes from the set that hid it (Eq. 8); the heatmap is the mean
    over every step, scale and cell size of Eq. 14's maps, mean-filtered (Eq. 15-16), or with fusion off the
    final prediction at full scale; all against references written out by hand."""
    refine = RefineConfig(image_size=16, unet="tiny", cells=(4, 8), sets=3)
    detect = DRDCDetect(steps=3, scales=(1, 2, 4), mean_filter=5, fusion=fusion)
    record = _fake_inpainting(monkeypatch, 3)
    refiner = Refiner(torch.nn.Linear(1, 1), TABLE, refine, detect)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = refiner(x, [11, 12])
    b, specs, sets = 2, 2, 3
    hidden = record["hidden"].double().numpy()[:, 0].reshape(b, specs, sets, 16, 16)  # jobs: image, cells, set
    preds = [p.double().numpy().reshape(b, specs, sets, 3, 16, 16) for p in record["preds"]]
    assert np.array_equal(hidden.sum(axis=2), np.ones((b, specs, 16, 16)))  # each split covers the image once
    for s, cell in enumerate(refine.cells):  # each specification's cells are of its size
        blocks = hidden[:, s].reshape(b, sets, 16 // cell, cell, 16 // cell, cell)
        assert np.array_equal(blocks.min(axis=(3, 5)), blocks.max(axis=(3, 5)))
    owner = hidden.argmax(axis=2)  # (b, specs, H, W): the set that hid each pixel

    def combined(pred):  # (b, specs, C, H, W): each pixel from the set that hid it, by indexing
        return np.take_along_axis(pred, owner[:, :, None, None], axis=2)[:, :, 0]

    assert np.allclose(out.inpainted.numpy(), combined(preds[-1])[:, 0], atol=1e-6)  # the first specification
    xn = x.double().numpy()
    used = [combined(p) for p in preds] if fusion else [combined(preds[-1])]
    scales = detect.scales if fusion else (1,)
    maps = [_eq14(xn, c[:, s], sc) for c in used for s in range(specs) for sc in scales]
    expected = _box(sum(maps) / len(maps), detect.mean_filter)
    assert out.heatmap.shape == (b, 1, 16, 16)
    assert np.allclose(out.heatmap.numpy(), expected, atol=1e-5)


def test_combining_sets_takes_each_pixel_from_the_set_that_hid_it():
    masks = inpainting_masks(12, 12, 3, 4, torch.Generator().manual_seed(0))  # (sets, 1, H, W)
    predictions = torch.rand(4, 2, 3, 12, 12)  # (sets, B, C, H, W)
    out = combine_sets(predictions, masks[:, None].expand(4, 2, 1, 12, 12))
    for y, x in itertools.product(range(12), repeat=2):
        k = [s for s in range(4) if masks[s, 0, y, x] == 1]
        assert len(k) == 1 and torch.equal(out[:, :, y, x], predictions[k[0], :, :, y, x])


def test_the_memory_bank_base_trains_only_the_refiner_resumes_and_with_alpha_0_is_the_banks_map(tmp_path, synth_root):
    """features.base=bank: a coreset of the training tokens is the base (no transformer checkpoint); the
    refiner trains and resumes exactly as with the transformer; with alpha 0 the fused map is the bank's
    nearest-token distance (brute force), upsampled, divided by its calibration maximum."""
    from ddad import load_config, with_detection
    from ddad.data.splits import load_test_split
    from ddad.memory_bank import load_bank
    from ddad.methods import get_method
    from ddad.methods.drdc.features import token_features

    bank_args = ("--set", "features.base=bank", "--set", "bank.fraction=0.5")
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(synth_root, full, "--max-steps", "4", *bank_args) == 0
    assert _train(synth_root, part, "--max-steps", "2", *bank_args) == 0
    bank_file = part / "banks" / "all.safetensors"
    stamp = bank_file.stat().st_mtime_ns
    assert _train(synth_root, part, "--max-steps", "2", *bank_args) == 2  # a fresh fit over it is refused
    assert main(["train", "--resume", "--run-dir", str(part), "--max-steps", "4", "--quiet"]) == 0
    assert bank_file.stat().st_mtime_ns == stamp and not RunDir(full).checkpoints()  # no transformer
    a = Checkpoint(RunDir(full, "refine").latest_checkpoint())
    b = Checkpoint(RunDir(part, "refine").latest_checkpoint())
    assert a.info["step"] == b.info["step"] == 4
    for k, v in a.tensors.items():
        assert torch.equal(v, b.tensors[k]), k
    bank, facts = load_bank(bank_file)
    assert facts["categories"] == ["stripes", "washer"] and len(bank) == round(0.5 * facts["tokens"])
    config = with_detection(load_config(part), alpha=0.0)
    loaded = get_method("drdc").load(RunDir(part), config, progress=False)
    split = load_test_split(config.data, progress=False)
    result = loaded.score_split(split, cache=False, progress=False)
    detector = loaded.detect
    feats = token_features(detector.extractor, split.images, 4)  # (N, C, 4, 4)
    tokens = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).double()
    nearest = torch.cdist(tokens, bank.double()).amin(dim=1).view(len(feats), 1, 4, 4).float()
    expected = torch.nn.functional.interpolate(nearest, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(result.anomaly_map * detector.scale.max_feature, expected, atol=1e-4)
    # its scale comes from held-out images (the bank holds the training tokens): the largest bank distance of
    # the defect-free validation images, none of which the bank saw
    from ddad.data.formats import build_index
    from ddad.data.io import read_image

    held = [s for s in build_index(config.data).val if s.label == 0]
    assert held and not {s.image for s in held} & {s.image for s in build_index(config.data).train}
    images = torch.stack([read_image(s.image, 3, 32) for s in held])
    feats = token_features(detector.extractor, images, 4)
    tokens = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).double()
    nearest = torch.cdist(tokens, bank.double()).amin(dim=1).view(len(feats), 1, 4, 4).float()
    expected = torch.nn.functional.interpolate(nearest, size=(32, 32), mode="bilinear", align_corners=False)
    assert detector.scale.max_feature == pytest.approx(float(expected.amax()), rel=1e-4)


def test_a_memory_bank_base_per_category_compares_each_image_with_its_own_categorys_bank_only(tmp_path, synth_root):
    """bank.per_category: one bank of tokens per category; each image's base map is its tokens' distance to
    the nearest token of its own category's bank (brute force), the other category's bank never consulted."""
    from ddad import load_config
    from ddad.data.splits import load_test_split
    from ddad.memory_bank import load_bank
    from ddad.methods import get_method
    from ddad.methods.drdc.features import token_features

    run = tmp_path / "run"
    assert _train(synth_root, run, "--set", "features.base=bank", "--set", "bank.per_category=true", "--set",
                  "bank.fraction=0.5", "--set", "refine.enabled=false") == 0
    banks = {c: load_bank(run / "banks" / f"{c}.safetensors") for c in ("stripes", "washer")}
    assert sorted(p.name for p in (run / "banks").iterdir()) == ["stripes.safetensors", "washer.safetensors"]
    config = load_config(run)
    loaded = get_method("drdc").load(RunDir(run), config, progress=False)
    split = load_test_split(config.data, progress=False)
    categories = [s.category for s in split.samples]
    result = loaded.score_split(split, cache=False, progress=False)
    feats = token_features(loaded.detect.extractor, split.images, 4)
    tokens = feats.permute(0, 2, 3, 1).reshape(len(feats), -1, feats.shape[1]).double()
    from ddad.data.formats import build_index
    from ddad.data.io import read_image

    train = build_index(config.data).train
    for c in ("stripes", "washer"):  # each bank from its own category's training images only
        own = [s for s in train if s.category == c]
        bank, facts = banks[c]
        assert facts["images"] == len(own) and facts["tokens"] == 16 * len(own)
        images = torch.stack([read_image(s.image, 3, 32) for s in own])
        own_tokens = token_features(loaded.detect.extractor, images, 4).permute(0, 2, 3, 1).reshape(-1, bank.shape[1])
        assert torch.cdist(bank.double(), own_tokens.double()).amin(dim=1).max() < 1e-4, c
    for i, c in enumerate(categories):
        bank, facts = banks[c]
        assert facts["categories"] == [c] and len(bank) == round(0.5 * facts["tokens"])
        nearest = torch.cdist(tokens[i], bank.double()).amin(dim=1).view(1, 1, 4, 4).float()
        expected = torch.nn.functional.interpolate(nearest, size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(result.anomaly_map[i:i + 1], expected, atol=1e-4), i
    # the washer bank replaced by the stripes images' own tokens: the stripes images' scores do not move
    stripes = [i for i, c in enumerate(categories) if c == "stripes"]
    poisoned = {"stripes": banks["stripes"][0], "washer": tokens[stripes].reshape(-1, tokens.shape[-1]).float()}
    from ddad.methods.drdc.model import TokenBank

    loaded.detect.model = TokenBank(poisoned)
    again = loaded.score_split(split, cache=False, progress=False)
    assert torch.equal(again.score[stripes], result.score[stripes])
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0


def test_an_interrupted_per_category_bank_base_resumes_to_the_same_banks(tmp_path, synth_root, monkeypatch):
    import ddad.memory_bank as memory_bank
    from ddad.memory_bank import load_bank

    args = ("--set", "features.base=bank", "--set", "bank.per_category=true", "--set", "bank.fraction=0.5", "--set",
            "refine.enabled=false")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _train(synth_root, whole, *args) == 0
    # Ctrl-C while choosing the second category's coreset
    real = interrupt_on_call(monkeypatch, memory_bank, "greedy_coreset", 2)
    assert _train(synth_root, part, *args) == 130
    kept = part / "banks" / "stripes.safetensors"
    assert kept.is_file() and not (part / "banks" / "washer.safetensors").exists()
    stamp = kept.stat().st_mtime_ns
    monkeypatch.setattr(memory_bank, "greedy_coreset", real)
    assert main(["test", str(part), "--quiet", "--no-images"]) == 2  # the missing bank is named
    assert main(["train", "--resume", "--run-dir", str(part), "--quiet"]) == 0
    assert kept.stat().st_mtime_ns == stamp  # kept, not fitted again
    for c in ("stripes", "washer"):
        assert torch.equal(load_bank(part / "banks" / f"{c}.safetensors")[0],
                           load_bank(whole / "banks" / f"{c}.safetensors")[0]), c
