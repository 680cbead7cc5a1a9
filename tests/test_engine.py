"""The engine with a method it has never seen: several categories in one index, per-category metrics and
their mean, the report grouped by category, predict, uint8 training images, the sampler's step hook."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from ddad.data.dataset import ImageSet
from ddad.data.formats import DataConfig, build_index
from ddad.data.io import DatasetError
from ddad.data.splits import load_train_images
from ddad.diffusion.sampler import (SamplerConfig, conditioned_denoise, ddim_step, denoise_loop, denoising_steps,
                                    target_guidance)
from ddad.diffusion.schedule import ScheduleConfig, alpha_bar, alphas_cumprod
from ddad.engine.calibration import CalibrationKey
from ddad.engine.detection import LoadedDetector
from ddad.engine.predicting import predict
from ddad.engine.testing import test_run as evaluate_run
from ddad.engine.trainer import as_float_images
from ddad.metrics import pixel_auroc, roc_auc
from ddad.report import write_report
from ddad.results import AnomalyResult
from ddad.runs import RunDir


def test_several_categories_make_one_index(synth_root):
    one = build_index(DataConfig(root=str(synth_root), category="washer", image_size=32))
    both = build_index(DataConfig(root=str(synth_root), category="stripes,washer", image_size=32))
    every = build_index(DataConfig(root=str(synth_root), category="all", image_size=32))
    assert both.categories == every.categories == ["stripes", "washer"] and one.categories == ["washer"]
    assert [s for s in both.train if s.category == "washer"] == list(one.train)
    assert [s for s in both.test if s.category == "washer"] == list(one.test)
    assert len(both.train) == 2 * len(one.train) and both.test == every.test
    with pytest.raises(DatasetError, match="twice"):
        build_index(DataConfig(root=str(synth_root), category="washer,washer"))
    with pytest.raises(DatasetError, match="unknown category 'bolt'.*stripes, washer"):
        build_index(DataConfig(root=str(synth_root), category="washer,bolt"))
    # formats without categories ignore the setting
    assert build_index(DataConfig(dataset="folder", normal_dir=str(synth_root / "washer" / "train" / "good"),
                                  category="all")).categories == [""]


def test_training_images_can_be_kept_as_uint8(synth_root):
    data = DataConfig(root=str(synth_root), category="stripes,washer", image_size=32)
    floats = load_train_images(data, progress=False)
    small = load_train_images(data, progress=False, uint8=True)
    assert small.dtype == torch.uint8 and small.shape == floats.shape
    assert small.element_size() * small.nelement() == floats.element_size() * floats.nelement() // 4
    back = as_float_images(small)
    assert back.dtype == torch.float32 and (back - floats).abs().max() <= 1 / 255 + 1e-6
    assert as_float_images(floats) is floats


def test_ddad_refuses_to_train_one_model_on_several_categories(synth_root):
    """(`ddad train --category a,b` trains one DDAD run per category instead: tests/test_per_category.py.)"""
    from ddad.data.formats import build_index
    from ddad.methods.ddad import DDAD
    from ddad.methods.ddad.settings import DDADConfig

    data = DataConfig(root=str(synth_root), category="stripes,washer", image_size=32)
    with pytest.raises(ValueError, match="one model per category") as err:
        DDAD().check_training_set(DDADConfig(data=data), build_index(data))
    assert "stripes, washer" in str(err.value)


class MeanImageDetector:
    """A method the engine does not know: the anomaly map is the distance to its category's mean image."""

    def __init__(self, means: dict[str, torch.Tensor]) -> None:
        self.means = means

    def __call__(self, images: torch.Tensor) -> AnomalyResult:
        # the nearest category mean stands in for "which category is this" (the engine passes images only)
        dists = torch.stack([(images - m).abs().mean(1, keepdim=True) for m in self.means.values()])
        maps = dists.amin(0)
        return AnomalyResult(score=maps.flatten(1).amax(1), anomaly_map=maps, reconstruction=None)


@pytest.fixture(scope="module")
def toy(synth_root, tmp_path_factory):
    data = DataConfig(root=str(synth_root), category="stripes,washer", image_size=32)
    index = build_index(data)
    means = {c: ImageSet([s for s in index.train if s.category == c], 32, 3).stack().mean(0) for c in index.categories}
    key = CalibrationKey.of({"method": "mean image"}, {}, [], data)
    loaded = LoadedDetector(detect=MeanImageDetector(means), data=data, key=key, batch_size=4,
                            settings={"method": "mean image"})
    run = RunDir(tmp_path_factory.mktemp("toy") / "run")
    run.root.mkdir()
    metrics = evaluate_run(run, loaded, progress=False)
    return run, loaded, metrics, index


def test_the_engine_tests_any_method_per_category(toy):
    run, loaded, metrics, index = toy
    rows = list(csv.DictReader(open(run.test_dir / "scores.csv")))
    assert [r["category"] for r in rows] == [s.category for s in index.test]
    assert set(metrics.categories) == {"stripes", "washer"}
    scores = np.array([float(r["score"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    result = loaded.detect(ImageSet(index.test, 32, 3).stack())
    masks = torch.stack([ImageSet(index.test, 32, 3)[i]["mask"] for i in range(len(index.test))])[:, 0] > 0.5
    for category, m in metrics.categories.items():
        sel = np.array([s.category == category for s in index.test])
        assert m.image_auroc == pytest.approx(roc_auc(scores[sel], labels[sel]), abs=1e-12)
        assert m.pixel_auroc == pytest.approx(pixel_auroc(result.anomaly_map[sel][:, 0], masks[sel]), abs=1e-9)
        assert m.n_images == int(sel.sum()) and m.n_defective == int(labels[sel].sum())
    mean = metrics.mean
    for name in ("image_auroc", "pixel_auroc", "pro"):
        assert getattr(mean, name) == pytest.approx(np.mean([getattr(m, name) for m in metrics.categories.values()]))
    stored = json.loads((run.test_dir / "metrics.json").read_text())
    assert stored["category_mean"]["image_auroc"] == pytest.approx(mean.image_auroc)
    assert stored["image_auroc"] == pytest.approx(roc_auc(scores, labels))  # the whole split, as before
    # panels carry the category in their name; no reconstruction column for this method
    assert len(list((run.test_dir / "images").glob("stripes_*.png"))) == sum(s.category == "stripes" for s in index.test)


def test_the_report_groups_by_category(toy):
    run, _, metrics, index = toy
    page = write_report(run).read_text()
    assert re.findall(r"<h3>(\w+)</h3>", page) == ["stripes", "washer"]
    assert "mean of categories" in page and page.count("<tr><th>stripes</th>") == 1
    stripes_part = page.split("<h3>stripes</h3>")[1].split("<h3>washer</h3>")[0]
    assert len(re.findall(r"<div class='item", stripes_part)) == sum(s.category == "stripes" for s in index.test)


def test_the_engine_predicts_for_any_method(toy, synth_root, tmp_path):
    run, loaded, metrics, _ = toy
    rows = predict(run, loaded, [synth_root / "washer" / "test"], tmp_path / "p", progress=False)
    assert len(rows) == 9 and all(r["decision"] in ("good", "defective") for r in rows)
    assert all(r["decision"] == ("defective" if r["score"] >= metrics.threshold else "good") for r in rows)


def test_denoise_loop_hook_and_predicted_x0_of_every_step():
    """The step hook can replace x_t' (what inpainting needs) and the loop returns every step's x0."""
    table = alphas_cumprod(ScheduleConfig()).float()
    clean = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def oracle(xt, t):  # the true noise of x_t around ``clean``
        a = table[t].view(-1, 1, 1, 1)
        return (xt - a.sqrt() * clean) / (1 - a).sqrt()

    cfg = SamplerConfig(start_step=200, skip=50, w=0.0, eta=0.0)
    steps = denoising_steps(cfg)
    a = alpha_bar(table, 200)
    xt = a.sqrt() * clean + (1 - a).sqrt() * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    known = torch.zeros_like(clean, dtype=torch.bool)
    known[..., :4] = True
    seen = []

    def keep_left_half(i, t, x_next, x0):
        seen.append((i, t))
        return torch.where(known, torch.full_like(x_next, 0.25), x_next)

    out = denoise_loop(oracle, xt, table, steps, 0.0, on_step=keep_left_half, keep_x0=True)
    assert seen == [(i, t) for i, (t, _) in enumerate(steps)]
    assert len(out.pred_original_samples) == len(steps)
    assert torch.allclose(out.pred_original_samples[0], clean, atol=1e-4)  # the oracle's x0 is exact
    assert torch.all(out.sample[known] == 0.25)
    # with no hook and no guidance it is plain DDIM; Algorithm 1 is the same loop with Eq. 6's guidance
    plain = denoise_loop(oracle, xt, table, steps, 0.0).sample
    assert torch.allclose(plain, clean, atol=1e-4)
    step = ddim_step(xt, oracle(xt, torch.full((2,), 200)), a, alpha_bar(table, 150), 0.0)
    assert torch.allclose(step.pred_original_sample, clean, atol=1e-4)
    y = clean.flip(-1)
    guided = denoise_loop(oracle, xt, table, steps, 0.0, guidance=target_guidance(y, 2.0)).sample
    assert not torch.allclose(guided, plain, atol=1e-3)  # the guidance pulls toward y
    seeds = [3, 4]
    cfg_guided = SamplerConfig(start_step=200, skip=50, w=2.0, eta=0.0)
    direct = conditioned_denoise(oracle, clean, y, table, cfg_guided, seeds)
    assert torch.isfinite(direct).all() and direct.shape == clean.shape
