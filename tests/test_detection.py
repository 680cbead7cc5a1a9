from __future__ import annotations

import pytest
import torch

from ddad.backbones import WeightsNotFound, create_backbone, resolve_weights
from ddad import DetectConfig, Detector, RuntimeConfig
from ddad.diffusion.sampler import SamplerConfig
from ddad.diffusion.schedule import ScheduleConfig, alphas_cumprod
from ddad.diffusion.unet import UNet, UNetConfig
from ddad.scoring import ScoringConfig, combine

from .conftest import MOBILENET

TABLE = alphas_cumprod(ScheduleConfig()).float()


def random_unet(size=32, seed=0):
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.tiny(size))
    for p in unet.parameters():  # zero-initialised output layers would make eps = 0
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    return unet.eval()


def mixed_batch(n=8, size=32):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    x[3] *= 0.1  # very different images in one batch
    x[5, :, 4:12, 4:12] = 1.0
    return x


@pytest.mark.parametrize("normalization", ["positional", "calibrated", "image"])
def test_score_and_map_do_not_depend_on_the_batch(normalization):
    cfg = DetectConfig(sampler=SamplerConfig(100, 25, w=2, eta=1),
                       scoring=ScoringConfig(mode="combined", sigma=1, normalization=normalization),
                       backbone="mobilenet_v2", crop=1.0)
    torch.manual_seed(0)
    extractor = create_backbone("mobilenet_v2", (2, 3), weights="random")
    det = Detector(random_unet(), cfg, extractor=extractor)
    x = mixed_batch()
    if normalization in ("positional", "calibrated"):
        det.calibrate(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1)
    batch = det(x)
    for i in (0, 3, 5):
        alone = det(x[i:i + 1])
        assert torch.allclose(alone.score, batch.score[i:i + 1], rtol=1e-5, atol=1e-6)
        assert torch.allclose(alone.anomaly_map, batch.anomaly_map[i:i + 1], rtol=1e-4, atol=1e-5)
    # The authors' batch normalisation of Eq. 9 does couple images: this test would catch it.
    authors = Detector(random_unet(), DetectConfig(**{**cfg.__dict__, "scoring": ScoringConfig(
        mode="combined", sigma=1, normalization="batch")}), extractor=extractor)
    assert not torch.allclose(authors(x[:1]).score, authors(x).score[:1], rtol=1e-3)


def calibration_detector(normalization: str) -> Detector:
    """A random UNet and backbone scoring combined maps (no smoothing), batches of 3."""
    cfg = DetectConfig(sampler=SamplerConfig(100, 25, w=2, eta=1),
                       scoring=ScoringConfig(mode="combined", sigma=0, normalization=normalization),
                       backbone="mobilenet_v2", crop=1.0)
    torch.manual_seed(0)
    return Detector(random_unet(), cfg, extractor=create_backbone("mobilenet_v2", (2, 3), weights="random"),
                    runtime=RuntimeConfig(batch_size=3))


def test_calibration_sets_eq9_maxima_from_good_images():
    """calibrate() stores the maxima of D_p and D_f over the good images (brute force here), and calibrated
    scoring is then Eq. 9 with those constants; scoring before calibrating is a clear error."""
    det = calibration_detector("calibrated")
    x = mixed_batch()
    with pytest.raises(RuntimeError, match=r"Detector\.calibrate"):
        det(x[:1])
    good = x[:5]
    d_p, d_f = zip(*(det.distances(det.reconstruct(good[i:i + 1]), good[i:i + 1]) for i in range(5)))
    # Batches of 3: in these three orders every image is once in a first and once in a last batch, so
    # maxima taken from one batch only would miss the true ones in some order.
    for shift in (0, 2, 3):
        scale = det.calibrate(good.roll(shift, dims=0))
        assert scale.n_images == 5
        assert scale.max_pixel == pytest.approx(max(float(d.max()) for d in d_p), rel=1e-5)
        assert scale.max_feature == pytest.approx(max(float(d.max()) for d in d_f), rel=1e-5)
    res = det(x[5:6])
    d_p, d_f = res.extras["pixel_distance"], res.extras["feature_distance"]
    expected = 1.0 * scale.max_feature / scale.max_pixel * d_p + d_f
    assert torch.allclose(res.anomaly_map, expected, rtol=1e-5, atol=1e-6)
    # per-image normalisation would stretch this image's own D_p to its own D_f peak: a different map
    per_image = combine(d_p, d_f, 1.0, "image")
    assert not torch.allclose(per_image, expected, rtol=1e-3)


def test_positional_calibration_takes_per_pixel_means_of_good_images():
    """With positional normalisation calibrate() stores the per-pixel means of D_p and D_f over the good
    images (brute force here) whatever the batch order, and scoring divides by them."""
    det = calibration_detector("positional")
    x = mixed_batch()
    good = x[:5]
    d_p, d_f = (torch.cat(d) for d in zip(*(det.distances(det.reconstruct(good[i:i + 1]), good[i:i + 1])
                                            for i in range(5))))
    for shift in (0, 2):
        scale = det.calibrate(good.roll(shift, dims=0))
        assert scale.positional and scale.n_images == 5
        assert torch.allclose(scale.mean_pixel, d_p.mean(0, keepdim=True).clamp(min=0.1 * float(d_p.mean())),
                              rtol=1e-5, atol=1e-7)
        assert torch.allclose(scale.mean_feature, d_f.mean(0, keepdim=True).clamp(min=0.1 * float(d_f.mean())),
                              rtol=1e-5, atol=1e-7)
    res = det(x[5:6])
    expected = (scale.max_feature / scale.max_pixel * res.extras["pixel_distance"] / scale.mean_pixel
                + res.extras["feature_distance"] / scale.mean_feature)
    assert torch.allclose(res.anomaly_map, expected, rtol=1e-5, atol=1e-6)


class Oracle(torch.nn.Module):
    """A denoiser that knows the defect-free image: its reconstruction is exactly ``clean``."""

    def __init__(self, clean):
        super().__init__()
        self.clean = clean

    def forward(self, xt, t):
        a = TABLE[t].view(-1, 1, 1, 1)
        return (xt - a.sqrt() * self.clean) / (1 - a).sqrt()


@pytest.mark.parametrize("mode,feature_size", [("pixel", None), ("combined", None), ("combined", 96)])
def test_defect_gets_the_highest_score(mode, feature_size):
    g = torch.Generator().manual_seed(0)
    clean = (torch.rand(1, 3, 32, 32, generator=g) * 0.2 - 0.1) + torch.linspace(-0.5, 0.5, 32)
    defective = clean.clone()
    defective[..., 20:25, 6:11] = torch.tensor([0.9, -0.8, -0.8]).view(1, 3, 1, 1)  # a red spot
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[20:25, 6:11] = True
    cfg = DetectConfig(sampler=SamplerConfig(250, 25, w=0, eta=0),
                       scoring=ScoringConfig(mode=mode, sigma=1, feature_size=feature_size),
                       backbone="mobilenet_v2", crop=1.0)
    torch.manual_seed(0)
    extractor = create_backbone("mobilenet_v2", (2, 3), weights="random") if mode != "pixel" else None
    det = Detector(UNet(UNetConfig.tiny(32)), cfg, extractor=extractor)
    det.unet = Oracle(clean)
    if mode == "combined":  # good images vary a little around the clean one; the oracle returns clean
        det.calibrate(clean + 0.02 * torch.randn(4, 3, 32, 32, generator=g))
    res = det(defective)
    if feature_size is not None:  # the backbone saw 96 px images; D_f is back at 32 px and differs
        assert res.extras["feature_distance"].shape == (1, 1, 32, 32)
        plain = Detector(det.unet, DetectConfig(**{**cfg.__dict__, "scoring": ScoringConfig(mode=mode, sigma=1)}),
                         extractor=extractor, score_scale=det.score_scale)
        assert not torch.allclose(plain.score(defective, res.reconstruction).extras["feature_distance"],
                                  res.extras["feature_distance"])
    assert torch.allclose(res.reconstruction, clean, atol=1e-4)
    amap = res.anomaly_map[0, 0]
    peak = divmod(int(amap.argmax()), 32)
    assert mask[peak], f"map peak {peak} is outside the defect"
    good = det(clean)
    assert res.score.item() > good.score.item()


def test_pixel_only_needs_no_backbone(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no backbone should be built")

    monkeypatch.setattr("ddad.methods.ddad.extractors.create_backbone", boom)
    from ddad.methods.ddad.extractors import load_extractor

    pixel = DetectConfig(sampler=SamplerConfig(50, 25), scoring=ScoringConfig(mode="pixel"))
    assert load_extractor(None, pixel, None, None) == (None, None)
    det = Detector(random_unet(), pixel)
    assert det.extractor is None and det(mixed_batch()[:2]).extras["feature_distance"] is None
    with pytest.raises(ValueError, match="needs a feature extractor"):
        Detector(random_unet(), DetectConfig(sampler=SamplerConfig(50, 25)))


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFound, match=r"wide_resnet101_2-32ee1156\.pth"):
        resolve_weights("wide_resnet101_2")
    with pytest.raises(WeightsNotFound, match="nope.pth"):
        resolve_weights("resnet18", str(tmp_path / "nope.pth"))


def test_backbone_stops_at_the_deepest_stage_used():
    ext = create_backbone("wide_resnet50_2", (2, 3), weights="random")
    assert len(ext.stages) == 3
    feats = ext(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1:] for f in feats] == [(512, 8, 8), (1024, 4, 4)]
    grey = ext(torch.zeros(1, 1, 64, 64))
    assert torch.allclose(grey[0], feats[0])


@pytest.mark.skipif(not MOBILENET.is_file(), reason="../shared/weights absent")
def test_real_mobilenet_weights_load_from_a_path():
    ext = create_backbone("mobilenet_v2", (1, 2, 3), weights=str(MOBILENET))
    f = ext(torch.zeros(2, 3, 64, 64))
    assert [t.shape[1] for t in f] == [24, 32, 96]
    import torchvision
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(MOBILENET, weights_only=True))
    assert torch.equal(ext.stages[0][0][0].weight, ref.features[0][0].weight)


@pytest.mark.parametrize("option", ["channels_last", "bf16", "micro_batch", "compile", "compile_channels_last"])
def test_speed_options_keep_the_scores(option):
    """channels_last, micro-batches and torch.compile (with weight freezing on the CPU) must not change a
    score beyond float noise; bf16 autocast stays within 2%."""
    cfg = DetectConfig(sampler=SamplerConfig(100, 25, w=2, eta=1),
                       scoring=ScoringConfig(mode="combined", sigma=1, normalization="image"),
                       backbone="mobilenet_v2", crop=1.0)
    x = mixed_batch()[:4]

    def extractor():
        return create_backbone("mobilenet_v2", (2, 3), weights="random")

    ref = Detector(random_unet(), cfg, extractor=extractor())(x)
    change = {"channels_last": {"channels_last": True}, "bf16": {},
              "micro_batch": {"micro_batch": 3}, "compile": {"compile": True},
              "compile_channels_last": {"compile": True, "channels_last": True, "micro_batch": 1}}[option]
    algorithm = DetectConfig(**{**cfg.__dict__, "precision": "bf16"}) if option == "bf16" else cfg
    fast = Detector(random_unet(), algorithm, extractor=extractor(), runtime=RuntimeConfig(**change))(x)
    tol = 2e-2 if option == "bf16" else 1e-4
    assert torch.allclose(fast.score, ref.score, rtol=tol)
    assert torch.allclose(fast.reconstruction, ref.reconstruction, atol=0.1 if option == "bf16" else 1e-3)


@pytest.mark.parametrize("name,channels", [("mobilenet_v2", [24, 32, 96, 320]), ("resnet18", [64, 128, 256, 512]),
                                           ("wide_resnet50_2", [256, 512, 1024, 2048])])
def test_feature_info_gives_each_stage_channels_and_stride(name, channels):
    ext = create_backbone(name, (1, 2, 3, 4), weights="random")
    assert ext.feature_info == [{"stage": i + 1, "channels": c, "stride": 4 * 2 ** i} for i, c in enumerate(channels)]
    feats = ext(torch.zeros(1, 3, 96, 96))
    assert [f.shape[1] for f in feats] == channels and [96 // f.shape[-1] for f in feats] == [4, 8, 16, 32]
