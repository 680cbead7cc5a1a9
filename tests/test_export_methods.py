"""The memory-bank and DRDC exports and the torch-free runtime: PatchCore (feature and map graphs, the banks as
files) in parity with the run per category and backend, INT8 near fp32, the numpy nearest-neighbour search
against brute force, a corrupt bank refused by name; DRDC's transformer base (one graph) and memory-bank
base in parity with their runs, categories recognised as ddad recognises them; DRDC's refinement (numpy
inpainting around its graphs) in parity with the run, its numpy parts against torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddad.cli import main

from .test_export_runtime import _runtime

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

CATEGORIES = ("stripes", "washer")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two categories, one bank each (random resnet18 features), thresholds per category from `ddad test`,
    exported as OpenVINO IR with INT8 graphs, in a process of its own (OpenVINO's threads)."""
    from ddad.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("pcexport")
    generate(root / "data", SynthConfig(size=32, train=12, test_good=3, test_defective_per_type=1, seed=2))
    run = root / "run"
    assert main(["train", "--method", "patchcore", "--data-root", str(root / "data"), "--category",
                 ",".join(CATEGORIES), "--image-size", "32", "--backbone", "resnet18", "--backbone-weights", "random",
                 "--set", "bank.fraction=0.25", "--run-dir", str(run), "--quiet"]) == 0
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0
    export = subprocess.run([sys.executable, "-m", "ddad", "export", str(run), "--format", "openvino", "--int8",
                             "--out", str(root / "export"), "--quiet"], capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-3000:]
    return root, run, root / "export"


def _files(root: Path, category: str) -> list[Path]:
    return sorted((root / "data" / category / "test").rglob("*.png"))


def _torch_results(run: Path, files: list[Path], category: str | None):
    from ddad import load_model
    from ddad.data.io import read_image

    model = load_model(run)
    images = torch.stack([read_image(p, model.loaded.data.channels, model.loaded.data.image_size) for p in files])
    return model(images, categories=None if category is None else [category] * len(files))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_exported_bank_model_scores_and_decides_as_the_run(exported, backend, tmp_path):
    root, run, folder = exported
    stored = json.loads((run / "threshold.json").read_text())
    assert stored["categories"][CATEGORIES[0]]["threshold"] != stored["categories"][CATEGORIES[1]]["threshold"]
    labels = []
    first, second = (_files(root, c) for c in CATEGORIES)
    # each against its own bank and thresholds; a part scored as the other category: against that bank only;
    # unknown: recognised
    for files, category in ((first, CATEGORIES[0]), (second, CATEGORIES[1]), (second, CATEGORIES[0]),
                            (first + second, None)):
        ref = _torch_results(run, files, category)
        got = _runtime(folder, files, backend, tmp_path, category=category)
        assert "reconstruction" not in got  # PatchCore reconstructs nothing
        np.testing.assert_allclose(got["score"], ref.score.numpy(), rtol=1e-4, atol=1e-7)
        scale = float(ref.anomaly_map.abs().max())
        np.testing.assert_allclose(got["anomaly_map"], ref.anomaly_map[:, 0].numpy(), rtol=0, atol=1e-4 * scale)
        assert got["pred_label"].tolist() == ref.pred_label.tolist()
        # unknown: each decided as the category recognised from it, as ddad does (here its own, as `ddad test` says)
        truth = [category or p.parents[2].name for p in files]
        assert got["threshold"].tolist() == [stored["categories"][c]["threshold"] for c in truth]
        labels += got["pred_label"].tolist()
    assert any(labels) and not all(labels)


def test_int8_bank_model_stays_near_fp32(exported, tmp_path):
    root, run, folder = exported
    record = json.loads((folder / "export.json").read_text())["int8"]
    assert set(record["graphs"]) == {"features"}
    files = _files(root, CATEGORIES[1])
    fp32 = _runtime(folder, files, "openvino", tmp_path, category=CATEGORIES[1])
    int8 = _runtime(folder, files, "openvino", tmp_path, "int8", category=CATEGORIES[1])
    span = float(fp32["anomaly_map"].max() - fp32["anomaly_map"].min())
    assert not np.array_equal(int8["anomaly_map"], fp32["anomaly_map"])
    assert np.abs(int8["anomaly_map"] - fp32["anomaly_map"]).max() <= (record["max_map_error"] + 0.05) * span


def test_int8_decisions_are_chosen_on_the_int8_scores_of_the_validation_split(exported, tmp_path):
    """The INT8 model decides with thresholds of its own: each category's for the fp32 thresholds' false-alarm
    target, over the INT8 scores of its good validation images (scored here by the runtime, apart)."""
    from ddad import load_config
    from ddad.data.splits import load_validation_split
    from ddad.engine.thresholds import false_alarm_threshold

    root, run, folder = exported
    manifest = json.loads((folder / "export.json").read_text())
    stored, fp32 = manifest["int8"]["decisions"], manifest["decisions"]
    assert stored["calibration_key"] == manifest["calibration_key"]
    assert stored["target"] == fp32["target"] and stored["source"] == fp32["source"]  # the same rule, other scores
    target = fp32["target"]["max_false_alarms"]
    val = load_validation_split(load_config(run).data, progress=False)
    for category in CATEGORIES:
        good = [s.image for s in val.samples if s.label == 0 and s.category == category]
        scores = _runtime(folder, good, "openvino", tmp_path, "int8", category=category)["score"]
        expected = false_alarm_threshold(scores.astype(np.float64), target)
        assert stored["categories"][category]["threshold"] == pytest.approx(expected, rel=1e-9)
        assert stored["categories"][category]["threshold"] != fp32["categories"][category]["threshold"]
    files = _files(root, CATEGORIES[1])
    int8 = _runtime(folder, files, "openvino", tmp_path, "int8", category=CATEGORIES[1])
    assert np.all(int8["threshold"] == stored["categories"][CATEGORIES[1]]["threshold"])
    assert int8["pred_label"].tolist() == (int8["score"] >= int8["threshold"]).tolist()


def test_numpy_nearest_distances_are_exact():
    """The runtime's search against brute force (every distance, then the minimum), across several bank blocks
    and query chunks, with a query equal to a bank row (distance 0, no cancellation error)."""
    from ddad_infer.banks import nearest_distances

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, 24)).astype(np.float32) * 3 + 100  # far from 0: |q|^2 >> |q - b|^2
    queries = rng.normal(size=(70, 24)).astype(np.float32) * 3 + 100
    queries[5] = bank[217]
    expected = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)).min(1)
    got = nearest_distances(queries, bank, chunk=16, block=64)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[5] == 0.0


def test_a_corrupt_bank_and_an_unknown_category_are_refused_by_name(exported, tmp_path):
    import ddad_infer
    from ddad_infer import ExportError

    _, _, folder = exported
    model = ddad_infer.load(folder, backend="onnxruntime")
    with pytest.raises(ValueError, match="category 'gears' is not one of this model's: stripes, washer"):
        model.predict_arrays(np.zeros((1, 3, 32, 32), np.float32), ["gears"])
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    bank = copy / json.loads((folder / "export.json").read_text())["banks"][CATEGORIES[0]]["files"][0]
    data = np.load(bank)
    data[0, 0] += 1.0
    np.save(bank, data)
    with pytest.raises(ExportError, match=rf"{bank.name} is not the one this export wrote"):
        ddad_infer.load(copy, backend="onnxruntime")


def _drdc_parity(root: Path, run: Path, tmp: Path, *settings: str, detect: tuple = (),
                 reconstruction: bool = False) -> None:
    """Train a tiny two-category DRDC run with ``settings``, test it with the detection settings ``detect``
    (thresholds per category), export it as ONNX with them and compare the runtime (ONNX Runtime, in this
    process) with the run: given and recognised categories."""
    import ddad_infer
    from ddad import load_config, load_model, with_detection
    from ddad.data.io import read_image

    assert main(["train", "--method", "drdc", "--data-root", str(root / "data"), "--category", ",".join(CATEGORIES),
                 "--image-size", "32", "--max-steps", "2", "--batch-size", "4", "--backbone", "resnet18",
                 "--backbone-weights", "random", "--set", "features.grid=4", "--set", "model.hidden=32",
                 "--set", "model.heads=4", "--set", "model.neighbour=3", "--set", "model.encoder_layers=1",
                 "--set", "model.decoder_layers=1", "--set", "model.ffn=64", "--set", "detect.pool=2", *settings,
                 "--run-dir", str(run), "--quiet"]) == 0
    flags = [f for pair in detect for f in ("--set", f"detect.{pair[0]}={pair[1]}")]
    assert main(["test", str(run), "--quiet", "--no-images", *flags]) == 0
    assert main(["export", str(run), "--out", str(tmp / "export"), "--quiet", *flags]) == 0
    model, run_model = ddad_infer.load(tmp / "export"), load_model(run, with_detection(load_config(run), **dict(detect)))
    files = _files(root, CATEGORIES[0]) + _files(root, CATEGORIES[1])
    truth = [p.parents[2].name for p in files]
    images = torch.stack([read_image(p, 3, 32) for p in files])
    for categories in (truth, None):
        ref, got = run_model(images, categories=categories), model.predict_arrays(images.numpy(), categories)
        np.testing.assert_allclose(got["score"], ref.score.numpy(), rtol=1e-4, atol=1e-7)
        scale = float(ref.anomaly_map.abs().max())
        np.testing.assert_allclose(got["anomaly_map"], ref.anomaly_map.numpy(), rtol=0, atol=1e-4 * scale)
        assert got["pred_label"].tolist() == ref.pred_label.tolist()
        assert (got["reconstruction"] is not None) == reconstruction
        if reconstruction:  # DRDC's inpainted image
            np.testing.assert_allclose(got["reconstruction"], ref.reconstruction.numpy(), rtol=0, atol=1e-4)
        assert got["categories"] == truth  # recognised as `ddad test` recognises them here (all correctly)
    assert got["pred_label"].any() and not got["pred_label"].all()


def test_drdc_transformer_base_exports_as_one_graph(exported, tmp_path):
    root = exported[0]
    _drdc_parity(root, tmp_path / "run", tmp_path, "--set", "refine.enabled=false")
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert (manifest["method"], manifest["model"], list(manifest["graphs"])) == ("drdc", "graph", ["model"])


def test_drdc_memory_bank_base_exports_as_a_bank_model(exported, tmp_path):
    root = exported[0]
    _drdc_parity(root, tmp_path / "run", tmp_path, "--set", "features.base=bank", "--set", "refine.enabled=false")
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert (manifest["model"], list(manifest["banks"])) == ("bank", ["all"])


REFINE = ("--set", "refine.image_size=16", "--set", "refine.unet=tiny", "--set", "refine.cells=[4,8]",
          "--set", "detect.steps=3", "--set", "detect.mean_filter=3")


@pytest.mark.parametrize("base,switches,alpha", [
    ("bank", (), 0.0),  # Eq. 17 is the base map alone: the refinement's graphs are left out
    ("bank", (), 0.9),  # the paper's alpha, every switch of Table 5 on
    ("transformer", ("refine.model_conditioning=false", "detect.test_time_conditioning=false", "detect.fusion=false"),
     1.0)])
def test_drdc_with_refinement_exports_and_scores_as_the_run(exported, tmp_path, base, switches, alpha):
    """The inpainting loop in numpy around the exported UNet, the maps fused as Eq. 14-17: map, score,
    decisions and inpainted image as the run's, with each image's own masks and noise."""
    root = exported[0]
    settings = [*REFINE, "--set", f"features.base={base}", *(f for s in switches for f in ("--set", s))]
    _drdc_parity(root, tmp_path / "run", tmp_path, *settings, detect=(("alpha", alpha),), reconstruction=alpha > 0)
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["settings"]["settings"]["algorithm"]["refine"]["enabled"] is True  # its scale divided the map
    refined = {"refine_input", "refine_unet", "refine_map"}
    assert (refined <= set(manifest["graphs"])) == (alpha > 0)
    assert (manifest["refinement"] is not None) == (alpha > 0)


@pytest.mark.parametrize("seed", [0, 5, 2**40 + 1, 2**63 - 2])
def test_the_numpy_randperm_is_torchs(seed):
    from ddad_infer.inpainting import torch_randperms

    g = torch.Generator().manual_seed(seed)
    sizes = (1, 2, 16, 784, 5)
    expected = [torch.randperm(n, generator=g).numpy() for n in sizes]  # one generator, drawn in turn
    for got, want in zip(torch_randperms(seed, sizes), expected, strict=True):
        assert np.array_equal(got, want)


def test_the_numpy_masks_are_the_refiners():
    from ddad.diffusion.schedule import ScheduleConfig, alphas_cumprod
    from ddad.methods.drdc.refiner import Refiner
    from ddad.methods.drdc.settings import DRDCDetect, RefineConfig
    from ddad_infer.inpainting import inpainting_masks

    refine = RefineConfig(image_size=24, unet="tiny", cells=(4, 8, 12), sets=3)
    refiner = Refiner(torch.nn.Linear(1, 1), alphas_cumprod(ScheduleConfig()), refine, DRDCDetect())
    for seed in (3, 2**62 + 9):
        assert np.array_equal(inpainting_masks(seed, 24, 24, refine.cells, refine.sets), refiner.masks(seed, 24, 24).numpy())


@pytest.mark.parametrize("conditioned,known", [(True, True), (False, True), (True, False)])
def test_the_numpy_inpainting_is_ddads(conditioned, known):
    """Both loops around the same denoiser (a smooth function of x_t, t and c, written for each), each job's
    draws from its seed (torch's generator, and its numpy replica)."""
    from ddad.diffusion.inpainting import InpaintingNoise, inpaint as torch_inpaint
    from ddad.diffusion.schedule import ScheduleConfig, alphas_cumprod
    from ddad_infer.inpainting import inpaint
    from ddad_infer.noise import torch_randn

    table = alphas_cumprod(ScheduleConfig()).float()
    steps = [(200, 150), (150, 100), (100, 50), (50, -1)]
    x = torch.rand(3, 2, 8, 8) * 2 - 1
    hidden = (torch.rand(3, 1, 8, 8) > 0.5).float()
    seeds = [21, 22, 23]
    noise = InpaintingNoise.draw(seeds, (2, 8, 8), steps)

    def torch_denoiser(xt, t, c):
        return torch.tanh(0.7 * xt + (0 if c is None else 0.3 * c)) + t.float().view(-1, 1, 1, 1) / 1000

    def numpy_denoiser(xt, t, c):
        return np.tanh(np.float32(0.7) * xt + (0 if c is None else np.float32(0.3) * c)) + \
            (t.astype(np.float32) / 1000).reshape(-1, 1, 1, 1)

    expected = torch_inpaint(torch_denoiser, x, hidden, table, steps, noise, conditioned, known)
    draws = np.stack([torch_randn(s, (2 + 3, 2, 8, 8)) for s in seeds], axis=1)
    final, x0s = inpaint(numpy_denoiser, x.numpy(), hidden.numpy(), table.numpy(), steps, draws, conditioned, known)
    np.testing.assert_allclose(final, expected.sample.numpy(), atol=1e-5)
    assert len(x0s) == len(expected.pred_original_samples) == 4
    for got, want in zip(x0s, expected.pred_original_samples):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_ddad_infer_reports_the_category_each_image_was_decided_as(exported, tmp_path):
    """Without --category, each row names the category recognised for its image and that category's
    threshold and its source, as `ddad predict` reports them."""
    import csv

    from ddad_infer.cli import main as infer

    root, run, folder = exported
    files = _files(root, CATEGORIES[0]) + _files(root, CATEGORIES[1])
    assert infer([str(folder), *map(str, files), "--out", str(tmp_path), "--backend", "onnxruntime"]) == 0
    stored = json.loads((run / "threshold.json").read_text())["categories"]
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert [r["category"] for r in rows] == [p.parents[2].name for p in files]
    for r in rows:
        assert float(r["threshold"]) == stored[r["category"]]["threshold"]
        assert r["threshold_source"] == stored[r["category"]]["source"]
