"""``tilemix bench --host``: the host time of one call of a signature seen before (issue 24's bar:
<= 20 µs), forward (no grad), forward + backward, and decode steps, at small shapes where the host
decides the speed.

The GPU is kept busy ahead (``torch.cuda._sleep``, sized from an untimed pass of the same loop) so a
call never waits for it, and five loops of ``calls`` calls are timed with ``time.perf_counter``, no
CUDA events (the median is kept). A record's ``gpu_busy`` says the GPU still had work when every loop
ended (false: the sleep was too
short and the number may include waiting). On the CPU the same loop times the interpreter (the
test of the harness; its numbers mean nothing)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch

from tilemix import ops
from tilemix.ops.timing import spin_cycles_per_ms

__all__ = ["run_host_bench", "HOST_ROWS"]

HOST_ROWS = ("gemm", "attention", "linear_attention", "ssd", "gla", "mixer", "linear_attention_step", "ssd_step")
_STEPS = ("linear_attention_step", "ssd_step")


_MIXER = None


def _user_mixer():
    """A ``mixer`` over a shipped program, as a user would make one (registered once per process)."""
    global _MIXER
    if _MIXER is None:
        _MIXER = ops.mixer(ops.linear_attention_fwd, "tilemix_bench::host_mixer", final_states=("s",))
    return _MIXER


def _row(name: str, B: int, T: int, H: int, D: int, device: str, dtype: torch.dtype) -> tuple[dict, Callable]:
    """The inputs of row ``name`` (float tensors that may require grad) and the call, which returns the
    tensor to backpropagate from."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    T = 1 if name in _STEPS else T
    q, k, v = rnd(B, T, H, D, scale=D ** -0.5), rnd(B, T, H, D, scale=D ** -0.5), rnd(B, T, H, D)
    x, bc = rnd(B, T, H, D), dict(B=rnd(B, T, 1, D), C=rnd(B, T, 1, D))
    dt, A = (torch.rand(B, T, H, generator=g) * 0.1 + 0.01).to(device), -torch.rand(H, generator=g).to(device) - 0.5
    if name == "gemm":
        return dict(a=rnd(T, D), b=rnd(D, D)), lambda a, b: ops.gemm(a, b)
    if name == "attention":
        return dict(q=q, k=k, v=v), lambda **a: ops.attention(**a, causal=True)
    if name == "linear_attention":
        return dict(q=q, k=k, v=v), lambda **a: ops.linear_attention(**a)[0]
    if name == "ssd":
        return dict(x=x, dt=dt, A=A, **bc), lambda **a: ops.ssd(**a)[0]
    if name == "gla":
        gate = (-torch.rand(B, T, H, D, generator=g) * 0.1).to(device, dtype)  # matmul operands share a dtype
        return dict(q=q, k=k, v=v, g=gate), lambda **a: ops.gla(**a, exact=True)[0]  # exact: no host read of g
    if name == "mixer":
        return dict(q=q, k=k, v=v), lambda **a: _user_mixer()(**a, scale=D ** -0.5)[0]
    state = torch.zeros(B, H, D, D, device=device)
    if name == "linear_attention_step":
        return dict(q=q, k=k, v=v), lambda **a: ops.linear_attention_step(**a, state=state)
    return dict(x=x, dt=dt, A=A, **bc), lambda **a: ops.ssd_step(**a, state=state)


def _loop(call: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def host_us(call: Callable[[], object], device: str, calls: int, rounds: int = 5) -> tuple[float, bool | None]:
    """µs of host time per ``call``, the median of ``rounds`` loops of ``calls`` calls (after two
    warm-up calls: compiled, remembered; one loop swings by a third on a lent machine), and whether
    the GPU was still busy when every timed loop ended (None on the CPU)."""
    call()
    call()
    if device != "cuda":
        return statistics.median(_loop(call, calls) for _ in range(rounds)) * 1e6, None
    torch.cuda.synchronize()
    start = time.perf_counter()
    _loop(call, calls)
    torch.cuda.synchronize()
    untimed = time.perf_counter() - start  # host and GPU together: more than the host alone needs
    times, busy = [], True
    for _ in range(rounds):
        torch.cuda._sleep(int((2 * untimed * 1e3 + 1) * spin_cycles_per_ms()))
        times.append(_loop(call, calls))
        busy = busy and not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
    return statistics.median(times) * 1e6, busy


def run_host_bench(device: str = "cuda", shape: tuple[int, int, int, int] = (1, 128, 2, 64), calls: int = 100,
                   rows: tuple[str, ...] = HOST_ROWS, json_path: str | None = None,
                   dtype: torch.dtype | None = None) -> list[dict] | None:
    """Time ``rows`` at ``shape`` (B, T, H, D; in ``dtype``, by default bf16 on the GPU and float32 on
    the CPU), print and return the records (and write them to ``json_path``): ``host-<row>``,
    direction ``fwd`` (under no_grad), ``fwd+bwd`` (inputs requiring grad, a backward from a fixed
    gradient) or ``decode`` (a step).
    None, with the reason printed, where ``device`` is "cuda" and there is no CUDA GPU."""
    unknown = [r for r in rows if r not in HOST_ROWS]
    if unknown:
        raise ValueError(f"rows: unknown {unknown}; expected some of {HOST_ROWS}")
    if device == "cuda" and not torch.cuda.is_available():
        print("tilemix bench --host needs a CUDA GPU (it times the host side of GPU calls)")
        return None
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    B, T, H, D = shape
    records = []
    for name in rows:
        inputs, fn = _row(name, B, T, H, D, device, dtype)
        directions = ("decode",) if name in _STEPS else ("fwd", "fwd+bwd")
        for direction in directions:
            if direction == "fwd+bwd":
                leaves = {n: t.detach().requires_grad_(t.is_floating_point()) for n, t in inputs.items()}
                grad = torch.ones_like(fn(**leaves))

                def call(fn=fn, leaves=leaves, grad=grad):
                    fn(**leaves).backward(grad)
            else:
                def call(fn=fn, inputs=inputs):
                    with torch.no_grad():
                        fn(**inputs)
            us, busy = host_us(call, device, calls)
            records.append(dict(op=f"host-{name}", direction=direction, device=device,
                                shape=dict(B=B, T=1 if name in _STEPS else T, H=H, D=D), calls=calls,
                                host_us=us, gpu_busy=busy))
            note = "" if busy is not False else " (the GPU went idle: may include waiting)"
            print(f"host-{name:<23} {direction:<8} {us:8.1f} µs per call{note}", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(command="tilemix bench --host", records=records), f, indent=2)
    return records
