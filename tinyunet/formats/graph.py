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

The inputs a layer receives are always a tuple of symbols: ``Concat`` gets its parts, and
``CenterCrop2d`` gets (the tensor to crop, the tensor whose size it takes).
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


class _ShapeOf:
    def __init__(self, symbol: Symbol):
        self.symbol = symbol

    def __getitem__(self, index):
        return self


def walk(model, visit, input_value="input"):
    """Run ``model``'s wiring with ``visit(name, layer, inputs) -> output value``; the input is
    a Symbol holding ``input_value``. Returns the value of the last layer's output."""
    if not hasattr(model, "_graph"):
        raise TypeError(f"{type(model).__name__} has no _graph(x, run) wiring to walk; a tinyunet "
                        f"network writes its forward as _graph so that exporters can follow it")

    def run(name, *args):
        inputs = []
        for arg in args:
            if isinstance(arg, (tuple, list)):          # Concat's parts
                inputs.extend(arg)
            elif isinstance(arg, _ShapeOf):             # CenterCrop2d's target size
                inputs.append(arg.symbol)
            else:
                inputs.append(arg)
        return Symbol(visit(name, model.layers[name], tuple(s.value for s in inputs)))

    return model._graph(Symbol(input_value), run).value
