"""A factory user's first hour (issue 16): each wall a newcomer hit, reproduced on small generated data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddad.cli import build_parser, main
from ddad.cli.settings import train_settings
from ddad.data.io import DatasetError, read_image
from ddad.runs import RunDir


def _folder_data(root: Path, n_good=10, n_bad=3, size=(40, 24)) -> Path:
    """anomalib's Folder layout: good/, bad/, masks/ of parts W x H (not square)."""
    rng = np.random.default_rng(0)
    for sub in ("good", "bad", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n_good):
        Image.fromarray((rng.random((h, w, 3)) * 40 + 100).astype(np.uint8)).save(root / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        img = (rng.random((h, w, 3)) * 40 + 100).astype(np.uint8)
        img[5:10, 8:16] = 250
        mask = np.zeros((h, w), np.uint8)
        mask[5:10, 8:16] = 255
        Image.fromarray(img).save(root / "bad" / f"b{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"b{i}.png")
    return root


def _train(root: Path, run: Path, *extra: str) -> int:
    return main(["train", "--dataset", "folder", "--normal-dir", str(root / "good"), "--abnormal-dir",
                 str(root / "bad"), "--mask-dir", str(root / "masks"), "--image-size", "16", "--model", "tiny",
                 "--epochs", "1", "--batch-size", "4", "--run-dir", str(run), "--quiet",
                 "--set", "detect.sampler.start_step=50", "--set", "detect.crop=1.0", *extra])


def _parse(*argv: str):
    return train_settings(build_parser().parse_args(["train", *argv]))[0]


def test_wall1_a_run_trained_with_the_readme_install_tests_with_it(tmp_path, monkeypatch, capsys):
    """Without wide_resnet101_2's weights the run stores a backbone whose weights are here (or scores
    pixel-wise), train takes --backbone, and the missing-weights error names what works now."""
    monkeypatch.setattr("ddad.backbones.available_backbones", lambda: ["mobilenet_v2"])
    config = _parse("--data-root", "d")
    assert config.detect.backbone == "mobilenet_v2" and config.detect.scoring.mode == "combined"
    assert _parse("--data-root", "d", "--backbone", "resnet18").detect.backbone == "resnet18"
    assert _parse("--data-root", "d", "--preset", "mvtec", "--category", "cable").detect.backbone == "wide_resnet101_2"
    monkeypatch.setattr("ddad.backbones.available_backbones", lambda: [])
    config = _parse("--data-root", "d")
    assert config.detect.scoring.mode == "pixel" and "scores pixel-wise" in capsys.readouterr().out
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr("ddad.backbones.available_backbones", lambda: ["mobilenet_v2"])
    from ddad.backbones import WeightsNotFound, resolve_weights

    with pytest.raises(WeightsNotFound, match=r"--backbone mobilenet_v2.*--pixel-only"):
        resolve_weights("wide_resnet101_2")


def test_wall2_stored_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    _folder_data(tmp_path / "parts")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dataset", "folder", "--normal-dir", "parts/good", "--abnormal-dir", "parts/bad",
                 "--image-size", "16", "--model", "tiny", "--epochs", "1", "--batch-size", "4", "--quiet",
                 "--set", "detect.scoring.mode=pixel", "--set", "detect.sampler.start_step=50"]) == 0
    run = tmp_path / "runs" / "folder-good"  # folder runs are named after the folder
    stored = RunDir(run).read_config()["data"]
    assert stored["normal_dir"] == str(tmp_path / "parts" / "good") and Path(stored["abnormal_dir"]).is_absolute()
    monkeypatch.chdir(run)
    assert main(["test", ".", "--quiet", "--no-images"]) == 0


def test_wall3_a_bad_test_file_stops_training_before_it_starts(tmp_path, capsys):
    root = _folder_data(tmp_path / "parts")
    (root / "bad" / "b1.png").write_bytes(b"not a png")
    Image.new("L", (7, 7)).save(root / "masks" / "b2.png")  # a mask of the wrong size
    assert _train(root, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "2 of the 5 test images cannot be read" in err and "b1.png" in err and "b2.png" in err
    assert "--skip-bad-files" in err and not (tmp_path / "run" / "checkpoints").exists()
    assert _train(root, tmp_path / "run", "--skip-bad-files", "--set", "detect.scoring.mode=pixel") == 0
    assert "skipped 2 unreadable test file(s)" in capsys.readouterr().out
    assert main(["test", str(tmp_path / "run"), "--quiet", "--no-images"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "test" / "scores.csv")))
    assert len(rows) == 3 and not any(r["image"].endswith(("b1.png", "b2.png")) for r in rows)


def test_wall4_huge_images_are_refused_by_name_or_decoded_small(tmp_path, monkeypatch):
    monkeypatch.setenv("DDAD_MAX_IMAGE_PIXELS", str(1000 * 1000))
    Image.new("L", (1200, 1000)).save(tmp_path / "huge.png")
    with pytest.raises(DatasetError, match=r"huge\.png is 1200 x 1000 = 1 megapixels.*DDAD_MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "huge.png", 1, 32)
    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(tmp_path / "huge.jpg", quality=90)
    x = read_image(tmp_path / "huge.jpg", 3, 32)  # JPEG: decoded at 1/8 scale, under the cap
    assert x.shape == (3, 32, 32) and abs(float(x[0].mean()) - (200 / 127.5 - 1)) < 0.05
    monkeypatch.setenv("DDAD_MAX_IMAGE_PIXELS", str(100))
    with pytest.raises(DatasetError, match="huge.jpg"):
        read_image(tmp_path / "huge.jpg", 3, 32)  # even 1/8 is over this cap


def test_wall7_predict_skips_unreadable_files_cleans_its_output_and_leaves_masks_out(tmp_path, capsys):
    root = _folder_data(tmp_path / "parts")
    run = tmp_path / "run"
    assert _train(root, run, "--set", "detect.scoring.mode=pixel") == 0
    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(3):
        Image.open(root / "good" / f"{i:03d}.png").save(folder / f"part{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    (folder / "part0_label.png").write_bytes((root / "masks" / "b0.png").read_bytes())
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "stale.png").write_bytes(b"old")
    assert main(["predict", str(run), str(folder), "--out", str(out), "--threshold", "1", "--quiet",
                 "--exclude", "*_label.*"]) == 0
    rows = {Path(r["image"]).name: r for r in csv.DictReader(open(out / "scores.csv"))}
    assert set(rows) == {"part0.png", "part1.png", "part2.png", "broken.png"}
    assert rows["broken.png"]["score"] == "" and "cannot decode" in rows["broken.png"]["error"]
    assert all(rows[f"part{i}.png"]["decision"] in ("good", "defective") for i in range(3))
    assert sorted(p.name for p in (out / "images").iterdir()) == ["part0.png", "part1.png", "part2.png"]
    assert "1 unreadable" in capsys.readouterr().out


def test_wall7_masks_of_the_runs_format_are_not_scored(tmp_path):
    from ddad.data.splits import collect_images

    (tmp_path / "kos01").mkdir()
    for name in ("Part0.jpg", "Part0_label.bmp", "Part1.jpg", "Part1_label.bmp"):
        Image.new("L", (8, 8)).save(tmp_path / "kos01" / name)
    assert [p.name for p in collect_images([tmp_path], dataset="kolektorsdd")] == ["Part0.jpg", "Part1.jpg"]
    assert len(collect_images([tmp_path])) == 4


def test_wall8_cpu_defaults_help_and_version(tmp_path, capsys):
    config = _parse("--data-root", "d", "--image-size", "64", "--device", "cpu")
    assert config.model.num_res_blocks == 1 and config.model.base_channels == 32  # compact, not ddad's 64 base
    assert _parse("--data-root", "d", "--image-size", "256", "--device", "cpu").model.base_channels == 64
    assert _parse("--data-root", "d", "--image-size", "64", "--model", "ddad-s").model.num_res_blocks == 2
    main_help = build_parser().format_help()
    assert "--version" in main_help
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("ddad ")
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not a.help and a.dest != "help"]
    assert not missing, missing
    train_help = sub.choices["train"].format_help()
    assert "(default 1000)" in train_help and "(default 16)" in train_help  # epochs, batch size
    assert "default: 64" in sub.choices["synth"].format_help()


def test_wall8_the_progress_bar_follows_the_time_budget(tmp_path, monkeypatch):
    import ddad.engine.trainer as trainer

    from .test_training import images, tiny_config, train

    import tqdm.auto

    totals = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            totals.append((self.total, self.unit))

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    cfg = tiny_config(epochs=1000, max_minutes=0.5)
    run = RunDir(tmp_path / "r")
    run.save_config(cfg)
    now = [0.0]
    monkeypatch.setattr(trainer, "clock", lambda: now[0])

    def tick(epoch, step, loss):
        now[0] += 10.0

    train(run, cfg, images(8), progress=True, on_step=tick)
    assert totals[0] == (30, "s")  # 30 s of budget, not 1000 epochs of steps


def test_wall9_float_tiffs_keep_their_range(tmp_path):
    values = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    x = read_image(tmp_path / "f.tif", 1)
    assert torch.allclose(x[0], torch.from_numpy(values) * 2 - 1, atol=1e-6)
    Image.fromarray((values * 200).astype(np.float32), mode="F").save(tmp_path / "f255.tif")
    assert torch.allclose(read_image(tmp_path / "f255.tif", 1)[0], torch.from_numpy(values * 200 / 255) * 2 - 1,
                          atol=1e-5)
    Image.fromarray(values - 0.5, mode="F").save(tmp_path / "neg.tif")
    with pytest.raises(DatasetError, match=r"neg\.tif.*\[-0\.5, 0\.5\]"):
        read_image(tmp_path / "neg.tif", 1)


def test_wall10_panels_share_test_colours_with_predict_and_carry_a_colour_bar(tmp_path):
    import json

    root = _folder_data(tmp_path / "parts")
    run = tmp_path / "run"
    assert _train(root, run, "--set", "detect.scoring.mode=pixel") == 0
    assert main(["test", str(run), "--quiet", "--report"]) == 0
    stored = json.loads((run / "threshold.json").read_text())
    lo, hi = stored["colour_scale"]
    assert lo < hi
    from ddad.engine import predicting

    seen = []
    real = predicting.panel

    def spy(*args, **kwargs):
        seen.append(args[5:7])
        return real(*args, **kwargs)

    predicting.panel = spy
    try:
        assert main(["predict", str(run), str(root / "good"), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    finally:
        predicting.panel = real
    assert seen and all(tuple(v) == (lo, hi) for v in seen)  # the test's colour scale, not predict's own
    page = (run / "report" / "index.html").read_text()
    assert "before any test image was read" in page and "40x24" in page and "without keeping the aspect ratio" in page
    panel = np.asarray(Image.open(next((run / "test" / "images").glob("*.png"))).convert("RGB"))
    # the colour bar under the heatmap: a row whose colours run from the map's cold blue to its hot red
    rows = [r for r in panel if r[:, 2].max() > 150 and r[:, 0].max() > 150 and len(np.unique(r, axis=0)) > 50]
    assert rows, "no colour bar in the panel"


def test_colour_bar_labels_never_overlap_wherever_the_threshold_falls():
    """Issue 28, wall 8 ('1.42' over 'threshold', '2.63threshold'): each label's box, measured by PIL, clears
    the others on its row and lies inside the bar; the threshold's label sits under its mark where it can."""
    from PIL import ImageDraw

    from ddad.visualize import colour_bar, colour_bar_labels

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    for width, (vmin, vmax) in ((96, (0.0, 1.45)), (64, (0.0213, 2.63)), (128, (-1.5, 12.25))):
        for t in np.linspace(vmin, vmax, 41)[1:-1]:
            labels = colour_bar_labels(width, vmin, vmax, float(t))
            assert [text for text, _, _ in labels][2] == "threshold"
            boxes = [(x, x + measure(text), row) for text, x, row in labels]
            assert all(0 <= a and b <= width for a, b, _ in boxes)
            for i, (a1, b1, r1) in enumerate(boxes):
                for a2, b2, r2 in boxes[i + 1:]:
                    assert r1 != r2 or b1 <= a2 or b2 <= a1, (width, t, labels)
            mark = (t - vmin) / (vmax - vmin) * (width - 1)
            a, b, _ = boxes[2]
            assert a <= mark <= b or a == 0 or b >= width - 1  # under its mark unless held at an end
            image = colour_bar(width, vmin, vmax, float(t))
            assert image.height == 10 + 14 * (1 + max(r for _, _, r in boxes))
    assert len(colour_bar_labels(96, 0.0, 1.0, None)) == 2 and len(colour_bar_labels(96, 0.0, 1.0, 1.0)) == 2


def test_grey_photos_train_grey_and_the_demo_follows_the_validation_workflow(tmp_path, capsys, monkeypatch):
    """Issue 28, walls 13 and 14."""
    from ddad import api
    from ddad.cli.parser import build_parser
    from ddad.cli.settings import train_settings

    def settings(root, *extra):
        return train_settings(build_parser().parse_args(["train", "--dataset", "folder", "--normal-dir",
                                                         str(root / "good"), *extra]))[0]

    rng = np.random.default_rng(0)
    grey = tmp_path / "grey"
    (grey / "good").mkdir(parents=True)
    for i in range(20):  # grey photos saved as RGB, and one saved as L
        level = (rng.random((24, 40)) * 200).astype(np.uint8)
        Image.fromarray(np.stack([level] * 3, axis=-1)).save(grey / "good" / f"{i:03d}.png")
    Image.fromarray(level).save(grey / "good" / "999.png")
    capsys.readouterr()
    assert settings(grey).data.channels == 1
    assert "channels: 1" in capsys.readouterr().out
    assert settings(grey, "--channels", "3").data.channels == 3  # a choice is kept
    assert "channels: 1" not in capsys.readouterr().out
    for i in range(0, 20, 3):  # some colour images among them: colour
        Image.fromarray((rng.random((24, 40, 3)) * 200).astype(np.uint8)).save(grey / "good" / f"{i:03d}.png")
    assert settings(grey).data.channels == 3
    # the demo holds out validation images and chooses its threshold on them
    seen = {}

    class Stop(Exception):
        pass

    def capture(config, *args, **kwargs):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(api, "train_run", capture)
    with pytest.raises(Stop):
        api.demo(tmp_path / "demo", progress=False)
    assert seen["config"].data.val_ratio > 0


def test_issue28_wall1_cpu_defaults_fit_the_machine_and_say_so(capsys, monkeypatch):
    """A DDAD run that names no image size or budget trains on a CPU at 64 px for 10 minutes (said on stdout),
    where the paper's 256 px at batch 16 needed ~19 GB and stopped before its first step."""
    from ddad.cli import settings

    config = _parse("--data-root", "d", "--device", "cpu")
    out = capsys.readouterr().out
    assert config.data.image_size == 64 == config.model.image_size and config.train.max_minutes == 10.0
    assert "image size: 64 px (the default on a CPU" in out and "budget: 10 minutes" in out
    assert config.model.base_channels == 32  # the compact UNet that 64 px brings
    # each named setting stays as given, and one named does not bring the other's default back
    given = _parse("--data-root", "d", "--device", "cpu", "--image-size", "128", "--max-steps", "7")
    assert given.data.image_size == 128 and given.train.max_minutes is None and given.train.max_steps == 7
    by_set = _parse("--data-root", "d", "--device", "cpu", "--set", "data.image_size=128")
    assert by_set.data.image_size == 128 and by_set.train.max_minutes == 10.0
    assert _parse("--data-root", "d", "--device", "cpu", "--set", "train.max_steps=5").train.max_minutes is None
    assert _parse("--data-root", "d", "--device", "cpu", "--epochs", "3").data.image_size == 64
    assert _parse("--data-root", "d", "--preset", "mvtec", "--category", "cable").data.image_size == 256
    monkeypatch.setattr(settings, "CPU_IMAGE_SIZE", 256)
    assert _parse("--data-root", "d", "--device", "cpu").data.image_size == 256  # the constant decides
