"""Decode steps: a scan program's one-token form (``tilemix.tiles.step``) as a torch function
that updates its states in place, and the shipped scan ops' ``*_step`` functions.

A step takes the tokens of one call (``[B, T, H, D]`` as the chunked op takes them, T = 1 for a
decode step; more run one token after another, fla's ``fused_recurrent_*`` form) and the states
(float32 ``[B, H, K, V]``, contiguous), reads each state once and writes it once, in place, and
returns the outputs. Each step is a custom op that mutates its states (``torch.compile`` traces it;
a CUDA graph captures it: no host synchronisation, nothing allocated but the outputs). It records
no gradients."""

from __future__ import annotations

import functools
from typing import Any

import torch

from tilemix.tiles import Kernel
from tilemix.tiles.step import step_kernel

from ._library import _qualified, _schema_argument
from .delta_rule import delta_rule_fwd, gated_delta_rule_fwd
from .eager import torch_custom_op
from .fastpath import fast_path
from .gated import gla_fwd, retention_fwd, retention_log_decay, rwkv6_fwd
from .linear_attention import linear_attention_fwd
from .runtime import check_call, default_scale, fake_run, run_kernel
from .ssd import ssd_fwd

__all__ = ["Step", "step", "STEPS", "linear_attention_step", "ssd_step", "retention_step", "gla_step", "rwkv6_step",
           "delta_rule_step", "gated_delta_rule_step"]


class Step:
    """``kernel``'s one-token step as a torch function (see ``step``)."""

    def __init__(self, kernel: Kernel, name: str | None = None, labels: dict[str, str] | None = None):
        self.kernel = step_kernel(kernel)
        self.name = _qualified(name or f"tilemix_user::{self.kernel.name}")
        self.labels = dict(labels or {})
        self._inputs = [n for n, spec in kernel.specs.items() if not spec.output]
        self._tensors = [n for n in self._inputs if kernel.specs[n].kind not in ("scalar", "const")]
        self.states = tuple(n for n in self._inputs if kernel.specs[n].kind == "state")
        self._outputs = [n for n, spec in kernel.specs.items() if spec.output]
        self._known = frozenset(self._inputs)
        self._required = [n for n in self._inputs if n in self.states or n not in self.kernel.defaults]
        self._label = {n: self.labels.get(n, n) for n in self._inputs}
        if not self._outputs:
            raise ValueError(f"kernel: {kernel.name} has no output for a step to return")
        self.op = self._register()

    def _register(self):
        kernel, states, outputs = self.kernel, self.states, self._outputs
        arguments = []
        for name in self._inputs:  # the states are mutated, so never optional
            argument = f"Tensor({chr(ord('a') + states.index(name))}!) {name}" if name in states \
                else _schema_argument(kernel, name)
            arguments.append(argument)
        returns = "Tensor" if len(outputs) == 1 else f"({', '.join(['Tensor'] * len(outputs))})"

        def result(out: dict[str, torch.Tensor]):
            return out[outputs[0]] if len(outputs) == 1 else tuple(out[n] for n in outputs)

        def real(*values):
            args = dict(zip(self._inputs, values))
            return result(run_kernel(kernel, args, self.labels, states, into={n: args[n] for n in states}))

        def fake(*values):
            args = dict(zip(self._inputs, values))
            return result(fake_run(kernel, args, self.labels, ()))

        namespace, _, short = self.name.partition("::")
        if hasattr(getattr(torch.ops, namespace), short):
            raise ValueError(f"name: a torch op {self.name!r} is already registered; pick another name")
        op = torch_custom_op(self.name, real, mutates_args=states,
                                     schema=f"({', '.join(arguments)}) -> {returns}")
        op.register_fake(fake)
        return op

    @fast_path(method=True)
    def __call__(self, **inputs: Any):
        """The outputs (a tensor where there is one, else a tuple); the states are updated in place."""
        if not self._known.issuperset(inputs):
            raise TypeError(f"{self.name}: unexpected argument(s) {sorted(set(inputs) - self._known)}; "
                            f"expected {self._inputs}")
        missing = [self._label[n] for n in self._required if inputs.get(n) is None]
        if missing:
            raise TypeError(f"{self.name}: missing argument(s) {missing} (a step updates its states in place: "
                            "pass them)")
        check_call(self.name, **{self._label[n]: inputs.get(n) for n in self._tensors})
        for name in self.states:
            state = inputs[name]
            if state.dtype not in (torch.float32, torch.float64) or not state.is_contiguous():
                raise ValueError(f"{self._label[name]}: the state a step updates in place is a contiguous float32 "
                                 f"tensor (float64 with float64 inputs), got {state.dtype}"
                                 f"{'' if state.is_contiguous() else ', not contiguous'}")
        defaults = self.kernel.defaults
        return self.op(*[inputs[n] if n in inputs else defaults[n] for n in self._inputs])

    def __repr__(self) -> str:
        return f"step({self.kernel.chunked.name}, name={self.name!r})"


def step(kernel: Kernel, name: str | None = None) -> Step:
    """``kernel``'s one-token decode step as a torch function that updates its states in place:
    ``step(kernel)(**inputs)`` takes the program's inputs by name, its ``State`` parameters required
    (contiguous float32 tensors, updated in place), and returns the outputs (a tensor where there is
    one, else a tuple in declaration order). ``kernel``: a forward scan ``@kernel`` (one ``chunks()``
    loop over T carrying its states), ``tilemix.tiles.step`` derives the step from it.

    Backed by the custom op ``name`` (default ``"tilemix_user::<kernel name>_step"``) that mutates
    the states: CPU tensors run the interpreter, CUDA tensors the generated kernel.

    >>> from tilemix.tiles import Out, Seq, State, chunks, colsum, kernel
    >>> @kernel
    ... def running_sum(x: Seq["D"], y: Out[Seq["D"]], s: State[1, "D"] = None):
    ...     for c in chunks(64):
    ...         s = s + colsum(x[c])
    ...         y[c] = x[c] + s
    >>> state = torch.zeros(1, 2, 1, 16)
    >>> y = step(running_sum, "demo::running_sum_step")(x=torch.ones(1, 1, 2, 16), s=state)
    >>> y[0, 0, 0, 0].item(), state[0, 0, 0, 0].item()
    (2.0, 1.0)
    """
    return Step(kernel, name)


_STATE = {"s": "state", "h": "state"}
STEPS = {  # the shipped scan ops' steps, by op: their programs are ``STEPS[op].kernel``
    "linear_attention": Step(linear_attention_fwd, "tilemix::linear_attention_step", _STATE),
    "ssd": Step(ssd_fwd, "tilemix::ssd_step", _STATE),
    "retention": Step(retention_fwd, "tilemix::retention_step", _STATE),
    "gla": Step(gla_fwd, "tilemix::gla_step", _STATE),
    "rwkv6": Step(rwkv6_fwd, "tilemix::rwkv6_step", _STATE),
    "delta_rule": Step(delta_rule_fwd, "tilemix::delta_rule_step", _STATE),
    "gated_delta_rule": Step(gated_delta_rule_fwd, "tilemix::gated_delta_rule_step", _STATE),
}


def linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """One decode step of ``linear_attention``: ``S ← S + k vᵀ``, ``o = scale · Sᵀ q``.

    q, k: ``[B, T, H, K]``, v: ``[B, T, H, V]`` (T = 1 for one token; more run one after
    another); state: float32 ``[B, H, K, V]``, contiguous, updated in place; scale defaults to
    ``K ** -0.5``. Returns o ``[B, T, H, V]``."""
    return STEPS["linear_attention"](q=q, k=k, v=v, scale=default_scale(q, scale), s=state)


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of ``ssd`` (Mamba-2's ``selective_state_update`` without z and dt's bias):
    ``h ← exp(dt·A) h + dt · B xᵀ``, ``y = hᵀ C + D·x``.

    x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A, D: ``[H]``; B, C: ``[B, T, G, N]``; state: float32
    ``[B, H, N, P]``, contiguous, updated in place. Returns y ``[B, T, H, P]``."""
    return STEPS["ssd"](x=x, dt=dt, A=A, B=B, C=C, D=D, h=state)


@functools.cache
def _log_gamma(heads: int, device: torch.device) -> torch.Tensor:
    """Retention's decays, made once per head count and device (a step in a CUDA graph copies nothing)."""
    return retention_log_decay(heads, device)


def retention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                   scale: float | None = None) -> torch.Tensor:
    """One decode step of ``retention``: ``S ← γ_h S + k vᵀ``, ``o = scale · Sᵀ q``; shapes as
    ``linear_attention_step``."""
    check_call("retention_step", q=q)
    return STEPS["retention"](q=q, k=k, v=v, log_gamma=_log_gamma(q.shape[2], q.device), scale=default_scale(q, scale),
                      s=state)


def gla_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor,
             scale: float | None = None) -> torch.Tensor:
    """One decode step of ``gla``: ``S ← diag(exp g) S + k vᵀ``, ``o = scale · Sᵀ q``; g as k
    (log forget gates); the rest as ``linear_attention_step``."""
    check_call("gla_step", q=q, g=g)
    return STEPS["gla"](q=q, k=k, v=v, g=g, s=state, scale=default_scale(q, scale))


def rwkv6_step(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
               state: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One decode step of ``rwkv6``: ``o = scale · (S + diag(u) k vᵀ)ᵀ r``, then
    ``S ← diag(exp w) S + k vᵀ``; w as k (log decays), u ``[H, K]``; the rest as
    ``linear_attention_step``."""
    return STEPS["rwkv6"](r=r, k=k, v=v, w=w, u=u, scale=default_scale(r, scale), s=state)


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """One decode step of ``delta_rule``: ``u = β (v − Sᵀ k)``, ``S ← S + k uᵀ``, ``o = scale · Sᵀ q``;
    beta ``[B, T, H]``; the rest as ``linear_attention_step``."""
    return STEPS["delta_rule"](q=q, k=k, v=v, beta=beta, scale=default_scale(q, scale), s=state)


def gated_delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          beta: torch.Tensor, state: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One decode step of ``gated_delta_rule``: ``delta_rule_step`` with the state decayed by
    ``exp(g)`` first; g ``[B, T, H]`` log decays."""
    return STEPS["gated_delta_rule"](q=q, k=k, v=v, g=g, beta=beta, scale=default_scale(q, scale), s=state)
