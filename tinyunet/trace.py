"""Tracing: what every layer of a U-Net computed, forward and backward, in a few lines.

    from tinyunet.trace import trace

    with trace(model) as t:
        logits = model.forward(x)
        loss, dlogits = bce_with_logits(logits, target)
        model.backward(dlogits)
    print(t.table())                          # one row per layer, in forward order
    t.records["head.relu"].zero_fraction      # the share of that layer's outputs that were 0
    print(t.skip_table())                     # the two gradients that meet at each skip

Per layer, a :class:`LayerRecord` (in ``t.records``, a dict in forward order):

    forward    name, type, output shape, mean, std, share of exact zeros (overall and per
               channel, axis 1 of N, C, H, W)
    backward   |dL/d input| (Euclidean norm over the whole array; a Concat has two inputs, so
               it also keeps one norm per input) and |dL/dp| for each parameter p

Per skip connection, a :class:`SkipRecord` (in ``t.skips``, keyed by level i). The output
h_i of level i of the contracting path goes two ways: into ``down{i}.pool`` and across to
``up{i}.concat``. L depends on h_i through both, so (the chain rule for a variable used twice)

    dL/dh_i = dL/dh_i via the pool  +  dL/dh_i via the skip

The first is ``down{i}.pool``'s grad_input; the second is the first half of ``up{i}.concat``'s
(or, in the 'valid' network, ``up{i}.crop``'s, which pads it back to h_i's size). The record
keeps both norms, the norm of their sum and the cosine between them (1: they agree, 0:
unrelated, -1: they cancel).

Costs nothing when off: ``UNet._run`` and ``UNet._back`` call the tracer only when
``model.tracer is not None``, so an untraced model pays one attribute test per layer.
:func:`trace` sets ``model.tracer`` and puts the previous value (normally None) back when the
block ends, even when it ends with an error.

The statistics are computed where the data lives, with its array module (NumPy or CuPy), in
float64 accumulators, and converted to Python floats (on the GPU that waits for the kernels).
A second forward inside one ``with`` replaces the records of the first.
Tests: tests/test_trace.py.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import numpy as np

from tinyunet.backend import get_array_module, to_numpy
from tinyunet.layers import CenterCrop2d, Concat, MaxPool2d

_LEVEL = re.compile(r"^(up|down)(\d+)\.")


# ---------------------------------------------------------------------------------------------
# Statistics of one array
# ---------------------------------------------------------------------------------------------
def norm(a) -> float:
    """The Euclidean norm of the whole array, accumulated in float64 (a float32 sum of squares
    overflows at 1e19: exactly the exploding gradients one traces for)."""
    xp = get_array_module(a)
    with np.errstate(all="ignore"):
        return float(xp.linalg.norm(a.astype(xp.float64, copy=False).ravel()))


def _zero_share_per_channel(zeros) -> tuple[float, ...]:
    """Share of zeros in each channel (axis 1) of an (N, C, ...) bool array; () below 2-D."""
    if zeros.ndim < 2:
        return ()
    axes = (0,) + tuple(range(2, zeros.ndim))
    return tuple(float(v) for v in to_numpy(zeros.mean(axis=axes)))


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """What one layer computed in the last traced forward and backward.

    grad_norm is None until the layer's backward has run; grad_norms holds one norm per input
    (two for a Concat: [skip, up]); param_grad_norms is {'weight': |dL/dW|, 'bias': |dL/db|}
    for layers with parameters, else empty.
    """
    name: str
    kind: str
    shape: tuple
    mean: float
    std: float
    zero_fraction: float
    channel_zero_fraction: tuple = ()
    grad_norm: float | None = None
    grad_norms: tuple = ()
    param_grad_norms: dict = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        """False when the output or a gradient held NaN or inf (their mean or norm is not finite)."""
        values = [self.mean, self.std, *self.param_grad_norms.values()]
        if self.grad_norm is not None:
            values.append(self.grad_norm)
        return all(math.isfinite(v) for v in values)


@dataclass
class SkipRecord:
    """The two gradients that meet at the output of level i (see the module docstring)."""
    level: int
    shape: tuple
    skip_norm: float        # |dL/dh_i| through up{i}.concat (and up{i}.crop)
    pool_norm: float        # |dL/dh_i| through down{i}.pool
    sum_norm: float         # |their sum|: what flows on into level i
    cosine: float           # <skip, pool> / (|skip| |pool|); nan when either is zero


# ---------------------------------------------------------------------------------------------
# The tracer
# ---------------------------------------------------------------------------------------------
class Tracer:
    """Receives ``on_forward`` / ``on_backward`` from a model (or from anyone's own loop) and
    keeps a LayerRecord per layer name and a SkipRecord per U-Net level."""

    def __init__(self):
        self.records: dict[str, LayerRecord] = {}
        self.skips: dict[int, SkipRecord] = {}
        self.backward_order: list[str] = []
        self._skip_grads: dict[int, object] = {}   # dL/dh_i via the skip, until the pool's turn

    def on_forward(self, name: str, layer, output) -> None:
        xp = get_array_module(output)
        zeros = output == 0
        if self.backward_order:                    # a forward after a backward: a new pass
            self.backward_order = []
        with np.errstate(all="ignore"):            # NaN/inf are recorded (see finite), not warned
            mean, std = float(output.mean(dtype=xp.float64)), float(output.std(dtype=xp.float64))
        self.records[name] = LayerRecord(
            name=name, kind=type(layer).__name__, shape=tuple(output.shape), mean=mean, std=std,
            zero_fraction=float(zeros.mean()), channel_zero_fraction=_zero_share_per_channel(zeros))

    def on_backward(self, name: str, layer, grad_input) -> None:
        self.backward_order.append(name)
        parts = grad_input if isinstance(grad_input, tuple) else (grad_input,)
        part_norms = tuple(norm(g) for g in parts)
        record = self.records.get(name)
        if record is not None:
            record.grad_norms = part_norms
            record.grad_norm = math.sqrt(sum(n * n for n in part_norms))
            record.param_grad_norms = {key: norm(g) for key, g in layer.grads.items()}
        self._pair_skip_gradients(name, layer, parts)

    def _pair_skip_gradients(self, name, layer, parts) -> None:
        """Hold the skip's gradient of level i until down{i}.pool's backward brings the other.
        Holding it costs no memory: UNet.backward keeps the same array until it adds the two."""
        match = _LEVEL.match(name)
        if match is None:
            return
        level = int(match.group(2))
        if isinstance(layer, Concat):
            self._skip_grads[level] = parts[0]      # [skip, up]: the skip comes first
        elif isinstance(layer, CenterCrop2d):
            self._skip_grads[level] = parts[0]      # the crop's backward: the skip at h_i's size
        elif isinstance(layer, MaxPool2d) and level in self._skip_grads:
            via_skip, via_pool = self._skip_grads.pop(level), parts[0]
            xp = get_array_module(via_pool)
            skip64 = via_skip.astype(xp.float64, copy=False)
            pool64 = via_pool.astype(xp.float64, copy=False)
            a, b = norm(skip64), norm(pool64)
            with np.errstate(all="ignore"):
                dot = float((skip64 * pool64).sum())
                total = norm(skip64 + pool64)
            self.skips[level] = SkipRecord(
                level=level, shape=tuple(via_pool.shape), skip_norm=a, pool_norm=b, sum_norm=total,
                cosine=dot / (a * b) if a > 0 and b > 0 else float("nan"))

    def close(self) -> None:
        """Drop any gradient still held (a backward that stopped half way)."""
        self._skip_grads.clear()

    # -- reading the records --------------------------------------------------------------------
    def first_nonfinite(self) -> str | None:
        """The first layer (in forward order) whose output or gradients held NaN or inf."""
        return next((name for name, r in self.records.items() if not r.finite), None)

    def table(self) -> str:
        """One row per layer: output shape and statistics, then the backward's norms."""
        headers = ("layer", "type", "output shape", "mean", "std", "zeros", "|dL/dinput|", "|dL/dW|")
        rows = []
        for r in self.records.values():
            weight = r.param_grad_norms.get("weight")
            rows.append((r.name, r.kind, str(r.shape), f"{r.mean:.4g}", f"{r.std:.4g}",
                         f"{100 * r.zero_fraction:.1f}%",
                         "-" if r.grad_norm is None else f"{r.grad_norm:.3e}",
                         "" if weight is None else f"{weight:.3e}"))
        return format_table(headers, rows)

    def skip_table(self) -> str:
        """One row per level: the gradient via the skip, via the pool, their sum, the cosine."""
        headers = ("level", "shape of h_i", "|via skip|", "|via pool|", "|sum|", "cosine")
        rows = [(str(s.level), str(s.shape), f"{s.skip_norm:.3e}", f"{s.pool_norm:.3e}",
                 f"{s.sum_norm:.3e}", f"{s.cosine:+.3f}") for s in sorted(self.skips.values(),
                                                                          key=lambda s: s.level)]
        return format_table(headers, rows)


@contextlib.contextmanager
def trace(model, tracer: Tracer | None = None):
    """``with trace(model) as t:`` records every layer the model runs inside the block.

    Sets ``model.tracer`` (a fresh Tracer unless one is given) and restores the previous value
    on exit, error or not.
    """
    tracer = tracer if tracer is not None else Tracer()
    previous = model.tracer
    model.tracer = tracer
    try:
        yield tracer
    finally:
        model.tracer = previous
        tracer.close()


# ---------------------------------------------------------------------------------------------
# Text tables (the tour prints its own with this too)
# ---------------------------------------------------------------------------------------------
def format_table(headers, rows) -> str:
    """Columns padded to their widest cell: text left-aligned, numbers right-aligned."""
    rows = [tuple(str(c) for c in row) for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def numeric(cell):
        return bool(cell) and (cell[0].isdigit() or cell[0] in "+-.") and cell not in ("-",)

    def line(cells):
        return "  ".join(c.rjust(w) if numeric(c) else c.ljust(w)
                         for c, w in zip(cells, widths)).rstrip()

    rule = "-" * len(line(headers))
    return "\n".join([line(headers), rule] + [line(row) for row in rows])
