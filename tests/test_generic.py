"""Target selection for CUDA devices (issue 5): capability 9.0 → Hopper, 8.x → the generic
mma.sync target for the exact arch, forced by target= or $TILEMIX_TARGET; no GPU needed."""

import pytest

from tilemix.ops._dispatch import select_arch


@pytest.mark.parametrize("cc, arch", [((9, 0), "sm_90a"), ((8, 0), "sm_80"), ((8, 6), "sm_86"), ((8, 9), "sm_89")])
def test_automatic(cc, arch, monkeypatch):
    monkeypatch.delenv("TILEMIX_TARGET", raising=False)
    assert select_arch(cc) == arch


def test_forced_generic_on_hopper(monkeypatch):
    monkeypatch.delenv("TILEMIX_TARGET", raising=False)
    assert select_arch((9, 0), "generic") == "sm_90"
    monkeypatch.setenv("TILEMIX_TARGET", "generic")
    assert select_arch((9, 0)) == "sm_90"
    assert select_arch((9, 0), "hopper") == "sm_90a"  # the argument wins over the environment
    assert select_arch((8, 6)) == "sm_86"


@pytest.mark.parametrize("cc, target, words", [
    ((7, 5), None, "capability 7.5"), ((10, 0), None, "capability 10.0"),
    ((8, 0), "hopper", "needs compute capability 9.0"), ((9, 0), "volta", "not one of"),
])
def test_errors(cc, target, words, monkeypatch):
    monkeypatch.delenv("TILEMIX_TARGET", raising=False)
    with pytest.raises(ValueError, match=words):
        select_arch(cc, target)
