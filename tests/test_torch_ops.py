"""The ops as PyTorch custom ops: torch.library's own checks, meta tensors, torch.compile without
graph breaks (CPU; the same ops dispatch to the generated kernels on an H100)."""

from __future__ import annotations

import pytest
import torch

from tilemix import ops

B, T, H, D = 1, 70, 2, 32


def _inputs():
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        gemm=(t(40, 24), t(24, 16)),
        attention=(t(B, T, H, D), t(B, T, H, D), t(B, T, H, D), True, 0.2),
        linear_attention=(t(B, T, H, D), t(B, T, H, D), t(B, T, H, D), 0.2, t(B, H, D, D), True),
        ssd=(t(B, T, H, D), torch.rand(B, T, H, generator=g), -torch.rand(H, generator=g), t(B, T, 1, D),
             t(B, T, 1, D), t(H), None, False),
    )


@pytest.mark.parametrize("name", ["gemm", "attention", "linear_attention", "ssd"])
def test_opcheck(name):
    op = getattr(torch.ops.tilemix, name).default
    torch.library.opcheck(op, _inputs()[name])  # schema, fake tensors, AOT dispatch static and dynamic


def test_meta_tensors_get_shapes_without_running():
    q = torch.empty(2, 5000, 4, 64, device="meta")
    o, state = ops.linear_attention(q, q, q, output_final_state=True)
    assert o.device.type == "meta" and o.shape == q.shape and state.shape == (2, 4, 64, 64)
    with pytest.raises(ValueError, match="k: expected shape"):
        ops.linear_attention(q, q[:, :10], q)


class Mixer(torch.nn.Module):
    """A toy block calling all four ops."""

    def forward(self, x, dt, A, b, w):
        y = ops.attention(x, x, x, causal=True)
        z, _ = ops.linear_attention(y, x, x)
        s, state = ops.ssd(z, dt, A, b, b, output_final_state=True)
        return ops.gemm(s.reshape(-1, s.shape[-1]), w), state


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, H, D, generator=g)
    args = (x, torch.rand(B, T, H, generator=g), -torch.rand(H, generator=g), torch.randn(B, T, 1, D, generator=g),
            torch.randn(D, 16, generator=g))
    model = Mixer()
    eager = model(*args)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)(*args)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)
