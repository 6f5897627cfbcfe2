"""Every generated kernel under compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

    python -m tilemix.bench.sanitize            # on a GPU machine with CUDA's compute-sanitizer

runs this module's ``--launch`` mode once per tool: it launches each op's kernels once, forward and
backward (hand-written and derived, the mixer library's too; ``--calls`` picks groups of ops), on shapes
with masked tails (T not a multiple of the chunk, gemm dims off the tile grid), in both dtypes, on both
targets (sm_90a and the generic mma.sync kernels), causal and not, with and without states, the scans at
one and two consumers per CTA and in sequence segments. Prints the kernels checked and the errors each
tool reported; exits non-zero on any error. Host-side API errors are not counted (cuda-bindings probes
the driver for optional entry points, which memcheck would report).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
TARGETS = ("auto", "generic")  # the device's own kernels, then the mma.sync ones forced
DTYPES = ("bfloat16", "float16")
REPORT_LINES = 80  # of a failing tool's output
DONE = "launched: "  # a line per group, target and dtype whose kernels ran to the end
REPORT = re.compile(r"^========= (?!COMPUTE-SANITIZER|ERROR SUMMARY|RACECHECK SUMMARY)\S", re.MULTILINE)
SUMMARY = re.compile(r"(?:ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: (\d+) hazard)")


def _leaf(t):
    """``t`` as an input whose gradient the backward computes."""
    return t.requires_grad_(True)


def _grads(*outputs):
    """The backward kernels of ``outputs`` (None ones skipped), from random output gradients."""
    import torch

    outputs = [o for o in outputs if o is not None]
    torch.autograd.backward(outputs, [torch.randn_like(o) for o in outputs])


def _tail_calls(rnd, target):
    """Every op, forward and backward (gradients of every input), on shapes with masked tails."""
    import torch

    from tilemix import ops

    cuda = dict(device=rnd(1).device)
    B, T, H, D = 2, 100, 3, 64
    q, k, v = _leaf(rnd(B, T, H, D)), _leaf(rnd(B, T, H, D)), _leaf(rnd(B, T, H, 128))
    state = _leaf(torch.randn(B, H, D, 128, **cuda))
    for backward in ("hand-written", "derived"):
        _grads(*ops.linear_attention(q, k, v, initial_state=state, output_final_state=True, target=target,
                                    backward=backward))
    _grads(ops.linear_attention(q, k, v, target=target)[0])
    for causal in (True, False):
        _grads(ops.attention(q, k, v, causal=causal, target=target))
    dt, A = _leaf(torch.rand(B, T, H, **cuda) * 0.5), _leaf(-torch.rand(H, **cuda) - 0.1)
    for backward in ("hand-written", "derived"):
        _grads(*ops.ssd(v, dt, A, _leaf(rnd(B, T, 1, D)), _leaf(rnd(B, T, 1, D)), D=_leaf(torch.randn(H, **cuda)),
                       initial_state=state, output_final_state=True, target=target, backward=backward))
    _grads(ops.gemm(_leaf(rnd(200, 72)), _leaf(rnd(72, 136)), target=target))
    # enough batch x heads that the scans keep their two-consumer CTAs (few run one per CTA)
    B, H = 4, 32
    v = _leaf(rnd(B, T, H, 128))
    state = _leaf(torch.randn(B, H, D, 128, **cuda))
    _grads(*ops.linear_attention(_leaf(rnd(B, T, H, D)), _leaf(rnd(B, T, H, D)), v, initial_state=state,
                                output_final_state=True, target=target))
    _grads(*ops.ssd(v, _leaf(torch.rand(B, T, H, **cuda) * 0.5), _leaf(-torch.rand(H, **cuda) - 0.1),
                   _leaf(rnd(B, T, 1, D)), _leaf(rnd(B, T, 1, D)), output_final_state=True, target=target))


def _mixer_calls(rnd, target):
    """The gated and delta-rule mixers (rwkv7 too) and mlstm (derived backwards), forward and backward,
    on a tail shape with initial and final states."""
    import torch
    import torch.nn.functional as F

    from tilemix import ops
    from tilemix.ops.runtime import use_target

    B, T, H, D = 2, 100, 3, 64
    device = rnd(1).device

    def seq():
        return rnd(B, T, H, D).requires_grad_(True)

    def state():
        return torch.randn(B, H, D, D, device=device).requires_grad_(True)

    def gates(*shape, dtype=torch.float32):
        return (F.logsigmoid(torch.randn(*shape, device=device)) / 16).to(dtype).requires_grad_(True)

    def keys():
        return F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(rnd(1).dtype).requires_grad_(True)

    beta = torch.rand(B, T, H, device=device).requires_grad_(True)
    decays = gates(B, T, H, D, dtype=rnd(1).dtype)  # per-key gates feed matmuls: q's dtype
    with use_target(target):
        calls = [ops.retention(seq(), seq(), seq(), initial_state=state(), output_final_state=True),
                 ops.gla(seq(), seq(), seq(), decays, initial_state=state(), output_final_state=True),
                 ops.rwkv6(seq(), seq(), seq(), decays, torch.randn(H, D, device=device).requires_grad_(),
                           initial_state=state(), output_final_state=True),
                 ops.delta_rule(seq(), keys(), seq(), beta, initial_state=state(), output_final_state=True),
                 ops.gated_delta_rule(seq(), keys(), seq(), gates(B, T, H), beta, initial_state=state(),
                                      output_final_state=True)]
        removal = keys()  # rwkv7: a = -κ̂, b = κ̂ ⊙ η, as an RWKV-7 layer passes them
        calls.append(ops.rwkv7(seq(), decays, seq(), seq(), -removal, removal * 0.5, initial_state=state(),
                               output_final_state=True))
        # mlstm at V = 128: its backward's column blocks
        mlstm_state = [torch.randn(*shape, device=device).requires_grad_(True)
                       for shape in ((B, H, D, 2 * D), (B, H, D), (B, H))]
        h, final = ops.mlstm(seq(), seq(), rnd(B, T, H, 2 * D).requires_grad_(True), gates(B, T, H), gates(B, T, H),
                             initial_state=mlstm_state, output_final_state=True)
        calls.append((h, *final))
        for outputs in calls:
            _grads(*outputs)


def _wide_calls(rnd, target):
    """Head dim 128, where the derived backwards cut their states into row and column blocks (inside
    the CTA and on the host): retention, gla and rwkv6 (fast forms), mlstm, and SSD's derived backward
    at N = P = 128, forward and backward, on a tail shape with initial and final states."""
    import torch
    import torch.nn.functional as F

    from tilemix import ops
    from tilemix.ops.runtime import use_target

    B, T, H, D = 2, 100, 3, 128
    device = rnd(1).device

    def seq():
        return _leaf(rnd(B, T, H, D))

    def state(*shape):
        return _leaf(torch.randn(*shape, device=device))

    decays = _leaf((F.logsigmoid(torch.randn(B, T, H, D, device=device)) / 16).to(rnd(1).dtype))
    gates = [_leaf(F.logsigmoid(torch.randn(B, T, H, device=device)) / 16) for _ in range(2)]
    with use_target(target):
        calls = [ops.retention(seq(), seq(), seq(), initial_state=state(B, H, D, D), output_final_state=True),
                 ops.gla(seq(), seq(), seq(), decays, initial_state=state(B, H, D, D), output_final_state=True,
                         exact=False),
                 ops.rwkv6(seq(), seq(), seq(), decays, state(H, D), initial_state=state(B, H, D, D),
                           output_final_state=True, exact=False)]
        mlstm_state = (state(B, H, D, D), state(B, H, D), state(B, H))
        h, final = ops.mlstm(seq(), seq(), seq(), *gates, initial_state=mlstm_state, output_final_state=True)
        calls.append((h, *final))
        calls.append(ops.ssd(seq(), _leaf(torch.rand(B, T, H, device=device) * 0.5),
                             _leaf(-torch.rand(H, device=device) - 0.1), _leaf(rnd(B, T, 1, D)), _leaf(rnd(B, T, 1, D)),
                             D=_leaf(torch.randn(H, device=device)), initial_state=state(B, H, D, D),
                             output_final_state=True, backward="derived"))
        for outputs in calls:
            _grads(*outputs)


def _bidirectional_calls(rnd, target):
    """Bidirectional linear attention (normalised and not) and prefix linear attention, forward and
    backward, on a tail shape with the prefix ending inside a chunk."""

    from tilemix import ops

    q, k, v = (rnd(2, 100, 3, 64).abs().requires_grad_(True) for _ in range(3))  # positive: a normaliser away from 0
    outputs = [ops.linear_attention(q, k, v, causal=False, target=target)[0],
               ops.linear_attention(q, k, v, causal=False, normalize=True, target=target)[0],
               ops.prefix_linear_attention(q, k, v, 70, target=target)]
    _grads(*outputs)


def _library_calls(rnd, target):
    """Based (sm_90a only: sm_80 refuses its feature tiles), sliding-window and grouped-query
    attention, forward and backward, on tail shapes."""
    import torch

    from tilemix import ops

    B, T, H = 2, 100, 3
    outputs = []
    if target == "auto" and (rnd(1).device.type == "cpu" or torch.cuda.get_device_capability() >= (9, 0)):
        outputs.append(ops.based(_leaf(rnd(B, T, H, 16)), _leaf(rnd(B, T, H, 16)), _leaf(rnd(B, T, H, 64))))
    q, k, v = (_leaf(rnd(B, 300, H, 64)) for _ in range(3))
    outputs.append(ops.attention(q, k, v, causal=True, window=70, target=target))
    kv = [_leaf(rnd(B, T, 1, 64)) for _ in range(2)]
    outputs.append(ops.attention(_leaf(rnd(B, T, H, 64)), *kv, causal=True, target=target))
    _grads(*outputs)


def _selective_scan_calls(rnd, target):
    """Mamba-1's selective scan, forward and its derived backward (a group of its own: its backward
    programs are the largest the project compiles, minutes under each tool)."""
    import torch

    from tilemix import ops
    from tilemix.ops.runtime import use_target

    B, T = 2, 100
    device = rnd(1).device
    u, delta, z = (_leaf(rnd(B, T, 128)) for _ in range(3))
    A = _leaf(-torch.rand(128, 16, device=device) - 0.5)
    Bm, Cm = (_leaf(rnd(B, T, 16)) for _ in range(2))
    with use_target(target):
        y, final = ops.selective_scan(u, delta, A, Bm, Cm, D=_leaf(torch.randn(128, device=device)), z=z,
                                      delta_softplus=True, output_final_state=True)
    _grads(y, final)


def _step_calls(rnd, target):
    """Every decode step, its state updated in place."""
    import torch
    import torch.nn.functional as F

    from tilemix import ops
    from tilemix.ops.runtime import use_target

    B, H, D = 2, 3, 64
    cuda = dict(device=rnd(1).device)
    with use_target(target):
        token = [rnd(B, 1, H, D) for _ in range(3)]
        state = torch.randn(B, H, D, D, **cuda)
        gate = F.logsigmoid(torch.randn(B, 1, H, D, **cuda)).to(token[0].dtype)
        beta, scalar_gate = torch.rand(B, 1, H, **cuda), F.logsigmoid(torch.randn(B, 1, H, **cuda))
        for step in (ops.linear_attention_step(*token, state), ops.retention_step(*token, state),
                     ops.gla_step(*token, gate, state), ops.rwkv6_step(*token, gate, torch.randn(H, D, **cuda), state),
                     ops.delta_rule_step(token[0], F.normalize(token[1], dim=-1), token[2], beta, state),
                     ops.gated_delta_rule_step(token[0], F.normalize(token[1], dim=-1), token[2], scalar_gate,
                                               beta, state)):
            assert step.isfinite().all()
        ops.ssd_step(token[2], torch.rand(B, 1, H, **cuda), -torch.rand(H, **cuda) - 0.1, rnd(B, 1, 1, D),
                     rnd(B, 1, 1, D), torch.randn(B, H, D, D, **cuda), D=torch.randn(H, **cuda))


def _model_calls(rnd, target):
    """What models run beside the chunked ops: every decode step (``_step_calls``) and packed batches
    (``cu_seqlens``, a sequence ending inside a chunk), forward and backward."""
    import torch
    import torch.nn.functional as F

    from tilemix import ops
    from tilemix.ops.runtime import use_target

    _step_calls(rnd, target)
    H, D = 3, 64
    cuda = dict(device=rnd(1).device)
    with use_target(target):
        T = 190
        cu = torch.tensor([0, 70, 100, T], dtype=torch.int32, **cuda)
        q, k, v = (_leaf(rnd(1, T, H, D)) for _ in range(3))
        decays = _leaf((F.logsigmoid(torch.randn(1, T, H, D, **cuda)) / 16).to(q.dtype))
        outputs = [ops.linear_attention(q, k, v, cu_seqlens=cu)[0], ops.gla(q, k, v, decays, cu_seqlens=cu)[0],
                   ops.ssd(v, _leaf(torch.rand(1, T, H, **cuda) * 0.5), -torch.rand(H, **cuda) - 0.1,
                           _leaf(rnd(1, T, 1, D)), _leaf(rnd(1, T, 1, D)), cu_seqlens=cu)[0],
                   ops.attention(q, k, v, causal=True, cu_seqlens=cu)]
    _grads(*outputs)


def _exact_calls(rnd, target):
    """The exact-form gated mixers, LoLCATs attention and the long convolutions (plain and H3-gated),
    forward and backward, on tail shapes."""
    import torch
    import torch.nn.functional as F

    from tilemix import ops
    from tilemix.ops.runtime import use_target

    B, H, D = 2, 3, 64
    cuda = dict(device=rnd(1).device)
    with use_target(target):
        q, k, v = (_leaf(rnd(B, 100, H, D)) for _ in range(3))
        decays = _leaf((F.logsigmoid(torch.randn(B, 100, H, D, **cuda)) / 16).to(q.dtype))
        outputs = [ops.gla(q, k, v, decays, exact=True)[0],
                   ops.rwkv6(q, k, v, decays, _leaf(torch.randn(H, D, **cuda)), exact=True)[0]]
        features = [_leaf(rnd(B, 100, H, D).abs()) for _ in range(2)]
        outputs.append(ops.lolcats_attention(q, k, v, *features))

        u, kernel = _leaf(rnd(B, 300, D)), _leaf(torch.randn(D, 300, **cuda) / 300)
        gates = [_leaf(rnd(B, 300, D)) for _ in range(2)]
        outputs += [ops.long_conv(u, kernel), ops.gated_long_conv(u, *gates, kernel)]
    _grads(*outputs)


def _attention_calls(rnd, target):
    """Attention beyond the square causal case: cross-attention (Tq != Tk, both ways), all heads and
    grouped, and packed batches whose query and key offsets differ, forward and backward; without
    gradients, the forwards that save no log-sum-exp, and the flash-decoding path (a few queries
    against a cache of 1,500 keys, split over the keys)."""
    import torch

    from tilemix import ops

    B, H, D = 2, 4, 64
    cuda = dict(device=rnd(1).device)
    outputs = []
    for kv_heads in (H, 2):
        for Tq, Tk in ((100, 170), (170, 100)):
            q, k, v = _leaf(rnd(B, Tq, H, D)), _leaf(rnd(B, Tk, kv_heads, D)), _leaf(rnd(B, Tk, kv_heads, D))
            outputs += [ops.attention(q, k, v, causal=causal, target=target) for causal in (True, False)]
    cu_q = torch.tensor([0, 30, 130], dtype=torch.int32, **cuda)
    cu_k = torch.tensor([0, 90, 150], dtype=torch.int32, **cuda)
    q, k, v = _leaf(rnd(1, 130, H, D)), _leaf(rnd(1, 150, 2, D)), _leaf(rnd(1, 150, 2, D))
    outputs.append(ops.attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, target=target))
    _grads(*outputs)
    with torch.no_grad():
        for kv_heads in (H, 2):
            for Tk in (100, 170):  # self- and cross-attention
                ops.attention(rnd(B, 100, H, D), rnd(B, Tk, kv_heads, D), rnd(B, Tk, kv_heads, D), causal=True,
                              target=target)
            for causal in (True, False):
                ops.attention(rnd(1, 3, H, D), rnd(1, 1500, kv_heads, D), rnd(1, 1500, kv_heads, D), causal=causal,
                              target=target)


CALLS = {"tail": _tail_calls, "mixers": _mixer_calls, "wide": _wide_calls, "bidirectional": _bidirectional_calls,
         "library": _library_calls, "selective_scan": _selective_scan_calls,
         "models": _model_calls, "steps": _step_calls,
         "exact": _exact_calls, "attention": _attention_calls}


def launch_all(targets: tuple[str, ...] = TARGETS, groups: tuple[str, ...] = (*CALLS, "segmented"),
               dtypes: tuple[str, ...] = DTYPES) -> list[str]:
    """Launch every kernel the ops run once: forwards and backwards, on tail shapes, both dtypes, both
    targets (the generic kernels forced on this GPU), and the scans cut into sequence segments; the
    names of the kernels launched."""
    import torch

    from tilemix.codegen import launch

    g = torch.Generator(device="cuda").manual_seed(0)
    for target in targets:
        for dtype in (getattr(torch, name) for name in dtypes):
            def rnd(*shape, dtype=dtype):
                return torch.randn(*shape, device="cuda", generator=g).to(dtype)

            for group in groups:
                if group in CALLS:
                    CALLS[group](rnd, target)
                elif group == "segmented":
                    os.environ["TILEMIX_SEGMENTS"] = "2"  # the segment programs, forward and backward
                    try:
                        _segmented_calls(rnd, target)
                    finally:
                        del os.environ["TILEMIX_SEGMENTS"]
                torch.cuda.synchronize()  # a tool reports a kernel's errors by the time it finishes
                print(f"{DONE}{group} {target} {str(dtype).removeprefix('torch.')}", flush=True)
    # one kernel per specialisation (dtype, consts, optional arguments, schedule): tell them apart by source
    return sorted({f"{plan.source.name} {hashlib.sha256(plan.source.source.encode()).hexdigest()[:8]}"
                   for plan in launch._PLANS.values()})


def _segmented_calls(rnd, target):
    """The scans at a length two segments divide, with gradients."""
    import torch

    from tilemix import ops

    B, T, H, D = 1, 256, 2, 64
    device = rnd(1).device
    q, k, v = (rnd(B, T, H, D).requires_grad_(True) for _ in range(3))
    o, _ = ops.linear_attention(q, k, v, target=target)
    o.backward(torch.randn_like(o))
    dt = (torch.rand(B, T, H, device=device) * 0.5).requires_grad_(True)
    Bm, Cm = (rnd(B, T, 1, D).requires_grad_(True) for _ in range(2))
    y, _ = ops.ssd(v, dt, -torch.rand(H, device=device) - 0.1, Bm, Cm, target=target)
    y.backward(torch.randn_like(y))


def _run(command: list[str], env: dict[str, str] | None, timeout: float | None) -> tuple[int | None, str, str]:
    """``command``'s exit status (None if it ran past ``timeout`` seconds: then it and the program
    it checks are killed) and its output."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return None, stdout, stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", action="store_true", help="only launch the kernels (what each tool runs)")
    parser.add_argument("--tool", choices=TOOLS, action="append", help="run only this tool (repeatable)")
    parser.add_argument("--target", choices=TARGETS, action="append", help="launch only this target's kernels")
    parser.add_argument("--calls", choices=(*CALLS, "segmented"), action="append",
                        help="launch only this group of ops' kernels (repeatable; default: all)")
    parser.add_argument("--dtype", choices=DTYPES, action="append",
                        help="launch only with inputs of this dtype (repeatable; default: both)")
    parser.add_argument("--timeout", type=float, help="seconds per tool; past them, report what ran to the end")
    args = parser.parse_args(argv)
    if args.launch:
        for name in launch_all(tuple(args.target or TARGETS), tuple(args.calls or (*CALLS, "segmented")),
                               tuple(args.dtype or DTYPES)):
            print("kernel:", name)
        return 0
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    sanitizer = shutil.which("compute-sanitizer") or shutil.which(os.path.join(home, "bin", "compute-sanitizer"))
    if not sanitizer:
        print("compute-sanitizer not found (CUDA toolkit's bin/ on PATH?)", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    table = Table(title="compute-sanitizer on every generated kernel")
    for column in ("tool", "kernels", "errors"):
        table.add_column(column)
    failed = False
    for tool in args.tool or TOOLS:
        command = [sanitizer, "--tool", tool, "--report-api-errors", "no", sys.executable, "-m",
                   "tilemix.bench.sanitize", "--launch", *(f"--target={t}" for t in args.target or ()),
                   *(f"--calls={c}" for c in args.calls or ()), *(f"--dtype={d}" for d in args.dtype or ())]
        # initcheck does not count a TMA store as initialising memory, so torch reading an sm_90a
        # kernel's output reports it; NaN-filled outputs (whose isfinite checks would fail where a
        # kernel left an element unwritten) leave it the kernels' own reads
        env = dict(os.environ, TILEMIX_POISON="1") if tool == "initcheck" else None
        returncode, stdout, stderr = _run(command, env, args.timeout)
        kernels = [line for line in stdout.splitlines() if line.startswith("kernel:")]
        found = [int(a or b) for a, b in SUMMARY.findall(stdout + stderr)]
        errors = sum(found) if found else None
        failed |= returncode != 0 or errors != 0
        if returncode is None:  # out of time: what ran to the end, and the reports so far
            done = [line.removeprefix(DONE) for line in stdout.splitlines() if line.startswith(DONE)]
            table.add_row(tool, f"timed out after {args.timeout:g} s; ran: {', '.join(done) or 'none'}",
                          f"{len(REPORT.findall(stdout + stderr))} reports so far")
        else:
            table.add_row(tool, str(len(kernels)), "no summary (see below)" if errors is None else str(errors))
        if returncode != 0 or errors:  # the first reports name the kernel, the access and the thread
            reports = [line for line in (stdout + stderr).splitlines() if line.startswith("=====")]
            print("\n".join(reports[:REPORT_LINES]), stderr[-2000:], sep="\n")
    Console().print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
