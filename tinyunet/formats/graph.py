"""Walk a model's wiring on symbols instead of arrays: the one hook every exporter uses.

A tinyunet network writes its wiring once, as ``model._graph(x, run)``: ``forward`` runs it
on arrays, ``summary`` on shapes. Here it runs on :class:`Symbol` objects, and
``run(name, *inputs)`` calls ``visit(name, layer, inputs)`` for each layer in forward order,
which returns the symbol that stands for the layer's output::

    walk(model, visit)  ->  what visit returned for the last layer

What a symbol stands for is the visitor's choice: an ONNX tensor name (onnx_export.py), an
expression of the layer's inputs (keras_hdf5.py checks a Keras file's graph against it). A new
network plugs in by writing its own ``_graph(x, run)`` (and, for the layers it adds, a visitor
case in each exporter): nothing here names the U-Net's layers.

The inputs a layer receives are always a tuple of symbols: ``Concat`` and ``Add`` get their
parts, ``CenterCrop2d`` and ``Crop2d`` get (the tensor to crop, the tensor whose size it takes),
and SegNet's ``MaxUnpool2d`` gets (the tensor, the pool's indices, the tensor whose size it
restores: the wiring's ``tuple(h.shape[2:])`` stands for h). A layer with several outputs (a
pool with ``return_indices``) has its visitor return ``Outputs(y, indices)``; the wiring then
unpacks a tuple of symbols, as it unpacks the arrays of a forward.
"""
from __future__ import annotations


class Symbol:
    """A tensor in a symbolic walk: ``value`` is whatever the visitor made it stand for."""

    def __init__(self, value):
        self.value = value

    @property
    def shape(self):
        # The wiring reads ``h.shape[2:]`` (CenterCrop2d's target size); that stays symbolic:
        # a reference to this tensor, which the crop's visitor resolves.
        return _ShapeOf(self)

    def __repr__(self):
        return f"Symbol({self.value!r})"


class Outputs(tuple):
    """What a visitor returns for a layer with several outputs: one value per output."""


class _ShapeOf:
    def __init__(self, symbol: Symbol):
        self.symbol = symbol

    def __getitem__(self, index):
        return self

    def __iter__(self):             # tuple(h.shape[2:]): one item that stands for h's size
        return iter((self,))


def _flatten(args):
    for arg in args:
        if isinstance(arg, (tuple, list)):              # Concat's and Add's parts, a size tuple
            yield from _flatten(arg)
        elif isinstance(arg, _ShapeOf):                 # a crop's or unpool's target size
            yield arg.symbol
        else:
            yield arg


def walk(model, visit, input_value="input"):
    """Run ``model``'s wiring with ``visit(name, layer, inputs) -> output value``; the input is
    a Symbol holding ``input_value``. Returns the value of the last layer's output."""
    if not hasattr(model, "_graph"):
        raise TypeError(f"{type(model).__name__} has no _graph(x, run) wiring to walk; a tinyunet "
                        f"network writes its forward as _graph so that exporters can follow it")

    def run(name, *args):
        value = visit(name, model.layers[name], tuple(s.value for s in _flatten(args)))
        return tuple(Symbol(v) for v in value) if isinstance(value, Outputs) else Symbol(value)

    return model._graph(Symbol(input_value), run).value
