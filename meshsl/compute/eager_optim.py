"""torch.optim without importing torch._dynamo: about 1.2-1.5 s off every node's start-up.

In torch 2.13 an Optimizer's add_param_group / zero_grad / state_dict / load_state_dict are wrapped
in `torch._disable_dynamo`, which imports torch._dynamo on their first call, and `step` in
`_use_grad`, which imports it on every call to place graph breaks. Nothing can be traced by
torch.compile before torch._dynamo is imported, and outside tracing both wrappers only call the
function (with grad mode set to `differentiable` for a step). So meshsl calls the function directly
until something imports torch._dynamo; from then on every call takes torch's own path. The update
is the same code on the same tensors: bit-identical (tests/e2e/test_startup.py).

Anything unexpected (another torch whose wrappers look different, step hooks, a subclass) takes
torch's own path.
"""
from __future__ import annotations

import functools
import sys

import torch
from torch.optim import optimizer as _optimizer

_DISABLE_DYNAMO_CODE = torch._disable_dynamo(lambda: None).__code__
_USE_GRAD_CODE = _optimizer._use_grad_for_differentiable(lambda self: None).__code__
EAGER_CLASSES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _dynamo_loaded() -> bool:
    return "torch._dynamo" in sys.modules


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__ or ())))


def _eager_until_dynamo(fn, recursive: bool):
    disabled = None

    def call(*args, **kwargs):
        nonlocal disabled
        if not _dynamo_loaded():
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch._dynamo.disable(fn, recursive, wrapping=False)
        return disabled(*args, **kwargs)

    return call


def _patch_disabled_methods() -> None:
    """Pre-fill the cache `torch._disable_dynamo` keeps on the wrapped function (`__dynamo_disable`)."""
    for cls in (_optimizer.Optimizer, *EAGER_CLASSES):
        for attr in vars(cls).values():
            if getattr(attr, "__code__", None) is not _DISABLE_DYNAMO_CODE:
                continue
            inner = _closure(attr)
            fn = inner.get("fn")
            if fn is not None and getattr(fn, "__dynamo_disable", None) is None:
                setattr(fn, "__dynamo_disable", _eager_until_dynamo(fn, inner.get("recursive", True)))


def _raw_step(cls):
    """The undecorated `step` under torch's `_use_grad` wrapper, or None when the chain looks different."""
    fn, seen_use_grad = cls.step, False
    while hasattr(fn, "__wrapped__"):
        if fn.__code__ is _USE_GRAD_CODE:
            if seen_use_grad:
                return None
            seen_use_grad = True
        elif getattr(fn, "__name__", "") != "step":
            return None
        fn = fn.__wrapped__
    return fn if seen_use_grad else None


def _has_step_hooks(optimizer) -> bool:
    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or _optimizer._global_optimizer_pre_hooks or _optimizer._global_optimizer_post_hooks)


def _eager_step(optimizer, raw, closure=None):
    if _dynamo_loaded() or _has_step_hooks(optimizer):
        return type(optimizer).step(optimizer, closure)
    with torch.set_grad_enabled(optimizer.defaults["differentiable"]):
        return raw(optimizer, closure)


def eager(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer, its `step` not importing torch._dynamo (SGD, Adam, AdamW; others unchanged)."""
    if type(optimizer) in EAGER_CLASSES:
        raw = _raw_step(type(optimizer))
        if raw is not None:
            setattr(optimizer, "step", functools.partial(_eager_step, optimizer, raw))  # noqa: B010 (an instance's method)
    return optimizer


_patch_disabled_methods()
