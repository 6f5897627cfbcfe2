"""The README's "Your own mixer" section, run as written: its module and its calls, against the
token-by-token recurrence in float64."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_your_own_mixer_runs_as_written(tmp_path, monkeypatch):
    """The op against the token-by-token recurrence in float64, and the layer trained by the
    section's loop (its gradients: the derived backward) fits better than it did untrained."""
    module, calls = _section_code("Your own mixer")
    (tmp_path / "mymixers.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymixers", raising=False)
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(calls, "README.md", "exec"), scope)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 130, 3, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    g = -0.1 * torch.rand(2, 130, 3, generator=gen, dtype=torch.float64)
    o, final = scope["retention"](q=q, k=k, v=v, g=g)
    state = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None] + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    expected = torch.stack(outputs, 1)
    assert (o - expected).norm() <= 1e-12 * expected.norm()
    assert (final - state).norm() <= 1e-12 * state.norm()

    torch.manual_seed(0)
    untrained, x = scope["Retention"](), scope["x"]  # the layer's initial weights

    def loss(layer):
        with torch.no_grad():
            return (layer(x) - x.roll(1, 1)).square().mean()

    assert loss(scope["layer"]) < 0.9 * loss(untrained)


@pytest.mark.gpu
def test_gpu_your_own_mixer_matches_the_interpreter(tmp_path, monkeypatch):
    """The same op on CUDA tensors: the generated kernel against the interpreter (bf16 inputs)."""
    from tilemix.ops.runtime import run_kernel
    from tilemix.reference.tolerance import bound, rel_err

    module, _ = _section_code("Your own mixer")
    (tmp_path / "mymixers_gpu.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    from mymixers_gpu import gated_retention_fwd

    gen = torch.Generator().manual_seed(1)
    q, k, v = ((0.5 * torch.randn(2, 300, 4, 64, generator=gen)).bfloat16() for _ in range(3))
    g = -0.1 * torch.rand(2, 300, 4, generator=gen)
    args = dict(q=q, k=k, v=v, g=g)
    expected = run_kernel(gated_retention_fwd, args)
    out = run_kernel(gated_retention_fwd, {n: t.cuda() for n, t in args.items()})
    for name in ("o", "s"):
        assert rel_err(out[name].cpu().float(), expected[name].double().numpy()) <= bound(torch.bfloat16), name
