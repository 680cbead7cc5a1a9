"""DRDC part 1: the neighbour-masked transformer, feature jitter, cached features, and one model trained on
two categories at once, tested per category through the shared engine."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from ddad.backbones import create_backbone
from ddad.cli import main
from ddad.data.dataset import ImageSet
from ddad.data.formats import DataConfig, build_index
from ddad.methods.drdc.features import token_features
from ddad.methods.drdc.layers import MaskedAttention, additive_mask
from ddad.methods.drdc.model import EncoderLayer, FeatureReconstructor, neighbour_mask
from ddad.methods.drdc.settings import ReconstructionConfig
from ddad.runs import RunDir

from .conftest import MOBILENET

SMALL = ReconstructionConfig(hidden=32, encoder_layers=1, decoder_layers=1, heads=4, ffn=64, dropout=0.0,
                             neighbour=3, jitter_scale=20.0)


def test_the_neighbour_mask_forbids_exactly_the_k_by_k_neighbourhood():
    grid, k = 6, 3
    mask = neighbour_mask(grid, k)
    for i in range(grid * grid):  # brute force
        yi, xi = divmod(i, grid)
        for j in range(grid * grid):
            yj, xj = divmod(j, grid)
            assert bool(mask[i, j]) == (abs(yi - yj) <= 1 and abs(xi - xj) <= 1)
    # and the attention really puts zero weight there, and some weight everywhere else
    torch.manual_seed(0)
    layer = EncoderLayer(SMALL).eval()
    x = torch.randn(2, grid * grid, SMALL.hidden)
    weights = layer.attn.attention_weights(x, x, additive_mask(mask))
    assert weights.shape == (2, SMALL.heads, grid * grid, grid * grid)
    assert torch.all(weights[:, :, mask] == 0) and torch.all(weights[:, :, ~mask] > 0)
    assert neighbour_mask(grid, 0) is None
    with pytest.raises(ValueError, match="hides every token"):
        FeatureReconstructor(8, 2, ReconstructionConfig(neighbour=3, hidden=32, heads=4))


def test_jitter_is_on_in_training_only():
    torch.manual_seed(0)
    model = FeatureReconstructor(8, 4, SMALL)
    f = torch.randn(2, 8, 4, 4)
    noise = torch.randn(2, 8, 4, 4)
    model.eval()
    assert torch.equal(model(f), model(f)) and torch.equal(model(f, noise), model(f))  # evaluation: no jitter
    model.train()
    assert not torch.allclose(model(f, noise), model(f))  # training: the noise changes the input
    manual = f + noise * f.norm(dim=1, keepdim=True) / 8 * 20.0
    assert torch.allclose(model(f, noise), model(manual))  # noise of each token's norm / C, times the scale


def test_cached_features_equal_fresh_ones(synth_root, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--method", "drdc", "--data-root", str(synth_root), "--category", "washer",
                 "--image-size", "32", "--max-steps", "1", "--batch-size", "4", "--backbone", "mobilenet_v2",
                 "--backbone-weights", "random", "--set", "features.grid=4", "--set", "model.hidden=32",
                 "--set", "model.heads=4", "--set", "model.neighbour=3", "--set", "refine.enabled=false",
                 "--run-dir", str(run), "--quiet"]) == 0
    cached = list((run / "cache").glob("features-*.safetensors"))
    assert len(cached) == 1
    from safetensors.torch import load_file

    stored = load_file(str(cached[0]))["features"]
    index = build_index(DataConfig(root=str(synth_root), category="washer", image_size=32))
    torch.manual_seed(0)
    extractor = create_backbone("mobilenet_v2", (1, 2, 3, 4), weights="random", strides=(2, 4, 8, 16))
    fresh = token_features(extractor, ImageSet(index.train, 32, 3).stack(), 4)
    assert stored.shape == (len(index.train), 16 + 24 + 32 + 96, 4, 4) and torch.allclose(stored, fresh, atol=1e-5)


def _train_two_categories(root, run, *extra, weights="random") -> int:
    return main(["train", "--method", "drdc", "--data-root", str(root), "--category", "stripes,washer",
                 "--image-size", "32", "--batch-size", "8", "--backbone", "mobilenet_v2", "--backbone-weights",
                 str(weights), "--set", "features.grid=8", "--set", "model.hidden=64", "--set", "model.heads=4",
                 "--set", "model.encoder_layers=1", "--set", "model.decoder_layers=1", "--set", "model.ffn=128",
                 "--set", "model.neighbour=3", "--set", "model.dropout=0.0", "--set", "train.lr=0.001",
                 "--set", "detect.pool=4", "--set", "refine.enabled=false", "--run-dir", str(run), "--quiet",
                 *extra])


# Real ImageNet features where ../shared has them (CI does); random ones localise nothing on this data.
REAL_WEIGHTS = MOBILENET if MOBILENET.is_file() else None


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    from ddad.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("drdc") / "data"
    generate(root, SynthConfig(size=32, train=16, test_good=4, test_defective_per_type=2, seed=1))
    run = root.parent / "run"
    assert _train_two_categories(root, run, "--max-steps", "150", weights=REAL_WEIGHTS or "random") == 0
    assert main(["test", str(run), "--quiet"]) == 0
    return root, run


def test_per_category_metrics_equal_a_brute_force_reference(unified):
    """Each category's metrics and their mean, against scipy's Mann-Whitney U on the model's own maps."""
    root, run = unified
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert set(metrics["categories"]) == {"stripes", "washer"}
    rows = list(csv.DictReader(open(run / "test" / "scores.csv")))
    from ddad import load_config
    from ddad.data.splits import load_test_split
    from ddad.methods.drdc import DRDC

    config = load_config(run)
    loaded = DRDC().load(RunDir(run), config)
    split = load_test_split(config.data, progress=False)
    result = loaded.detect(split.images)
    assert [float(r["score"]) for r in rows] == pytest.approx(result.score.tolist(), rel=1e-5)
    for category, m in metrics["categories"].items():
        sel = np.array([s.category == category for s in split.samples])
        maps, masks = result.anomaly_map[sel][:, 0].numpy(), split.masks[sel][:, 0].numpy() > 0.5
        bad, good = maps[masks], maps[~masks]
        # defective pixels score above good ones, in each category (pixel AUROC > 0.5 by a margin)
        reference = mannwhitneyu(bad, good).statistic / (len(bad) * len(good))
        assert m["pixel_auroc"] == pytest.approx(reference, rel=1e-6), category
        scores, labels = result.score[sel].numpy(), split.labels[sel]
        image_reference = mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic / (
            (labels == 1).sum() * (labels == 0).sum())
        assert m["image_auroc"] == pytest.approx(image_reference, abs=1e-12)
    assert metrics["category_mean"]["pixel_auroc"] == pytest.approx(
        np.mean([m["pixel_auroc"] for m in metrics["categories"].values()]))


@pytest.mark.skipif(REAL_WEIGHTS is None, reason="../shared/weights absent (random features localise nothing)")
def test_one_model_for_two_categories_localises_defects_in_each(unified):
    """150 steps on both categories at once: in each, defective pixels score above good ones and defective
    images above good ones (measured 0.83 / 0.99 pixel AUROC, 1.0 / 1.0 image AUROC)."""
    _, run = unified
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    for category, m in metrics["categories"].items():
        assert m["pixel_auroc"] > 0.75 and m["image_auroc"] > 0.8, (category, m)


def test_a_category_absent_from_training_is_named(unified, tmp_path, capsys):
    root, run = unified
    (root / "bolts").symlink_to(root / "washer", target_is_directory=True)
    try:
        assert main(["test", str(run), "--quiet", "--no-images", "--out", str(tmp_path / "t")]) == 0  # as trained
        import shutil

        other = tmp_path / "run"
        shutil.copytree(run, other)
        text = (other / "config.yaml").read_text().replace("category: stripes,washer", "category: stripes,bolts")
        (other / "config.yaml").write_text(text)
        assert main(["test", str(other), "--quiet", "--no-images"]) == 2
        err = capsys.readouterr().err
        assert "'bolts'" in err and "stripes, washer" in err
    finally:
        (root / "bolts").unlink()


def test_drdc_resumes_exactly(tmp_path, synth_root):
    from ddad.checkpoint import Checkpoint

    full, part = tmp_path / "full", tmp_path / "part"
    assert _train_two_categories(synth_root, full, "--epochs", "3", "--set", "model.dropout=0.1") == 0
    assert _train_two_categories(synth_root, part, "--epochs", "3", "--max-steps", "3",
                                 "--set", "model.dropout=0.1") == 0
    assert main(["train", "--resume", "--run-dir", str(part), "--max-steps", "100", "--quiet"]) == 0
    a, b = Checkpoint(RunDir(full).latest_checkpoint()), Checkpoint(RunDir(part).latest_checkpoint())
    assert a.info["step"] == b.info["step"] == 6
    for k, v in a.tensors.items():
        assert torch.equal(v, b.tensors[k]), k


def test_the_neighbour_mask_reaches_every_attention_as_the_model_runs():
    """Every attention of the running model (encoder self-attention, decoder self- and cross-attention) gets
    the k x k mask; and a token's layer output does not move when a token inside its window changes."""
    grid = 6
    torch.manual_seed(0)
    model = FeatureReconstructor(8, grid, SMALL).eval()
    attentions = {name: m for name, m in model.named_modules() if isinstance(m, MaskedAttention)}
    assert len(attentions) == 3  # one encoder layer, one decoder layer with two attentions
    given = {}

    def record(name):
        return lambda module, args, kwargs: given.__setitem__(name, args[3] if len(args) > 3 else kwargs.get("mask"))

    handles = [m.register_forward_pre_hook(record(name), with_kwargs=True) for name, m in attentions.items()]
    model(torch.randn(2, 8, grid, grid))
    for h in handles:
        h.remove()
    expected = torch.tensor([[abs(i // grid - j // grid) <= 1 and abs(i % grid - j % grid) <= 1
                              for j in range(grid * grid)] for i in range(grid * grid)])
    assert set(given) == set(attentions)
    for name, mask in given.items():
        assert mask is not None and torch.equal(mask == float("-inf"), expected) and torch.all(mask[~expected] == 0), name
    # behaviour: token i = (2, 2); j = (3, 3) lies in its 3 x 3 window, far = (5, 5) does not
    i, j, far = 2 * grid + 2, 3 * grid + 3, 5 * grid + 5
    pos = model.pos.detach()
    x = torch.randn(1, grid * grid, SMALL.hidden)
    for change in (j, far):
        y = x.clone()
        y[0, change] += 3.0
        encoder = model.encoder[0]
        moved = not torch.allclose(encoder(x, pos, model.mask)[0, i], encoder(y, pos, model.mask)[0, i], atol=1e-6)
        assert moved == (change == far), ("encoder", change)
        decoder = model.decoder[0]
        moved = not torch.allclose(decoder(x, pos, model.mask)[0, i], decoder(y, pos, model.mask)[0, i], atol=1e-6)
        assert moved == (change == far), ("decoder cross-attention", change)
        # the decoder's own queries attend to each other under the mask too
        with torch.no_grad():
            before = decoder(x, pos, model.mask)[0, i]
            saved = decoder.query[change].clone()
            decoder.query[change] += 3.0
            after = decoder(x, pos, model.mask)[0, i]
            decoder.query[change] = saved
        assert (not torch.allclose(before, after, atol=1e-6)) == (change == far), ("decoder self-attention", change)


def test_feature_jitter_follows_the_objectives_coin_and_probability():
    """The path training takes: FeatureReconstructionObjective draws a coin and noise per batch and jitters
    the batch when coin < jitter_prob (and jitter_scale > 0), against a loss computed by hand."""
    import torch.nn.functional as F

    from ddad.methods.drdc.model import FeatureReconstructionObjective

    f = torch.randn(3, 8, 4, 4)
    for prob, scale in ((0.0, 20.0), (1.0, 20.0), (0.5, 20.0), (1.0, 0.0)):
        cfg = ReconstructionConfig(hidden=32, encoder_layers=1, decoder_layers=1, heads=4, ffn=64, dropout=0.0,
                                   neighbour=3, jitter_scale=scale, jitter_prob=prob)
        torch.manual_seed(0)
        model = FeatureReconstructor(8, 4, cfg).train()
        objective = FeatureReconstructionObjective(cfg)
        gen = torch.Generator().manual_seed(5)
        outcomes = set()
        for _ in range(12):
            coin, noise = draws = objective.draw(3, (8, 4, 4), gen)
            assert coin.shape == () and noise.shape == (3, 8, 4, 4)
            jittered = float(coin) < prob and scale > 0
            outcomes.add(jittered)
            seen = f + noise * f.norm(dim=1, keepdim=True) / 8 * scale if jittered else f
            with torch.no_grad():
                plain = model.eval()(seen)  # dropout 0: the same network, nothing random left
                model.train()
                loss = objective.loss(model, f, draws)
            assert loss.item() == pytest.approx(F.mse_loss(plain, f).item(), rel=1e-5), (prob, scale)
        assert outcomes == ({True, False} if prob == 0.5 else {prob == 1.0 and scale > 0})
