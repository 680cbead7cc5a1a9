"""The exported model and its torch-free runtime (ddad_infer): parity with PyTorch for ONNX Runtime and
OpenVINO, the runtime without torch, refusals of folders that cannot score like their run, and the runtime's
numpy parts against torch as the oracle."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddad.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny DDAD run (combined scoring, positional maxima, thresholds from `ddad test`) exported as OpenVINO IR
    with INT8 graphs (the folder holds the ONNX graphs too)."""
    root = tmp_path_factory.mktemp("export")
    assert main(["synth", str(root / "data"), "--size", "32", "--train", "8", "--test-good", "3",
                 "--test-defective", "2", "--categories", "washer"]) == 0
    run = root / "run"
    assert main(["train", "--data-root", str(root / "data"), "--category", "washer", "--model", "tiny",
                 "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--run-dir", str(run), "--quiet",
                 "--set", "detect.sampler.start_step=100", "--set", "detect.sampler.skip=50",
                 "--set", "detect.backbone=resnet18", "--set", "weights.backbone_weights=random",
                 "--set", "detect.scoring.mode=combined", "--set", "runtime.batch_size=4"]) == 0
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0
    # in a process of its own: NNCF and OpenVINO leave threads behind that crash a later test's signal handling
    export = subprocess.run([sys.executable, "-m", "ddad", "export", str(run), "--format", "openvino", "--int8",
                             "--out", str(root / "export"), "--quiet"], capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-3000:]
    return root, run, root / "export"


def _files(root: Path) -> list[Path]:
    return sorted((root / "data" / "washer" / "test").rglob("*.png"))


def _torch_results(run: Path, files: list[Path]):
    """What the run itself gives (ddad's Python API, PyTorch): the oracle of every parity test."""
    from ddad import load_model
    from ddad.data.io import read_image

    model = load_model(run)
    images = torch.stack([read_image(p, model.loaded.data.channels, model.loaded.data.image_size) for p in files])
    return model(images)


def _runtime(folder: Path, files: list[Path], backend: str, tmp: Path, precision: str = "fp32",
             category: str | None = None) -> dict:
    """ddad_infer's results in a process of its own: OpenVINO's threads, once started in the test process,
    crash a later test's signal handling there (test_interruptions)."""
    out = tmp / f"runtime-{backend}-{precision}-{category}.npz"
    script = ("import numpy as np, ddad_infer\n"
              f"r = ddad_infer.load({str(folder)!r}, backend={backend!r}, precision={precision!r}).predict("
              f"{[str(p) for p in files]!r}, {category!r})\n"
              "col = lambda k: np.array([getattr(x, k) for x in r])\n"
              f"np.savez({str(out)!r}, **{{k: col(k) for k in ('score', 'anomaly_map', 'reconstruction', 'pred_score', "
              "'pred_label', 'threshold') if getattr(r[0], k) is not None})\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_exported_model_scores_and_decides_as_the_run(exported, backend, tmp_path):
    root, run, folder = exported
    files = _files(root)
    ref = _torch_results(run, files)
    got = _runtime(folder, files, backend, tmp_path)
    scores = got["score"]
    np.testing.assert_allclose(scores, ref.score.numpy(), rtol=1e-4, atol=1e-6)
    scale = float(ref.anomaly_map.abs().max())
    np.testing.assert_allclose(got["anomaly_map"], ref.anomaly_map[:, 0].numpy(), rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(got["reconstruction"], ref.reconstruction.numpy(), atol=1e-4)
    assert got["pred_label"].tolist() == ref.pred_label.tolist()
    # pred_score divides the score's difference by the validation range: its tolerance follows
    stored = json.loads((folder / "export.json").read_text())["decisions"]
    low, high = stored["validation_range"]
    np.testing.assert_allclose(got["pred_score"], ref.pred_score.numpy(),
                               atol=2e-4 * float(np.abs(scores).max()) / (high - low))
    assert got["pred_label"].any() and not got["pred_label"].all()  # the threshold separates some


def test_int8_scores_and_labels_stay_near_fp32(exported, tmp_path):
    """INT8 (what `ddad export --int8` chose per graph) against the fp32 export on the test images: maps within
    the deviation the manifest states (measured on other, defect-free, images) plus 5 % of their range; the
    same labels wherever the fp32 score is more than 5 % of its range from the threshold."""
    import ddad_infer
    from ddad_infer import ExportError

    root, run, folder = exported
    record = json.loads((folder / "export.json").read_text())["int8"]
    assert set(record["graphs"]) == {"unet", "scorer"} and record["tried"][-1]["max_map_error"] == record["max_map_error"]
    fp32 = _runtime(folder, _files(root), "openvino", tmp_path)
    int8 = _runtime(folder, _files(root), "openvino", tmp_path, "int8")
    maps32, maps8 = fp32["anomaly_map"], int8["anomaly_map"]
    span = float(maps32.max() - maps32.min())
    assert np.abs(maps8 - maps32).max() <= (record["max_map_error"] + 0.05) * span
    assert not np.array_equal(maps8, maps32)  # the INT8 graphs are really other graphs
    scores = fp32["score"]
    margin = 0.05 * float(scores.max() - scores.min())
    assert (np.abs(int8["score"] - scores) <= 0.05 * np.abs(scores) + 1e-6).all()
    away = np.abs(scores - fp32["threshold"]) > margin
    assert away.any() and (int8["pred_label"][away] == fp32["pred_label"][away]).all()
    with pytest.raises(ExportError, match="INT8 graphs run in OpenVINO"):
        ddad_infer.load(folder, backend="onnxruntime", precision="int8")


def test_ddad_infer_writes_what_ddad_predict_writes(exported, tmp_path):
    root, run, folder = exported
    data = root / "data" / "washer" / "test"
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "torch"), "--quiet", "--no-images"]) == 0
    out = tmp_path / "infer"
    result = subprocess.run([sys.executable, "-m", "ddad_infer.cli", str(folder), str(data), str(bad), "--out",
                             str(out), "--backend", "onnxruntime"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr
    ours = {Path(r["image"]).resolve(): r for r in csv.DictReader(open(out / "scores.csv"))}
    theirs = {Path(r["image"]).resolve(): r for r in csv.DictReader(open(tmp_path / "torch" / "scores.csv"))}
    assert "cannot decode image file" in ours.pop(bad.resolve())["error"]
    assert ours.keys() == theirs.keys() and len(ours) == len(_files(root))
    for image, a in theirs.items():
        b = ours[image]
        assert float(b["score"]) == pytest.approx(float(a["score"]), rel=1e-4)
        assert (b["pred_label"], b["decision"], float(b["threshold"])) == \
               (a["pred_label"], a["decision"], float(a["threshold"]))


def _masks(out: Path) -> dict:
    return {Path(r["image"]).resolve(): np.array(Image.open(out / r["mask"])) for r in csv.DictReader(open(out / "scores.csv"))}


def test_ddad_predict_scores_an_exported_folder_in_openvino(exported, tmp_path):
    """`ddad predict EXPORT_DIR IMAGES --backend openvino --masks` (OpenVINO, in a process of its own) gives the
    run's scores, labels and pred_masks at each image's own size, as `ddad predict RUN` in PyTorch does."""
    root, run, folder = exported
    data = root / "data" / "washer" / "test"
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "torch"), "--quiet", "--no-images",
                 "--masks"]) == 0
    out = tmp_path / "openvino"
    result = subprocess.run([sys.executable, "-m", "ddad", "predict", str(folder), str(data), "--out", str(out),
                             "--backend", "openvino", "--masks"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ours = {Path(r["image"]).resolve(): r for r in csv.DictReader(open(out / "scores.csv"))}
    theirs = {Path(r["image"]).resolve(): r for r in csv.DictReader(open(tmp_path / "torch" / "scores.csv"))}
    assert ours.keys() == theirs.keys() and len(ours) == len(_files(root))
    for image, a in theirs.items():
        assert float(ours[image]["score"]) == pytest.approx(float(a["score"]), rel=1e-4)
        assert ours[image]["pred_label"] == a["pred_label"]
    masks, expected = _masks(out), _masks(tmp_path / "torch")
    assert any(m.any() for m in expected.values())  # some pixels flagged: the comparison means something
    for image, mask in expected.items():
        assert masks[image].shape == mask.shape == Image.open(image).size[::-1]
        assert (masks[image] != mask).mean() <= 0.002  # a map value on the threshold may round either way


def test_ddad_predict_refuses_settings_an_export_cannot_change(exported, tmp_path, capsys):
    root, run, folder = exported
    data = str(root / "data" / "washer" / "test")
    assert main(["predict", str(folder), data, "--out", str(tmp_path / "a"), "--w", "2", "--threshold", "1"]) == 2
    assert "--w, --threshold" in capsys.readouterr().err
    assert main(["predict", str(run), data, "--out", str(tmp_path / "b"), "--backend", "openvino"]) == 2
    assert "--backend openvino runs an exported folder" in capsys.readouterr().err
    assert main(["predict", str(run), data, "--out", str(tmp_path / "c"), "--int8"]) == 2
    assert "INT8 graphs of an exported folder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_runtime_runs_with_torch_unimportable(exported, tmp_path):
    """Imported and run (OpenVINO) where torch cannot be imported, as on a line PC without it; its scores equal
    the runtime's where torch is there (ONNX Runtime, to the backends' agreement)."""
    import ddad_infer

    root, run, folder = exported
    files = _files(root)
    expected = _runtime(folder, files, "onnxruntime", tmp_path)["score"].tolist()
    script = (
        "import sys, json\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'ddad'):\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ddad_infer\n"
        f"m = ddad_infer.load({str(folder)!r}, backend='openvino')\n"
        f"print(json.dumps([r.score for r in m.predict({[str(p) for p in files]!r})]))\n"
        "assert not any(k.split('.')[0] in ('torch', 'ddad') for k in sys.modules), 'torch was imported'\n")
    env = {**os.environ, "PYTHONPATH": str(Path(ddad_infer.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-4)


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


def test_a_folder_that_cannot_score_like_its_run_is_refused_naming_the_file(exported, tmp_path):
    import ddad_infer
    from ddad_infer import ExportError

    root, run, folder = exported
    # decisions chosen under another calibration key (thresholds of other settings)
    other = _copy(folder, tmp_path / "other-key")
    manifest = json.loads((other / "export.json").read_text())
    manifest["decisions_key"] = "0123456789abcdef"
    (other / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="chosen under calibration key 0123456789abcdef"):
        ddad_infer.load(other)
    # a truncated graph, for each backend's file
    for backend, name in (("onnxruntime", "unet.onnx"), ("openvino", "scorer.bin")):
        corrupt = _copy(folder, tmp_path / f"corrupt-{backend}")
        data = (corrupt / name).read_bytes()
        (corrupt / name).write_bytes(data[:len(data) // 2])
        with pytest.raises(ExportError, match=rf"graph file .*{name} is not the one this export wrote"):
            ddad_infer.load(corrupt, backend=backend)
    # a graph swapped in from another export: same refusal
    swapped = _copy(folder, tmp_path / "swapped")
    (swapped / "scorer.onnx").write_bytes((folder / "extractor.onnx").read_bytes())
    with pytest.raises(ExportError, match=r"scorer\.onnx is not the one"):
        ddad_infer.load(swapped, backend="onnxruntime")
    missing = _copy(folder, tmp_path / "missing")
    (missing / "unet.xml").unlink()
    with pytest.raises(ExportError, match=r"graph file .*unet\.xml is missing"):
        ddad_infer.load(missing, backend="openvino")
    with pytest.raises(ExportError, match="export.json not found"):
        ddad_infer.load(tmp_path)
    stale = _copy(folder, tmp_path / "stale")
    manifest = json.loads((stale / "export.json").read_text())
    manifest["format_version"] = 0
    (stale / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="format version 0"):
        ddad_infer.load(stale)


# --- the runtime's numpy parts, torch as the oracle ---------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, 2**63 - 1])
@pytest.mark.parametrize("shape", [(16,), (3, 7, 5), (4, 3, 16, 16), (2, 1, 33, 31)])
def test_the_noise_is_torchs_for_the_same_seed(seed, shape):
    from ddad_infer.noise import torch_randn

    expected = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
    np.testing.assert_allclose(torch_randn(seed, shape), expected, rtol=0, atol=2e-6)


def test_the_seed_is_ddads():
    from ddad.diffusion.sampler import image_seed as ddad_seed
    from ddad_infer.noise import image_seed

    image = torch.rand(3, 8, 8) * 2 - 1
    assert image_seed(image.numpy(), 3) == ddad_seed(image, 3) != image_seed(image.numpy(), 4)
    assert image_seed(image.numpy(), 3) != image_seed((image + 1e-7).numpy(), 3)


@pytest.mark.parametrize("eta,authors", [(1.0, False), (0.0, False), (0.5, True)])
def test_the_numpy_sampler_is_algorithm_1_as_ddad_runs_it(eta, authors):
    """Both samplers around the same denoiser (a fixed smooth function of x_t and t, written for each)."""
    from ddad.diffusion.sampler import SamplerConfig, conditioned_denoise
    from ddad.diffusion.schedule import ScheduleConfig, alphas_cumprod
    from ddad_infer.sampler import reconstruct

    table = alphas_cumprod(ScheduleConfig()).float()
    config = SamplerConfig(start_step=120, skip=30, w=2.5, eta=eta, authors_first_step=authors)
    images = torch.rand(3, 2, 8, 8) * 2 - 1
    seeds = [11, 12, 13]
    expected = conditioned_denoise(lambda x, t: torch.tanh(0.7 * x) + t.float().view(-1, 1, 1, 1) / 1000, images,
                                   images, table, config, seeds)
    got = reconstruct(lambda x, t: np.tanh(np.float32(0.7) * x) + (t.astype(np.float32) / 1000).reshape(-1, 1, 1, 1),
                      images.numpy(), table.numpy(), seeds, config.start_step, config.skip, config.w, eta, authors)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("size,out", [((300, 420), (64, 64)), ((100, 90), (224, 224)), ((77, 333), (32, 40)),
                                      ((5, 3), (1, 1))])
def test_the_resize_is_torchvisions_antialiased_bilinear(size, out):
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from ddad_infer.images import resize_bilinear

    image = np.random.default_rng(0).random((3, *size), dtype=np.float32)
    expected = TF.resize(torch.from_numpy(image), list(out), interpolation=InterpolationMode.BILINEAR, antialias=True)
    np.testing.assert_allclose(resize_bilinear(image, *out), expected.numpy(), atol=1e-5)
