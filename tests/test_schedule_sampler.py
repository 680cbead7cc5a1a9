from __future__ import annotations

import math

import pytest
import torch

from ddad.diffusion.sampler import SamplerConfig, conditioned_denoise, denoising_steps, skip_for_steps
from ddad.diffusion.schedule import ScheduleConfig, alpha_bar, alphas_cumprod, q_sample

TABLE = alphas_cumprod(ScheduleConfig()).float()


@pytest.mark.parametrize("t", [0, 1, 249, 500, 999])
def test_alphas_cumprod_matches_formula(t):
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    expected = math.prod(1 - b for b in betas[: t + 1])
    assert alphas_cumprod(ScheduleConfig())[t].item() == pytest.approx(expected, rel=1e-12)


def test_clean_level_and_q_sample():
    assert alpha_bar(TABLE, -1).item() == 1.0
    x, n = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = torch.tensor([0, 999])
    xt = q_sample(x, t, n, TABLE)
    a = TABLE[999]
    assert torch.allclose(xt[1], a.sqrt() * x[1] + (1 - a).sqrt() * n[1])


def test_steps_start_at_t_prime_and_land_clean():
    steps = denoising_steps(SamplerConfig(start_step=250, skip=25))
    assert [t for t, _ in steps] == list(range(250, 0, -25))
    assert len(steps) == 10 and steps[-1][1] == -1
    authors = denoising_steps(SamplerConfig(start_step=250, skip=25, authors_first_step=True))
    assert authors[0][0] == 225 and authors[-1] == (0, -1) and len(authors) == 10
    assert skip_for_steps(250, 5) == 50 and SamplerConfig(skip=skip_for_steps(250, 25)).num_steps == 25


def wavy(x, t):
    return torch.tanh(0.7 * x + t.view(-1, 1, 1, 1).float() / 1000.0)


def plain_ddim(model, x, seed, start, skip):
    """Reference DDIM (eta = 0) written independently of the library's sampler."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(x.shape[1:], generator=g)[None]
    a = TABLE[start]
    xt = a.sqrt() * x + (1 - a).sqrt() * n
    t = start
    while t > 0:
        a_t = TABLE[t]
        a_prev = TABLE[t - skip] if t - skip > 0 else torch.tensor(1.0)
        eps = model(xt, torch.tensor([t]))
        x0 = (xt - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        xt = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        t -= skip
    return xt


def test_w0_eta0_is_plain_ddim():
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    y = torch.rand(1, 3, 8, 8) * 2 - 1  # the target is ignored when w = 0
    out = conditioned_denoise(wavy, x, y, TABLE, SamplerConfig(250, 25, w=0.0, eta=0.0), seeds=[7])
    ref = plain_ddim(wavy, x, 7, 250, 25)
    assert torch.allclose(out, ref, atol=1e-5)
    # and the conditioning really acts when w > 0
    out_w = conditioned_denoise(wavy, x, y, TABLE, SamplerConfig(250, 25, w=3.0, eta=0.0), seeds=[7])
    assert not torch.allclose(out_w, ref, atol=1e-3)


def oracle(clean):
    """A perfect denoiser for the image ``clean``: its noise estimate reconstructs ``clean`` exactly."""
    def model(xt, t):
        a = TABLE[t].view(-1, 1, 1, 1)
        return (xt - a.sqrt() * clean) / (1 - a).sqrt()
    return model


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_conditioning_pulls_the_reconstruction_toward_the_target(eta):
    torch.manual_seed(0)
    clean = torch.rand(1, 3, 8, 8) * 2 - 1
    y = clean.clone()
    y[..., 2:5, 2:5] = 1.0  # target with a "defect"
    plain = conditioned_denoise(oracle(clean), y, y, TABLE, SamplerConfig(250, 25, w=0.0, eta=eta), seeds=[1])
    guided = conditioned_denoise(oracle(clean), y, y, TABLE, SamplerConfig(250, 25, w=4.0, eta=eta), seeds=[1])
    assert torch.allclose(plain, clean, atol=1e-4)  # plain diffusion lands on the model's image
    assert (guided - y).norm() < (plain - y).norm()
    # With a perfect denoiser Eq. 6 gives f = c + w (1 - a_t)(y - c) at every step; the last step
    # (t = 25 -> clean) returns it, so the result is known in closed form.
    a_last = TABLE[25]
    assert torch.allclose(guided, clean + 4.0 * (1 - a_last) * (y - clean), atol=1e-4)


def test_noise_is_per_image_and_reproducible():
    x = torch.rand(3, 1, 8, 8)
    cfg = SamplerConfig(100, 20, w=1.0, eta=1.0)
    batch = conditioned_denoise(wavy, x, x, TABLE, cfg, seeds=[5, 6, 7])
    alone = conditioned_denoise(wavy, x[1:2], x[1:2], TABLE, cfg, seeds=[6])
    assert torch.allclose(batch[1:2], alone, atol=1e-6)
    other = conditioned_denoise(wavy, x[1:2], x[1:2], TABLE, cfg, seeds=[8])
    assert not torch.allclose(other, alone, atol=1e-4)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="skip"):
        SamplerConfig(start_step=10, skip=20)
    with pytest.raises(ValueError, match="one seed per image"):
        conditioned_denoise(wavy, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), TABLE, SamplerConfig(), [1])
