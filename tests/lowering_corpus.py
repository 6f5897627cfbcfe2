"""Every program the tests cover, each lowered for every target under its default schedule and a
few others, hashed: the code generator's refactors must leave each generated kernel byte for byte
the same (``test_lowering_identity.py``; ``python tests/lowering_corpus.py`` rewrites the record).
The default schedule is taken unprobed (``default_schedule(probe=False)``): the choices it makes by
compiling candidates (tested apart, in test_staging and test_decode_compile) would compile every
kernel here, several minutes each at head dim 256; the variants lower their forms instead."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

from tilemix.tiles import Kernel, TileError

RECORD = Path(__file__).parent / "data" / "lowering_hashes.json"
ARCHS = ("sm_90a", "sm_80", "sm_86", "sm_89", "sm_90")
MODULES = ("tilemix.ops.gemm", "tilemix.ops.attention", "tilemix.ops.linear_attention", "tilemix.ops.ssd",
           "tilemix.ops.ssd_states", "tilemix.ops.ssd_backward", "tilemix.ops.gated", "tilemix.ops.bidirectional",
           "test_user_mixers", "tilemix.ops.selective_scan",
           "tilemix.ops.mlstm", "tilemix.ops.delta_rule", "tilemix.ops.based", "tilemix.ops.long_conv_programs",
           "tilemix.ops.lolcats", "tilemix.ops.rwkv7", "tilemix.ops.attention_decode")
# programs of a module left out of the record (the one-program delta rules, which the ops no longer run)
LEFT_OUT = frozenset({"delta_rule.delta_rule_fwd", "delta_rule.gated_delta_rule_fwd"})
VARIANTS = {"default": {}, "one-consumer": dict(consumers=1), "one-stage": dict(stages=1),
            "early": dict(issue="early"), "program-order": dict(issue="program"),
            "overlap-on": dict(overlap="on"), "overlap-off": dict(overlap="off"), "six-stages": dict(stages=6),
            "shared-staging": dict(share_staging=True), "staged-a": dict(stage_a=True),
            "heads-pair": dict(split=(), consumers=2, consumer_axis="heads", stages=2, share_staging=True)}
# Const specialisations lowered besides a program's defaults: program -> label -> Const values
# the programs whose packed-batch kernels (varlen, ops/varlen.py) are recorded too, default schedule, sm_90a, sm_80
VARLEN_MODULES = ("linear_attention", "ssd", "ssd_states", "ssd_backward", "gated", "attention")
SPECIALISED = {f"attention.{name}{grouped}": {"window100": dict(is_causal=True, window=100)}
               for name in ("attention_fwd", "attention_fwd_lse", "attention_bwd_dq", "attention_bwd_dkdv")
               for grouped in ("", "_gqa")}
# the end-aligned causal masks and bounds of the programs with keys along their own dim
SPECIALISED.update({f"attention.{name}_{variant}": {"causal": dict(is_causal=True)}
                    for name in ("attention_fwd", "attention_fwd_lse", "attention_bwd_dq", "attention_bwd_dkdv")
                    for variant in ("cross", "cross_gqa")})
SPECIALISED.update({f"attention_decode.{name}": {"causal": dict(is_causal=True)}
                    for name in ("attention_decode_split", "attention_decode_split_gqa")})


def programs() -> dict[str, Kernel]:
    sys.path.insert(0, str(Path(__file__).parent))
    found = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, value in sorted(vars(module).items()):
            key = f"{name.rsplit('.', 1)[-1]}.{attr}"
            if isinstance(value, Kernel) and value.fn.__module__ == module.__name__ and key not in LEFT_OUT:
                found[key] = value
    for step in importlib.import_module("tilemix.ops.decode").STEPS.values():  # the decode steps' programs
        found[f"decode.{step.kernel.name}"] = step.kernel
    return found


def _kind(kind) -> str:
    return str(getattr(kind, "value", kind))


def canonical(text: str) -> str:
    """``text`` with names made from IR value ids (``v123``, ``keep123``, ``mv123``: a process-wide
    counter) numbered by first appearance."""
    names: dict[str, str] = {}
    return re.sub(r"\b(v|keep|mv)\d+", lambda m: names.setdefault(m.group(), f"{m.group(1)}#{len(names)}"), text)


def fingerprint(source) -> str:
    """The generated source (value names canonical) and everything the launch reads from it."""
    parts = [source.name, canonical(source.source), source.smem_bytes, source.stage_bytes, source.threads,
             [(_kind(k), n) for k, n in source.params], source.grid_loops, source.size_args,
             sorted(source.tmap_rows.items()), source.matrix, source.column_ctas]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def lowered(kernel: Kernel, size: int, arch: str, variant: dict, consts: dict | None = None,
            varlen: bool = False) -> str:
    from tilemix.codegen.schedule import default_schedule
    from tilemix.codegen.specialise import kernel_source
    from tilemix.ops.examples import kernel_specs

    args = {**kernel_specs(kernel, size=size), **(consts or {})}
    try:
        binding = kernel.bind(args)
        schedule = replace(default_schedule(kernel, binding, arch, probe=False), **variant)
        return fingerprint(kernel_source(kernel, binding, schedule, arch, varlen))
    except (TileError, ValueError, TypeError) as e:
        return f"error {type(e).__name__}"


def corpus() -> dict[str, str]:
    out = {}
    for name, kernel in programs().items():
        for label, consts in {"": {}, **SPECIALISED.get(name, {})}.items():
            key = f"{name}[{label}]" if label else name
            for size in (64, 128, 256):
                for arch in ARCHS:
                    for vname, variant in VARIANTS.items():
                        if vname != "default" and (size == 256 or arch not in ("sm_90a", "sm_80")):
                            continue
                        out[f"{key} {size} {arch} {vname}"] = lowered(kernel, size, arch, variant, consts)
        if name.split(".")[0] in VARLEN_MODULES:
            for size in (64, 128):
                for arch in ("sm_90a", "sm_80"):
                    out[f"{name} {size} {arch} varlen"] = lowered(kernel, size, arch, {}, varlen=True)
    return out


if __name__ == "__main__":
    RECORD.write_text(json.dumps(corpus(), indent=0, sort_keys=True) + "\n")
    print(RECORD)
