"""What FCN and SegNet share with each other (and with the U-Net's interface): the bookkeeping
of a network that is an ordered dict of named layers. The wiring (``_graph``, ``backward``)
is each network's own, in its own file; here are only the parts that do not depend on it.

    model.layers / named_layers()    {dotted name: layer}, in forward order
    parameters() / gradients()       {"<layer>.<key>": array}, the layers' own arrays
    trainable_parameters()           the parameters an optimizer should move: without the
                                     frozen ones (FCN's bilinear upsamplers)
    buffers()                        {"<layer>.running_mean": array, ...}: state that is not
                                     learned by gradient but belongs in a checkpoint (batch norm)
    load_parameters(values)          copy INTO the arrays (so an optimizer keeps working)
    to(device), astype(dtype), train(mode), eval()
    predict_proba(x)                 softmax over the class axis, (N, K, H, W)
    layer_shapes(shape), summary(shape)   the table, from shapes alone

Every forward and backward step goes through ``_run`` / ``_back`` (tracer hooks, and each
layer's saved activations freed as soon as its backward has run), as in tinyunet/unet.py.
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import device_of, get_array_module, is_array, to_device
from tinyunet.grad_mode import keep_freed_memory, no_grad
from tinyunet.layers import Add, Crop2d, Dropout, MaxPool2d, MaxUnpool2d
from tinyunet.layers.base import LayerInputError


class NetworkInputError(LayerInputError):
    """A network was given an input it cannot take (shape, size, channels, dtype)."""


class LayerNetwork:
    """Base of FCN and SegNet: ``self.layers`` and ``self.config`` are set by the subclass."""

    name = "network"

    # -- running one layer: the single place every forward and backward goes through ---------
    def _run(self, name, *inputs):
        layer = self.layers[name]
        output = layer.forward(*inputs)
        if self.tracer is not None:      # a pool that returns (y, indices) is traced by its y
            self.tracer.on_forward(name, layer, output[0] if isinstance(output, tuple) else output)
        return output

    def _begin_backward(self):
        """Drop the previous step's gradients (the optimizer has used them) before the new ones
        arrive, so that two sets never coexist; and from this first backward on, keep what a
        step frees in the process (tinyunet/grad_mode.py, keep_freed_memory)."""
        keep_freed_memory()
        for layer in self.layers.values():
            layer.grads.clear()

    def _back(self, name, grad_output):
        layer = self.layers[name]
        grad_input = layer.backward(grad_output)
        if self.tracer is not None:
            self.tracer.on_backward(name, layer, grad_input)
        layer.release()
        return grad_input

    def _check_input(self, x):
        label, c = type(self).__name__, self.config
        if not is_array(x):
            raise TypeError(f"{label}: the input must be a numpy or cupy array, got {type(x).__name__}")
        if x.ndim != 4:
            hint = "; add the batch axis with x[None]" if x.ndim == 3 else ""
            raise NetworkInputError(f"{label}: the input must be (N, C, H, W), got shape {tuple(x.shape)}{hint}")
        if x.shape[1] != c.in_channels:
            raise NetworkInputError(f"{label}: expected {c.in_channels} input channel(s) (axis 1 of N, C, H, W), "
                                    f"got shape {tuple(x.shape)}; or build it with in_channels={x.shape[1]}")
        if x.dtype != self.dtype:
            hint = " scaled to [0, 1]" if x.dtype.kind in "ui" else ""
            raise TypeError(f"{label}: the input is {x.dtype} but the model is {self.dtype}; pass "
                            f"x.astype(np.{self.dtype.name}){hint}")
        if device_of(x) != self.device:
            raise TypeError(f"{label}: the input is on the {device_of(x).upper()} but the model is on the "
                            f"{self.device.upper()}; move one of them")
        self.layer_shapes(x.shape)               # every size fits, or a clear error now

    # -- parameters, gradients, buffers ---------------------------------------------------------
    def named_layers(self) -> dict:
        return dict(self.layers)

    def parameters(self) -> dict:
        return {f"{name}.{key}": value for name, layer in self.layers.items() for key, value in layer.params.items()}

    def gradients(self) -> dict:
        return {f"{name}.{key}": value for name, layer in self.layers.items() for key, value in layer.grads.items()}

    def trainable_parameters(self) -> dict:
        """parameters() without the frozen layers' (their gradient is written as zeros)."""
        return {f"{name}.{key}": value for name, layer in self.layers.items() if not getattr(layer, "frozen", False)
                for key, value in layer.params.items()}

    def buffers(self) -> dict:
        return {f"{name}.{key}": value for name, layer in self.layers.items()
                for key, value in getattr(layer, "buffers", {}).items()}

    def num_parameters(self) -> int:
        return int(sum(value.size for value in self.parameters().values()))

    def load_parameters(self, values: dict) -> None:
        """Copy ``values`` INTO the parameters and buffers; every mismatch is listed."""
        own = {**self.parameters(), **self.buffers()}
        problems = [f"  {name}: missing" for name in own if name not in values]
        problems += [f"  {name}: not a parameter of this model" for name in values if name not in own]
        problems += [f"  {name}: expected shape {tuple(own[name].shape)}, found {tuple(values[name].shape)}"
                     for name in own if name in values and tuple(values[name].shape) != tuple(own[name].shape)]
        if problems:
            raise ValueError(f"{type(self).__name__}.load_parameters: the values do not fit this model:\n"
                             + "\n".join(problems))
        for name, target in own.items():
            target[...] = to_device(values[name], device_of(target))

    def random_generators(self) -> dict:
        return {name: layer.rng for name, layer in self.layers.items() if isinstance(layer, Dropout)}

    # -- devices, dtypes, modes -------------------------------------------------------------
    @property
    def device(self) -> str:
        return device_of(next(iter(self.parameters().values())))

    @property
    def dtype(self):
        return np.dtype(self.config.dtype)

    def to(self, device: str):
        for layer in self.layers.values():
            layer.to(device)
        return self

    def astype(self, dtype):
        import dataclasses
        for layer in self.layers.values():
            layer.astype(dtype)
        self.config = dataclasses.replace(self.config, dtype=np.dtype(dtype).name)
        return self

    def train(self, mode: bool = True):
        """Training mode: dropout drops, batch norm uses and updates batch statistics."""
        self.training = mode
        for layer in self.layers.values():
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def predict_proba(self, x):
        """softmax(forward(x)) over the class axis: (N, K, H, W), each pixel's K sum to 1.
        A prediction, as UNet.predict_proba: runs inside no_grad() (no layer keeps anything for
        a backward); set the mode yourself (``eval()``: dropout off, batch norm's running statistics)."""
        with no_grad():
            z = self.forward(x)
        xp = get_array_module(z)
        e = xp.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def __call__(self, x):
        return self.forward(x)

    # -- shapes and the summary -------------------------------------------------------------
    def layer_shapes(self, input_shape) -> list:
        """[(name, layer, output shape)] in forward order, from shapes alone: ``_graph`` runs on
        zero-stride placeholders and each layer's output_shape (no arithmetic)."""
        dtype, records = self.dtype, []

        def placeholder(shape, kind=None):
            return np.broadcast_to(np.zeros((), kind or dtype), tuple(shape))

        def shape_run(name, *inputs):
            layer, x = self.layers[name], inputs[0]
            if isinstance(layer, Add):
                out = x[0].shape
            elif isinstance(layer, Crop2d):
                out = layer.output_shape(x.shape, inputs[1])
            elif isinstance(layer, MaxUnpool2d):
                out = layer.output_shape(x.shape, inputs[2])
            elif hasattr(layer, "output_shape"):
                out = layer.output_shape(x.shape)
            else:
                out = x.shape
            out = tuple(int(s) for s in out)
            if min(out) < 1:
                raise NetworkInputError(f"{type(self).__name__}: an input of shape {tuple(input_shape)} leaves "
                                        f"{name} with an empty output {out}; use a larger input")
            records.append((name, layer, out))
            if isinstance(layer, MaxPool2d) and layer.return_indices:
                return placeholder(out), placeholder(out, np.int64)
            return placeholder(out)

        self._graph(placeholder(input_shape), shape_run)
        return records

    def output_shape(self, input_shape) -> tuple:
        """(N, C_in, H, W) -> (N, K, H, W) of the logits, from shapes alone (clear error for a
        size that does not fit)."""
        return self.layer_shapes(tuple(input_shape))[-1][2]

    def inference_bytes(self, input_shape, parts: bool = False):
        """A conservative estimate of the peak bytes of one forward inside no_grad() for an
        (N, C, H, W) input, from ``layer_shapes`` (tinyunet.infer sizes tiles and batches with it):

            parameters + buffers
          + workspace        the largest 'cols' and 'padded' slots of the convs (Conv2d.inference_bytes)
          + kept             the input x (FCN's last crop reads it) and EVERY pool output for the
                             whole forward (FCN reads pool3 and pool4 again at its score layers;
                             SegNet keeps each pool's int64 indices for its decoder): an upper bound
          + max over layers  its input + its output + its temporaries (a conv's Winograd or
                             shifted buffers; a transposed conv's column matrix
                             N * F * k * k * H * W; nothing here is done in place)

        ``parts=True`` returns {'parameters', 'workspace', 'activations', 'peak_layer'}.
        Test: tests/test_models.py::test_inference_bytes_bound_what_numpy_allocates."""
        from tinyunet.layers import Conv2d, ConvTranspose2d
        item = self.dtype.itemsize
        records = self.layer_shapes(tuple(input_shape))
        kept = int(np.prod(input_shape)) * item
        slots = {"cols": 0, "padded": 0}
        peak, peak_layer, previous = 0, None, tuple(input_shape)
        for name, layer, out in records:
            size_in, size_out = int(np.prod(previous)) * item, int(np.prod(out)) * item
            temporary = 0
            if isinstance(layer, Conv2d):
                temporary, slot, workspace = layer.inference_bytes(previous)
                slots[slot] = max(slots[slot], workspace)
            elif isinstance(layer, ConvTranspose2d):
                kh, kw = layer.kernel_size
                temporary = previous[0] * layer.out_channels * kh * kw * previous[2] * previous[3] * item
            if isinstance(layer, (Add, Crop2d)):
                size_in *= 2                             # two inputs (the crop's reference: its shape only)
            here = size_in + size_out + temporary
            if here > peak:
                peak, peak_layer = here, name
            if isinstance(layer, MaxPool2d):
                kept += size_out + (int(np.prod(out)) * 8 if layer.return_indices else 0)
            previous = out
        parameters = sum(int(v.size) * v.dtype.itemsize for v in {**self.parameters(), **self.buffers()}.values())
        result = {"parameters": parameters, "workspace": slots["cols"] + slots["padded"],
                  "activations": kept + peak, "peak_layer": peak_layer}
        return result if parts else parameters + result["workspace"] + result["activations"]

    def summary(self, input_shape, print_fn=print) -> str:
        """A table: layer (type), output shape, parameters; then the totals."""
        rows, total = [], 0
        for name, layer, out in self.layer_shapes(input_shape):
            count = int(sum(v.size for v in layer.params.values()))
            total += count
            note = " frozen" if getattr(layer, "frozen", False) else ""
            rows.append((f"{name} ({type(layer).__name__}{note})", str(out), f"{count:,}"))
        headers = ("Layer (type)", "Output shape", "Param #")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
        rule = "=" * len(line)
        trainable = int(sum(v.size for v in self.trainable_parameters().values()))
        buffers = int(sum(v.size for v in self.buffers().values()))
        text = [f"{type(self).__name__} {self.config.to_json()}", f"input {tuple(input_shape)}", rule, line, rule]
        text += ["  ".join(v.rjust(w) if i == 2 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in rows]
        text += [rule, f"Total params: {total:,}", f"Trainable params: {trainable:,}"
                 + (f"   (+ {buffers:,} batch-norm running statistics, not parameters)" if buffers else "")]
        result = "\n".join(text)
        if print_fn is not None:
            print_fn(result)
        return result

