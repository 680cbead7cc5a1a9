from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ddad.diffusion.unet import UNet, UNetConfig, count_parameters, load_official_state_dict

from .conftest import SHARED

REFERENCE = SHARED / "reference"


def test_preset_parameter_counts_are_the_papers():
    assert count_parameters(UNet(UNetConfig.ddad())) == 32_952_707
    assert count_parameters(UNet(UNetConfig.ddad_s())) == 8_257_731


@pytest.mark.parametrize("size,channels", [(32, 3), (32, 1), (64, 1), (128, 3)])
def test_output_shape_matches_input(size, channels):
    cfg = UNetConfig(image_size=size, in_channels=channels, base_channels=32, num_res_blocks=1, num_heads=2)
    model = UNet(cfg).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 999])).shape == x.shape


# The authors' channel multipliers per image size (../shared/reference/README.md).
AUTHORS_CHANNEL_MULTS = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                         64: (1, 2, 3, 4), 32: (1, 2, 3, 4)}


@pytest.mark.parametrize("size", [32, 64, 128, 256, 512])
def test_all_paper_sizes_have_the_authors_channels_and_run(size):
    cfg = UNetConfig(image_size=size, base_channels=64 if size == 512 else 32, num_heads=2, num_res_blocks=1,
                     attention_resolutions=(size // 2 ** 4,))
    assert cfg.resolved_channel_mults == AUTHORS_CHANNEL_MULTS[size]
    model = UNet(cfg).eval()
    # the deepest level has base x the last multiplier channels, reached after len - 1 downsamplings
    widths = {m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert int(cfg.base_channels * AUTHORS_CHANNEL_MULTS[size][-1]) in widths
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model(x, torch.tensor([500]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unsupported_size_is_a_clear_error():
    with pytest.raises(ValueError, match="image_size=100"):
        UNetConfig(image_size=100)
    with pytest.raises(ValueError, match="multiple of 32"):
        UNetConfig(image_size=512, base_channels=32)


@pytest.mark.skipif(not (REFERENCE / "official-unet-tiny32.pt").is_file(), reason="../shared/reference absent")
def test_official_checkpoint_reproduces_stored_output():
    cfg = UNetConfig(image_size=32, in_channels=3, base_channels=32, channel_mults=(1, 2, 3, 4), num_heads=2)
    model = UNet(cfg).eval()
    load_official_state_dict(model, torch.load(REFERENCE / "official-unet-tiny32.pt", weights_only=True))
    io = load_file(str(REFERENCE / "official-unet-tiny32.io.safetensors"))
    with torch.no_grad():
        out = model(io["x"], io["t"].long())
    assert (out - io["expected"]).abs().max().item() < 1e-4


@pytest.mark.skipif(not (REFERENCE / "official-unet-ddad-256-rgb.keys.txt").is_file(), reason="../shared absent")
@pytest.mark.parametrize("preset,keys", [("ddad", "official-unet-ddad-256-rgb.keys.txt"),
                                          ("ddad-s", "official-unet-ddad-s-256-rgb.keys.txt")])
def test_state_dict_layout_is_the_authors(preset, keys):
    expected = {}
    for line in (REFERENCE / keys).read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            expected[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    own = {k: tuple(v.shape) for k, v in UNet(UNetConfig.preset(preset)).state_dict().items()}
    assert own == expected


def test_mismatched_checkpoint_is_rejected_with_names():
    model = UNet(UNetConfig.tiny(32))
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd.pop("module.out.2.weight")
    sd["module.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing.*out\.2\.weight.*unexpected.*extra"):
        load_official_state_dict(UNet(UNetConfig.tiny(32)), sd)
