"""The mixer layers: their docstring examples run, and in float64 (CPU, the interpreter in double)
each matches the same layer written with torch and the float64 references."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

from tilemix import ops, reference
from tilemix.ops import layers


def test_docstring_examples():
    result = doctest.testmod(layers, extraglobs={"torch": torch})
    assert result.attempted >= 6 and result.failed == 0


def _x(dim=128, T=70, seed=0):
    return torch.randn(2, T, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@torch.no_grad()
def test_multi_head_attention_matches_sdpa():
    layer = ops.MultiHeadAttention(128, heads=2).double()
    x = _x()
    q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in layer.in_proj(x).chunk(3, -1))
    expected = layer.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("feature_map", ["identity", "elu+1"])
def test_linear_attention_matches_reference(feature_map):
    layer = ops.LinearAttention(128, heads=2, feature_map=feature_map).double()
    x = _x()
    y, state = layer(x, output_final_state=True)
    q, k, v = (t.unflatten(-1, (2, -1)) for t in layer.in_proj(x).chunk(3, -1))
    fm = layers.FEATURE_MAPS[feature_map]
    o, s = reference.linear_attention(fm(q), fm(k), v, output_final_state=True)
    torch.testing.assert_close(y, layer.out(torch.from_numpy(o).flatten(-2)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state, torch.from_numpy(s), rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_mamba2_mixer_matches_reference():
    layer = ops.Mamba2Mixer(128, heads=4, head_dim=32, state_dim=16).double()
    x = _x()
    T, inner, n = x.shape[1], 4 * 32, 16
    z, xbc, dt = layer.in_proj(x).split([inner, inner + 2 * n, 4], dim=-1)
    xbc = F.silu(F.conv1d(F.pad(xbc.transpose(1, 2), (3, 0)), layer.conv.weight, layer.conv.bias,
                          groups=inner + 2 * n).transpose(1, 2))
    xs, B, C = xbc.split([inner, n, n], dim=-1)
    y, _ = reference.ssd(xs.unflatten(-1, (4, 32)), F.softplus(dt + layer.dt_bias), -torch.exp(layer.A_log),
                         B[:, :, None], C[:, :, None], D=layer.D)
    expected = layer.out_proj(torch.from_numpy(y).flatten(-2) * F.silu(z))
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)
    assert T == 70


def test_unknown_feature_map():
    with pytest.raises(ValueError, match="unknown feature map 'softmax'"):
        ops.LinearAttention(64, heads=1, feature_map="softmax")


def test_attention_layer_trains():
    """Gradients reach every parameter through attention's backward programs (float64, CPU)."""
    layer = ops.MultiHeadAttention(64, heads=2, causal=True).double()
    layer(_x(dim=64, T=40)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_linear_attention_layer_trains():
    """Gradients reach every parameter through the tile programs' backward (float64, CPU)."""
    layer = ops.LinearAttention(64, heads=2, feature_map="elu+1").double()
    y = layer(_x(dim=64, T=40))
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
