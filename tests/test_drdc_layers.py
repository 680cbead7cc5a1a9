"""DRDC's transformer layers written for the CPU (issue 27, part 5): the masked attention is
``nn.MultiheadAttention`` (the oracle) in parameters, outputs and gradients; the transformer scores as it did
when built from ``nn.MultiheadAttention``; the dropout mask has the asked rate, independent elements and an
unbiased scale."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from ddad.methods.drdc.layers import MaskedAttention, additive_mask, dropout, dropout_keep_mask
from ddad.methods.drdc.model import FeatureReconstructor, neighbour_mask
from ddad.methods.drdc.settings import ReconstructionConfig

GRID = 5
SMALL = ReconstructionConfig(hidden=32, encoder_layers=2, decoder_layers=2, heads=4, ffn=48, dropout=0.0,
                             neighbour=3)


def _multihead(hidden=32, heads=4, p=0.0) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(hidden, heads, dropout=p, batch_first=True)


def test_masked_attention_is_multihead_attention_in_weights_outputs_and_gradients():
    torch.manual_seed(3)
    reference = _multihead()
    torch.manual_seed(3)
    ours = MaskedAttention(32, 4)
    # the same seed gives the same parameters under the same names: checkpoints load either way
    assert list(ours.state_dict()) == list(reference.state_dict())
    for name, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    with torch.no_grad():  # make the biases non-zero so that every slice of them counts
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.load_state_dict(reference.state_dict())
    forbidden = neighbour_mask(GRID, 3)
    x, memory = torch.randn(3, GRID * GRID, 32), torch.randn(3, GRID * GRID, 32)
    pos = torch.randn(1, GRID * GRID, 32)
    for training in (False, True):  # the fused kernel (evaluation, or no dropout) and its gradients
        ours.train(training), reference.train(training)
        for query, key, value in ((x + pos, None, x), (x + pos, memory + pos, memory)):
            query = query.detach().requires_grad_()
            key_ours = query if key is None else key
            got = ours(query, key_ours, value, additive_mask(forbidden))
            want = reference(query, key_ours, value, attn_mask=forbidden, need_weights=False)[0]
            assert torch.allclose(got, want, atol=1e-5), (training, key is None)
            g_ours = torch.autograd.grad(got.square().sum(), [query, *ours.parameters()])
            g_ref = torch.autograd.grad(want.square().sum(), [query, *reference.parameters()])
            for a, b in zip(g_ours, g_ref):
                assert torch.allclose(a, b, atol=1e-4), (training, key is None)
    # the attention weights themselves, per head
    weights = ours.attention_weights(x, memory, additive_mask(forbidden))
    want = reference(x, memory, memory, attn_mask=forbidden, need_weights=True, average_attn_weights=False)[1]
    assert torch.allclose(weights, want, atol=1e-6)


def _reference_forward(model: FeatureReconstructor, features: torch.Tensor) -> torch.Tensor:
    """The transformer as it was built before part 5: every attention an ``nn.MultiheadAttention`` (loaded
    with the model's weights) under the boolean neighbour mask, the rest written out from the paper."""
    cfg, forbidden = model.cfg, neighbour_mask(model.grid, model.cfg.neighbour)

    def attend(module: MaskedAttention, q, k, v):
        reference = _multihead(cfg.hidden, cfg.heads).eval()
        reference.load_state_dict(module.state_dict())
        return reference(q, k, v, attn_mask=forbidden, need_weights=False)[0]

    b, c, h, w = features.shape
    x = model.project_in(features.flatten(2).transpose(1, 2))
    pos = model.pos
    for layer in model.encoder:
        x = layer.norms[0](x + attend(layer.attn, x + pos, x + pos, x))
        x = layer.norms[1](x + layer.ffn(x))
    out = x
    for layer in model.decoder:
        q = layer.query.unsqueeze(0).expand(b, -1, -1)
        q = layer.norms[0](q + attend(layer.self_attn, q + pos, q + pos, q))
        q = layer.norms[1](q + attend(layer.cross_attn, q + pos, out + pos, out))
        out = layer.norms[2](q + layer.ffn(q))
    return model.project_out(out).transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("attention_dropout", [None, 0.0])
def test_the_transformer_scores_as_it_did_with_multihead_attention(attention_dropout):
    """Scores unchanged within float tolerance: the model's output (Eq. 1) and its error map (Eq. 2) against
    the same weights run through ``nn.MultiheadAttention``."""
    torch.manual_seed(0)
    model = FeatureReconstructor(12, GRID, replace(SMALL, dropout=0.1, attention_dropout=attention_dropout)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        features = torch.randn(4, 12, GRID, GRID)
        want = _reference_forward(model, features)
        assert torch.allclose(model(features), want, atol=1e-5)
        assert torch.allclose(model.error(features), (want - features).norm(dim=1, keepdim=True), atol=1e-5)


def test_the_dropout_mask_has_the_asked_rate_independent_elements_and_an_unbiased_scale():
    n, p = 1 << 22, 0.1
    torch.manual_seed(0)
    keep, scale = dropout_keep_mask((n,), p)
    q = round(p * 65536) / 65536  # the rate, rounded to 16 bits
    assert scale == 1 / (1 - q)
    sigma = (q * (1 - q) / n) ** 0.5
    dropped = (~keep).float()
    assert abs(dropped.mean().item() - q) < 5 * sigma
    # each of the four 16-bit pieces of a 64-bit draw is uniform (a draw with a constant bit would show here)
    for lane in range(4):
        assert abs(dropped[lane::4].mean().item() - q) < 5 * 2 * sigma, lane
    # neighbours independent: P(both dropped) = q^2
    both = (dropped[:-1] * dropped[1:]).mean().item()
    assert abs(both - q * q) < 5 * (q * q / n) ** 0.5 * 2
    # seeded: the same seed, the same mask; another seed, another
    torch.manual_seed(0)
    assert torch.equal(dropout_keep_mask((n,), p)[0], keep)
    assert not torch.equal(dropout_keep_mask((n,), p)[0], keep)
    # dropout keeps the expectation: zeros or x / P(keep), mean x
    x = torch.full((n,), 2.0)
    y = dropout(x, p, training=True)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(2.0 * scale)
    assert abs(y.mean().item() - 2.0) < 5 * 2.0 * scale * sigma
    assert torch.equal(dropout(x, p, training=False), x) and torch.equal(dropout(x, 0.0, training=True), x)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout probability"):
            dropout_keep_mask((4,), bad)


def test_attention_dropout_drops_weights_under_the_mask_and_keeps_the_expectation():
    torch.manual_seed(1)
    layer = MaskedAttention(32, 4, dropout=0.3)
    forbidden = neighbour_mask(GRID, 3)
    mask = additive_mask(forbidden)
    x = torch.randn(2, GRID * GRID, 32)
    with torch.no_grad():
        expected = layer.eval()(x, x, x, mask)
        layer.train()
        draws = torch.stack([layer(x, x, x, mask) for _ in range(800)])
    assert not torch.allclose(draws[0], draws[1])  # random in training
    # the output is linear in the weights and dropout is unbiased: the mean of the draws tends to the eval output
    spread = draws.std(dim=0) / 800 ** 0.5
    assert torch.all((draws.mean(dim=0) - expected).abs() <= 5 * spread + 1e-5)
    # dropout never lets a token see inside its window: moving a token there leaves the output as it was
    i, inside, outside = 2 * GRID + 2, 3 * GRID + 3, 0
    for change, moves in ((inside, False), (outside, True)):
        y = x.clone()
        y[:, change] += 3.0
        with torch.no_grad():
            torch.manual_seed(7)
            a = layer(x, x, y, mask)[:, i]  # values only: the same weights, the same dropout draw
            torch.manual_seed(7)
            b = layer(y, y, y, mask)[:, i]
        assert (not torch.allclose(a, b, atol=1e-6)) == moves, change


def test_the_attention_dropout_setting_reaches_every_attention():
    def rates(cfg):
        model = FeatureReconstructor(12, GRID, cfg)
        return {m.dropout for m in model.modules() if isinstance(m, MaskedAttention)}

    assert rates(replace(SMALL, dropout=0.2)) == {0.2}  # None: UniAD's, the dropout
    assert rates(replace(SMALL, dropout=0.2, attention_dropout=0.0)) == {0.0}
    with pytest.raises(ValueError, match="model.attention_dropout"):
        replace(SMALL, attention_dropout=1.0)


def test_a_cpu_run_trains_without_attention_dropout_unless_told(synth_root, capsys):
    from ddad.cli.parser import build_parser
    from ddad.cli.settings import train_settings

    def settings(*extra):
        args = ["train", "--method", "drdc", "--data-root", str(synth_root), "--category", "washer", "--device",
                "cpu", *extra]
        return train_settings(build_parser().parse_args(args))[0]

    capsys.readouterr()
    assert settings().model.attention_dropout == 0.0 and "no attention dropout" in capsys.readouterr().out
    assert settings("--set", "model.attention_dropout=0.1").model.attention_dropout == 0.1
    assert "no attention dropout" not in capsys.readouterr().out
