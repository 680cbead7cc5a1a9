"""Issue 28, wall 3: datasets of different layouts combined into one MVTec-layout root (``ddad combine``), so
one model trains on all their categories; every link leads to its source's image and mask."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ddad.cli import main
from ddad.data.formats import DataConfig, build_index


def _kolektor(root):
    """KolektorSDD's layout: kosNN/PartK.jpg with PartK_label.bmp (a defect where the label has pixels)."""
    rng = np.random.default_rng(0)
    for folder in range(6):
        d = root / f"kos{folder:02d}"
        d.mkdir(parents=True)
        for part in range(2):
            Image.fromarray((rng.random((40, 24)) * 255).astype(np.uint8)).save(d / f"Part{part}.jpg")
            label = np.zeros((40, 24), np.uint8)
            if folder % 3 == 0 and part == 0:
                label[10:20, 5:15] = 255
            Image.fromarray(label).save(d / f"Part{part}_label.bmp")
    return root


def test_combine_links_every_source_image_and_mask_under_its_category(synth_root, tmp_path, capsys):
    kolektor = _kolektor(tmp_path / "kolektor")
    out = tmp_path / "combined"
    assert main(["combine", str(out), f"mvtec:{synth_root}", f"parts=kolektorsdd:{kolektor}"]) == 0
    assert "parts:" in capsys.readouterr().out
    combined = build_index(DataConfig(root=str(out), category="all", val_ratio=0.0))
    assert set(combined.categories) == {"stripes", "washer", "parts"}
    sources = {"parts": build_index(DataConfig(dataset="kolektorsdd", root=str(kolektor), val_ratio=0.0))}
    for c in ("stripes", "washer"):
        sources[c] = build_index(DataConfig(root=str(synth_root), category=c, val_ratio=0.0))
    for category, source in sources.items():
        for split in ("train", "test"):
            got = [s for s in getattr(combined, split) if s.category == category]
            want = getattr(source, split)
            assert sorted(s.image.resolve() for s in got) == sorted(s.image.resolve() for s in want), (category, split)
            labels = {s.image.resolve(): (s.label, None if s.mask is None else s.mask.resolve()) for s in want}
            for s in got:  # each test image keeps its label and its own mask
                assert (s.label, None if s.mask is None else s.mask.resolve()) == labels[s.image.resolve()]
    assert any(s.mask is not None for s in combined.test if s.category == "parts")
    # one category name from two sources, an unknown format, a missing folder: errors naming them
    assert main(["combine", str(tmp_path / "twice"), f"mvtec:{synth_root}:washer",
                 f"washer=kolektorsdd:{kolektor}"]) == 2
    assert "category 'washer' comes from both" in capsys.readouterr().err
    assert main(["combine", str(tmp_path / "bad"), f"nope:{synth_root}"]) == 2
    assert "[NAME=]FORMAT:ROOT[:CATEGORY]" in capsys.readouterr().err
    assert main(["combine", str(tmp_path / "bad"), f"mvtec:{tmp_path / 'missing'}"]) == 2
    assert "no such folder" in capsys.readouterr().err
