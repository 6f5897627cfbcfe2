"""Tilemix's torch custom ops with an eager fast path: a plain eager call (plain tensors, not meta,
no tracing, mode, transform or profiler) runs the op's function directly, and its registered backward
through a ``torch.autograd.Function``, instead of through torch's dispatcher, whose custom-op layers
cost more host time than a whole call's budget (~19 µs a call, ~33 µs with autograd, on a CPU
where ``Function.apply`` takes a few). Anything else (``torch.compile``, fake or meta tensors,
``opcheck``, ``vmap``, a dispatch or function mode, a tensor subclass, keyword arguments) calls
the custom op. Both paths give the op's function and its backward the same arguments as the
dispatcher does (trailing defaults left out, ``float`` arguments as floats, lists as lists), so
they give the same results bit for bit."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch._library.custom_ops import CustomOpDef

__all__ = ["torch_custom_op", "EagerOp"]

_C = torch._C
# the CustomOpDef fields the fast path reads (private: checked on each op, see torch_custom_op)
_FIELDS = ("_opoverload", "_init_fn", "_backend_fns", "_setup_context_fn", "_backward_fn", "_disabled_kernel")
_profiler_enabled = torch.autograd._profiler_enabled
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter disables __torch_function__: a plain tensor to ops
_TENSOR, _OPTIONAL, _FLOAT = "Tensor", "Optional[Tensor]", "float"  # schema types, as str(argument.type)
_SCALARS = {"int": int, "bool": bool, "str": str}
_LISTS = {"List[Tensor]": torch.Tensor, "List[Optional[Tensor]]": torch.Tensor, "List[bool]": bool, "List[int]": int}
_KINDS = {_TENSOR: _TENSOR,  # the kinds by name, each its one string object (compared with `is`)
           _OPTIONAL: _OPTIONAL, _FLOAT: _FLOAT, **{k: k for k in (*_SCALARS, *_LISTS)}}


def torch_custom_op(name: str, fn: Callable | None = None, *, mutates_args: Sequence[str] | str = (),
                    schema: str | None = None):
    """``torch.library.custom_op(name, fn, ...)`` (a decorator when ``fn`` is None), as an ``EagerOp``."""

    def make(fn: Callable) -> CustomOpDef:
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args, schema=schema)
        if not all(hasattr(op, field) for field in _FIELDS):
            return op  # a torch whose CustomOpDef keeps other fields: every call through the dispatcher
        op.__class__ = EagerOp  # a CustomOpDef still (opcheck, register_*), with its own __call__
        op._eager = _Signature(op._opoverload._schema)
        return op

    return make if fn is None else make(fn)


class _Signature:
    """What a call needs from the op's schema: each argument's kind and default (torch's dispatcher
    hands an op's function trailing arguments at their default left out, and converts ``float``
    arguments), the arguments it mutates, and whether autograd can take it without torch's
    tensor-list wrapping. ``usable`` is False where a schema has a type the fast path does not
    check (the op then always goes through the dispatcher)."""

    def __init__(self, schema):
        arguments = schema.arguments
        self.kinds = tuple(_KINDS.get(str(a.type)) for a in arguments)
        self.defaults = tuple((a.has_default_value(), a.default_value if a.has_default_value() else None)
                              for a in arguments)
        # filled[n]: the defaults of the arguments after the first n, None where one has no default
        self.filled = [tuple(d for _, d in self.defaults[n:]) if all(has for has, _ in self.defaults[n:]) else None
                       for n in range(len(arguments) + 1)]
        self.tensors = tuple(i for i, kind in enumerate(self.kinds) if kind is _TENSOR)
        self.optionals = tuple(i for i, kind in enumerate(self.kinds) if kind is _OPTIONAL)
        self.floats = tuple(i for i, kind in enumerate(self.kinds) if kind is _FLOAT)
        self.others = tuple((i, kind) for i, kind in enumerate(self.kinds) if kind not in (_TENSOR, _OPTIONAL, _FLOAT))
        self.mutated = tuple(i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write)
        self.usable = None not in self.kinds and not any(a.kwarg_only for a in arguments)
        self.optional_from = next((n for n, f in enumerate(self.filled) if f is not None), len(arguments))
        returns = [str(r.type) for r in schema.returns]
        # what the dispatcher returns: a list for Tensor[], a tuple for several results
        self.returns = list if returns == ["List[Tensor]"] else tuple if len(returns) > 1 else None
        self.differentiable = not self.mutated and not any("List" in str(a.type) for a in (*arguments, *schema.returns))

    def arguments(self, args: tuple) -> list | None:
        """``args`` filled with the defaults and converted as the dispatcher would, or None where an
        argument is not what the schema takes from a plain eager call (the dispatcher then says why)."""
        kinds = self.kinds
        if len(args) == len(kinds):
            values = list(args)
        elif len(args) < len(kinds) and self.filled[len(args)] is not None:
            values = [*args, *self.filled[len(args)]]
        else:
            return None
        for i in self.tensors:
            if type(values[i]) not in _PLAIN or values[i].is_meta:
                return None
        for i in self.optionals:
            value = values[i]
            if value is not None and (type(value) not in _PLAIN or value.is_meta):
                return None
        for i in self.floats:
            if type(values[i]) is int:
                values[i] = float(values[i])
            elif type(values[i]) is not float:
                return None
        for i, kind in self.others:
            value = values[i]
            if kind in _SCALARS:
                if type(value) is not _SCALARS[kind]:
                    return None
            elif type(value) not in (list, tuple) or not all(_fits(kind, v) for v in value):
                return None
            else:
                values[i] = list(value)
        return values

    def without_defaults(self, values: list) -> list:
        """``values`` with the trailing arguments equal to their defaults left out (as the dispatcher
        calls a Python kernel)."""
        n, defaults = len(values), self.defaults
        while n > self.optional_from and not isinstance(values[n - 1], torch.Tensor) \
                and values[n - 1] == defaults[n - 1][1]:
            n -= 1
        return values if n == len(values) else values[:n]


def _fits(kind: str, value) -> bool:
    """Whether a list element fits the list ``kind``."""
    if value is None:
        return kind == "List[Optional[Tensor]]"
    if _LISTS[kind] is torch.Tensor:
        return type(value) in _PLAIN and not value.is_meta
    return type(value) is _LISTS[kind]


def _eager() -> bool:
    """Whether this is a plain eager call: not traced by dynamo (checked first, so dynamo folds the
    rest away), no functorch transform, no dispatch or function mode (fake tensors, make_fx,
    opcheck's checks, ``torch.device`` contexts), and no profiler (which records the op by name)."""
    return not (torch.compiler.is_compiling() or _C._are_functorch_transforms_active()
                or _C._len_torch_dispatch_stack() or _C._len_torch_function_stack() or _profiler_enabled())


class EagerOp(CustomOpDef):
    """A ``CustomOpDef`` whose plain eager calls skip the dispatcher (see the module's docstring)."""

    _eager: _Signature
    _autocast = False  # register_autocast casts the inputs in the dispatcher: such an op keeps to it

    def register_autocast(self, *args, **kwargs):
        self._autocast = True
        return super().register_autocast(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        signature = self._eager
        if not _eager() or kwargs or not signature.usable or len(self._backend_fns) != 1 or None not in \
                self._backend_fns or self._disabled_kernel or self._autocast:
            return self._opoverload(*args, **kwargs)
        values = signature.arguments(args)
        if values is None:
            return self._opoverload(*args)
        given = signature.without_defaults(values)
        if _C.is_grad_enabled() and _C._any_requires_grad(*given):
            if not signature.differentiable or self._backward_fn is None:
                return self._opoverload(*args)  # torch's errors (no formula, a mutated input), where they arise
            result = _Differentiable.apply(*given, (self, values))
            return result if signature.returns is None else signature.returns(result)
        if signature.mutated and not torch.is_inference_mode_enabled():
            for i in signature.mutated:  # what torch's ADInplaceOrView kernel does for a mutating custom op
                torch.autograd.graph.increment_version(values[i])
        result = self._init_fn(*given)
        return result if signature.returns is None else signature.returns(result)


class _Differentiable(torch.autograd.Function):
    """An ``EagerOp`` call that records its backward: what torch's custom-op autograd kernel does
    (``torch._library.autograd.make_autograd_impl``), but for the op and its filled-in arguments
    passed as the last input."""

    @staticmethod
    def forward(ctx, *args):
        (op, values), given = args[-1], args[:-1]
        result = op._init_fn(*given)
        if op._setup_context_fn is not None:
            op._setup_context_fn(ctx=ctx, inputs=tuple(values), output=result)
        ctx.tilemix_op = op
        return result

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]
        try:
            result = ctx.tilemix_op._backward_fn(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (*result, None) if isinstance(result, tuple) else (result, None)
