"""Inference mode: ``with tinyunet.no_grad():`` runs forwards that keep nothing for a backward.

A layer's forward normally keeps what its backward will need (a conv its input, a ReLU its
mask, a pool its argmax: tinyunet/layers/base.py). Prediction never runs a backward, so that
memory only costs: at 512x512 the exact U-Net keeps about 1 GB of it. Inside ``no_grad()``
every layer keeps nothing (it also drops what an earlier forward kept), the U-Net lets go of
each activation as soon as the layer that reads it has run (a skip lives until its concat),
and work done only for a backward (the pool's argmax, the ReLU's mask) is skipped. Outputs
are the same numbers. A backward after such a forward raises an error that says so.

    import tinyunet
    model.eval()                       # dropout off: what prediction wants
    with tinyunet.no_grad():           # keep nothing for a backward
        logits = model.forward(x)

Why a context manager and not ``eval()``: the two are different switches, as in PyTorch.
``eval()`` changes what the forward computes (dropout off); ``no_grad()`` changes only what
it keeps. A gradient check or a saliency map runs a backward in evaluation mode, so ``eval()``
cannot imply "no backward"; and ``no_grad()`` also serves a forward in training mode whose
result is only looked at. tinyunet.infer's prediction functions use both.

The switch is per thread (as PyTorch's), so a thread that predicts does not change what
another thread's training forward keeps. Tests: tests/test_inference_mode.py.
"""
from __future__ import annotations

import contextlib
import threading

_state = threading.local()


def is_grad_enabled() -> bool:
    """False inside ``no_grad()``: forwards then keep nothing for a backward."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Forwards inside this block keep nothing for a backward (see the module docstring).
    Nests; the previous setting comes back when the block ends, also on an error."""
    previous = is_grad_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = previous


@contextlib.contextmanager
def enable_grad():
    """Inside a ``no_grad()`` block: forwards keep what backward needs again."""
    previous = is_grad_enabled()
    _state.enabled = True
    try:
        yield
    finally:
        _state.enabled = previous
