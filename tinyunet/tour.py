"""The backprop tour: every layer's gradient proved live, then one traced step of the U-Net.

Run it with ``python examples/backprop_tour.py`` (``--help`` lists the options). Two parts:

1. One layer type at a time (conv, pool, upsample, concat, crop, dropout, relu, sigmoid, bce),
   on a tiny float64 input: the shapes, the forward and backward formulas, and for every input
   and parameter the analytic gradient (the layer's backward) beside the numerical one
   (central differences), with their relative error. The scalar is L = sum(y * r) for a fixed
   random r, so the backward receives dL/dy = r (tinyunet.gradcheck explains the method).
   Then a fact about the layer, computed on the spot (how many windows a pixel sits in, why
   col2im adds, where the max-pool's gradient goes, ...).

2. One training step of the full U-Net (Adam, BCE from the logits) on a synthetic input,
   traced with tinyunet.trace: every layer's output statistics, the two gradients that meet
   at each skip connection, the gradient norm of every layer's weights (a text table and a
   PNG bar chart), the share of dead ReLUs per layer with a check of the 2-channel head ReLU
   (a dead head channel is a known way for this model to stop learning), and the loss
   before and after the step.

Defaults: the exact U-Net (base width 64, depth 4, 31M parameters) at 64x64, batch 1, on the
CPU: it finishes in seconds. Tests: tests/test_tour.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from tinyunet import kernels
from tinyunet.backend import DeviceError, get_array_module, require_gpu, to_device, to_numpy
from tinyunet.files import atomic_write
from tinyunet.gradcheck import DEFAULT_EPS, numerical_gradient, relative_error
from tinyunet.layers import (CenterCrop2d, Concat, Conv2d, Dropout, MaxPool2d, ReLU, Sigmoid,
                             Upsample2d, sigmoid)
from tinyunet.layers.conv import resolve_padding
from tinyunet.losses import bce_with_logits
from tinyunet.optim import Adam
from tinyunet.trace import Tracer, format_table, norm, trace
from tinyunet.unet import UNet, UNetConfig, UNetInputError

LAYER_TOURS = ("conv", "pool", "upsample", "concat", "crop", "dropout", "relu", "sigmoid", "bce")
DEAD_HEAD_THRESHOLD = 0.95      # a head channel zero at more pixels than this is called dead
PNG_NAME = "grad_norms.png"


# ---------------------------------------------------------------------------------------------
# Part 1: analytic beside numerical, for one layer at a time
# ---------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """One gradient, both ways: the backward's and central differences', and how far apart."""
    name: str
    analytic: np.ndarray
    numerical: np.ndarray
    error: float


def compare_gradients(loss_fn, arrays: dict, analytic: dict) -> list[Comparison]:
    """For each {label: array} (perturbed in place and restored by numerical_gradient), the
    central-difference gradient of ``loss_fn()`` beside ``analytic[label]``."""
    result = []
    for label, array in arrays.items():
        numeric = numerical_gradient(loss_fn, array)
        result.append(Comparison(label, to_numpy(analytic[label]), to_numpy(numeric),
                                 relative_error(analytic[label], numeric)))
    return result


def layer_comparisons(layer, inputs: dict, rng, call=None):
    """Check ``layer`` at ``inputs`` ({symbol: array}) through L = sum(y * r).

    ``call(*inputs)`` runs the forward (default: ``layer.forward``). Parameters are labelled
    W and b. A layer with a random generator (Dropout) has it rewound before every forward, so
    the numerical L uses the mask the backward used. Returns (y, [Comparison]).
    """
    call = call or layer.forward
    state = layer.rng.bit_generator.state if hasattr(layer, "rng") else None

    def forward():
        if state is not None:
            layer.rng.bit_generator.state = state
        return call(*inputs.values())

    y = forward()
    xp = get_array_module(y)
    r = xp.asarray(rng.standard_normal(y.shape))
    grads = layer.backward(r)
    grads = grads if isinstance(grads, tuple) else (grads,)
    analytic = {f"dL/d{symbol}": g.copy() for symbol, g in zip(inputs, grads)}
    arrays = {f"dL/d{symbol}": a for symbol, a in inputs.items()}
    for key, symbol in (("weight", "W"), ("bias", "b")):
        if key in layer.params:
            analytic[f"dL/d{symbol}"] = layer.grads[key].copy()
            arrays[f"dL/d{symbol}"] = layer.params[key]
    return y, compare_gradients(lambda: float((forward() * r).sum()), arrays, analytic)


def _preview(a, count=3) -> str:
    return "[" + " ".join(f"{v + 0.0:+.8e}" for v in np.ravel(a)[:count])  # + 0.0: no "-0" + (" ...]" if np.size(a) > count else "]")


def print_comparisons(comparisons) -> float:
    """Print each gradient both ways; return the largest relative error."""
    for c in comparisons:
        pad = " " * (len(c.name) + len(str(c.analytic.shape)) + 4)
        print(f"   {c.name}  {c.analytic.shape}  analytic   {_preview(c.analytic)}")
        print(f"   {pad}numerical  {_preview(c.numerical)}  relative error {c.error:.2e}")
    return max(c.error for c in comparisons)


def _header(title, source, proof, formulas):
    print()
    print(f"== {title}   {source}   proof: {proof}")
    for line in formulas:
        print(f"   {line}")


def _grid(a) -> str:
    return "\n".join("      " + " ".join(f"{int(v):2d}" for v in row) for row in to_numpy(a))


def tour_conv(rng, device):
    _header("Conv2d", "tinyunet/layers/conv.py", "tests/test_layers.py", [
        "forward   y[n,f,p,q] = b[f] + sum_{c,i,j} W[f,c,i,j] * x_pad[n,c,p+i,q+j]",
        "          im2col lays each window out as a column: Y[n] = W2 @ cols[n] + b,",
        "          W2 = W.reshape(F, C*kh*kw), cols[n]: (C*kh*kw, OH*OW)",
        "backward  (Y = A @ B gives dA = dY @ B^T, dB = A^T @ dY)",
        "          dW2 = sum_n dY[n] @ cols[n]^T     db[f] = sum_{n,p,q} dY[n,f,p,q]",
        "          dx = col2im(W2^T @ dY)             col2im ADDS what every window gives back"])
    layer = Conv2d(2, 3, 3, padding="same", seed=1, dtype=np.float64).to(device)
    layer.params["bias"][...] = to_device(rng.normal(0, 0.1, 3), device)
    x = to_device(rng.standard_normal((1, 2, 5, 5)), device)
    y, comparisons = layer_comparisons(layer, {"x": x}, rng)
    print(f"   shapes    x {x.shape}  W {layer.params['weight'].shape}  b {layer.params['bias'].shape}"
          f"  ->  y {y.shape}   (3x3, 'same' padding)")
    worst = print_comparisons(comparisons)
    # Why col2im must add: count the windows each pixel sits in, then assign instead of add.
    xp = get_array_module(x)
    pad = resolve_padding("same", (3, 3), (1, 1), x.shape[2:])
    cols = kernels.im2col(x, (3, 3), pad, (1, 1))
    counts = kernels.col2im(xp.ones_like(cols), x.shape, (3, 3), pad, (1, 1))[0, 0]
    print("   how many 3x3 windows each pixel of a 5x5 image sits in (col2im of all-ones columns):")
    print(_grid(counts))
    dcols = xp.matmul(layer.params["weight"].reshape(3, -1).T, xp.asarray(rng.standard_normal((1, 3, 25))))
    wrong = _col2im_assigning(dcols, x.shape, (3, 3), pad)
    right = kernels.col2im(dcols, x.shape, (3, 3), pad, (1, 1))
    print(f"   a col2im that ASSIGNS keeps one window's share of each pixel: its dx is off by a "
          f"relative {relative_error(right, wrong):.2f}")
    return worst


def _col2im_assigning(dcols, x_shape, kernel, padding):
    """The classic bug, for the tour only: col2im with '=' where '+=' belongs (stride 1)."""
    xp = get_array_module(dcols)
    n, c, h, w = x_shape
    (kh, kw), ((pt, pb), (pl, pr)) = kernel, padding
    oh, ow = h + pt + pb - kh + 1, w + pl + pr - kw + 1
    view = dcols.reshape(n, c, kh, kw, oh, ow)           # the layout of tinyunet.kernels
    padded = xp.zeros((n, c, h + pt + pb, w + pl + pr), dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            padded[:, :, i:i + oh, j:j + ow] = view[:, :, i, j]    # the bug: '=' overwrites
    return padded[:, :, pt:pt + h, pl:pl + w]


def tour_pool(rng, device):
    _header("MaxPool2d", "tinyunet/layers/pool.py", "tests/test_layers.py", [
        "forward   y[n,c,p,q] = max_{i,j < 2} x[n,c,2p+i,2q+j]",
        "backward  near x the max IS its largest input (slope 1) and ignores the others (slope 0):",
        "          dx = dy at each window's argmax, 0 at the other three (a tie: the first max, as cuDNN)"])
    size = 2 * 4 * 4                   # distinct values: no ties, so every argmax is unique
    x = to_device(rng.permutation(size).reshape(1, 2, 4, 4) / size - 0.5, device)
    layer = MaxPool2d(2)
    y, comparisons = layer_comparisons(layer, {"x": x}, rng)
    print(f"   shapes    x {x.shape}  ->  y {y.shape}")
    worst = print_comparisons(comparisons)
    dx = to_numpy(layer.backward(get_array_module(y).ones_like(y)))
    print(f"   dx of dy = 1: {int((dx != 0).sum())} nonzero elements out of {dx.size}, one per window "
          f"({y.size} windows): each window's gradient went to one element")
    return worst


def tour_upsample(rng, device):
    _header("Upsample2d", "tinyunet/layers/upsample.py", "tests/test_layers.py", [
        "forward   y[n,c,h,w] = x[n,c,h//2,w//2]   (each pixel copied into a 2x2 block)",
        "backward  dx[n,c,h,w] = sum_{a,b < 2} dy[n,c,2h+a,2w+b]   (a copy used 4 times gets 4 gradients)"])
    x = to_device(rng.standard_normal((1, 2, 2, 3)), device)
    layer = Upsample2d(2)
    y, comparisons = layer_comparisons(layer, {"x": x}, rng)
    print(f"   shapes    x {x.shape}  ->  y {y.shape}")
    worst = print_comparisons(comparisons)
    dy = get_array_module(y).ones_like(y)
    print(f"   dx of dy = 1: every element is {float(layer.backward(dy).max()):.0f}, the size of its block")
    return worst


def tour_concat(rng, device):
    _header("Concat", "tinyunet/layers/concat.py", "tests/test_layers.py", [
        "forward   y = [skip, up] along the channels: (N, C1, H, W), (N, C2, H, W) -> (N, C1 + C2, H, W)",
        "backward  every output channel copies one input channel: dskip = dy[:, :C1], dup = dy[:, C1:]",
        "          in the U-Net the skip's tensor also went into the pool: its two gradients ADD",
        "          (part 2 shows both at every level)"])
    skip = to_device(rng.standard_normal((1, 2, 3, 3)), device)
    up = to_device(rng.standard_normal((1, 1, 3, 3)), device)
    layer = Concat()
    y, comparisons = layer_comparisons(layer, {"skip": skip, "up": up}, rng,
                                       call=lambda a, b: layer.forward((a, b)))
    print(f"   shapes    skip {skip.shape}  up {up.shape}  ->  y {y.shape}")
    return print_comparisons(comparisons)


def tour_crop(rng, device):
    _header("CenterCrop2d", "tinyunet/layers/crop.py", "tests/test_unet.py", [
        "forward   y = x[:, :, top:top+h, left:left+w], the center (the 'valid' U-Net crops its skips)",
        "backward  dx = dy inside that window, 0 on the border: the border was never used"])
    x = to_device(rng.standard_normal((1, 1, 5, 5)), device)
    layer = CenterCrop2d()
    y, comparisons = layer_comparisons(layer, {"x": x}, rng, call=lambda a: layer.forward(a, (3, 3)))
    print(f"   shapes    x {x.shape}  ->  y {y.shape}")
    worst = print_comparisons(comparisons)
    print("   dx of dy = 1 (1: inside the crop, 0: the cut border):")
    print(_grid(layer.backward(get_array_module(y).ones_like(y))[0, 0]))
    return worst


def tour_dropout(rng, device):
    _header("Dropout", "tinyunet/layers/dropout.py", "tests/test_layers.py", [
        "forward   mask = [u >= p] / (1 - p), u ~ Uniform[0, 1);  y = x * mask while training, y = x in eval",
        "backward  dx = dy * mask, the forward's own mask (a fresh one would differentiate another function)",
        "why scale while training: E[mask] = (1 - p) / (1 - p) = 1, so E[y] = x and evaluation needs no rescale"])
    x = to_device(rng.standard_normal((1, 2, 4, 4)), device)
    layer = Dropout(0.5, seed=3)
    y, comparisons = layer_comparisons(layer, {"x": x}, rng)
    print(f"   shapes    x {x.shape}  ->  y {y.shape}   (p = 0.5)")
    worst = print_comparisons(comparisons)
    mask = to_numpy(layer.mask)
    print(f"   this mask kept {int((mask > 0).sum())} of {mask.size} elements, each scaled by "
          f"{mask.max():.1f}")
    big = Dropout(0.5, seed=4)
    mean = float(to_numpy(big.forward(to_device(np.ones(1_000_000), device))).mean())
    print(f"   over 1,000,000 draws the mean of the mask is {mean:.4f}: E[y] = x")
    return worst


def tour_relu(rng, device):
    _header("ReLU", "tinyunet/layers/activation.py", "tests/test_layers.py", [
        "forward   y = max(x, 0)",
        "backward  dx = dy * [x > 0]   (at x = 0 there is no derivative; we use 0, as PyTorch does)"])
    shape = (1, 2, 3, 3)               # |x| >= 0.05: a 1e-6 step never crosses the kink
    x = to_device(rng.choice([-1.0, 1.0], size=shape) * (0.05 + rng.random(shape)), device)
    layer = ReLU()
    y, comparisons = layer_comparisons(layer, {"x": x}, rng)
    print(f"   shapes    x {x.shape}  ->  y {y.shape}")
    worst = print_comparisons(comparisons)
    print(f"   {layer.dead_fraction():.0%} of the inputs were negative: those outputs are 0 and so are "
          f"their gradients (dead for this input; part 2 counts them per layer)")
    return worst


def tour_sigmoid(rng, device):
    _header("Sigmoid", "tinyunet/layers/activation.py", "tests/test_layers.py", [
        "forward   y = 1 / (1 + exp(-x))   (as exp(x) / (1 + exp(x)) for x < 0: no overflow)",
        "backward  dx = dy * y * (1 - y)"])
    x = to_device(rng.standard_normal((1, 1, 3, 3)), device)
    layer = Sigmoid()
    y, comparisons = layer_comparisons(layer, {"x": x}, rng)
    print(f"   shapes    x {x.shape}  ->  y {y.shape}")
    worst = print_comparisons(comparisons)
    slope = to_numpy(y * (1 - y))
    print(f"   y (1 - y) here is at most {slope.max():.3f} (never above 1/4, at x = 0): each sigmoid "
          f"shrinks the gradient at least fourfold")
    return worst


def tour_bce(rng, device):
    _header("BCE with logits", "tinyunet/losses.py", "tests/test_losses.py", [
        "loss      l(z, t) = -(t log p + (1 - t) log(1 - p)), p = sigmoid(z); L = mean over the pixels",
        "stable    l(z, t) = max(z, 0) - z t + log(1 + exp(-|z|))   (never exponentiates a positive number)",
        "gradient  dl/dz = (1 - t) - (1 - p) = p - t,  so dL/dz = (sigmoid(z) - t) / (number of pixels)"])
    z = to_device(rng.standard_normal((1, 1, 4, 4)), device)
    t = to_device((rng.random((1, 1, 4, 4)) > 0.5).astype(np.float64), device)
    loss, dz = bce_with_logits(z, t)
    print(f"   shapes    z {z.shape}  t {t.shape}  ->  L = {loss:.6f} (a scalar), dL/dz {dz.shape}")
    worst = print_comparisons(compare_gradients(lambda: bce_with_logits(z, t)[0], {"dL/dz": z}, {"dL/dz": dz}))
    extreme = to_device(np.array([-1000.0, 1000.0]), device)
    ones = get_array_module(extreme).ones_like(extreme)
    with np.errstate(divide="ignore", over="ignore"):
        naive = -np.log(to_numpy(sigmoid(extreme))) + 0.0
    stable, grad = bce_with_logits(extreme, ones)
    print(f"   t = 1 at z = -1000, +1000: the naive -log(sigmoid(z)) gives {naive[0]}, {naive[1]}; the "
          f"stable form gives a mean of {stable:.1f} and dL/dz = {to_numpy(grad).tolist()}")
    return worst


TOURS = {"conv": tour_conv, "pool": tour_pool, "upsample": tour_upsample, "concat": tour_concat,
         "crop": tour_crop, "dropout": tour_dropout, "relu": tour_relu, "sigmoid": tour_sigmoid,
         "bce": tour_bce}


def layer_tour(names, device="cpu", seed=0) -> dict:
    """Part 1 for the layer types ``names``; returns {name: largest relative error}."""
    print("Part 1: each layer's backward against central differences "
          f"(float64, eps {DEFAULT_EPS:g}, L = sum(y * r) so dL/dy = r)")
    rng = np.random.default_rng(seed)
    worst = {name: TOURS[name](rng, device) for name in names}
    print(f"\nLargest relative error: {max(worst.values()):.2e} (float64 central differences of a correct "
          f"backward give 1e-11 to 1e-8; a wrong one is far above 1e-6, often near 1)")
    return worst


# ---------------------------------------------------------------------------------------------
# Part 2: one traced training step of the U-Net
# ---------------------------------------------------------------------------------------------
def synthetic_batch(model, batch: int, size: int, seed: int = 0):
    """A smooth random image in [0, 1] (Gaussian-blurred noise) and a binary target of the
    logits' shape (its brighter half), on the model's device and dtype: no data needed."""
    rng = np.random.default_rng(seed)
    channels = model.config.in_channels
    noise = rng.standard_normal((batch, channels, size, size))
    smooth = gaussian_filter(noise, sigma=(0, 0, size / 16, size / 16), mode="wrap")
    image = (smooth - smooth.min()) / max(float(np.ptp(smooth)), 1e-12)
    _, _, oh, ow = model.output_shape(image.shape)
    top, left = (size - oh) // 2, (size - ow) // 2          # 'valid': the output's center
    brightness = image.mean(axis=1, keepdims=True)[:, :, top:top + oh, left:left + ow]
    target = (brightness > np.median(brightness)).astype(model.dtype)
    return to_device(image.astype(model.dtype), model.device), to_device(target, model.device)


@dataclass
class StepReport:
    loss_before: float
    loss_after: float
    tracer: Tracer
    dead_head_channels: list
    png: Path
    seconds: float


def unet_step(model, x, target, lr: float = 1e-4, out_dir="runs/tour") -> StepReport:
    """Part 2: forward and backward traced, the tables, the PNG, one Adam step, the loss again."""
    c = model.config
    print(f"\nPart 2: one training step of the U-Net (base width {c.base_width}, depth {c.depth}, "
          f"'{c.padding}' padding, head ReLU {'on' if model.head_relu is not None else 'off'}, "
          f"{model.num_parameters():,} parameters, {c.dtype}, {model.device})")
    print(f"   input x {tuple(x.shape)}: a smooth random image; target {tuple(target.shape)}: its "
          f"brighter half; loss: BCE from the logits")
    generators = model.random_generators()
    dropout_states = {name: rng.bit_generator.state for name, rng in generators.items()}
    start = time.perf_counter()
    model.train()
    with trace(model) as t:
        logits = model.forward(x)
        loss_before, dlogits = bce_with_logits(logits, target)
        model.backward(dlogits)
    seconds = time.perf_counter() - start

    print(f"\nForward and backward in {seconds:.2f} s, traced (tinyunet.trace: `with trace(model) as t:` "
          f"... `t.table()`): each layer's output, then the norm of the gradient its backward returned")
    print(t.table())
    print_skips(t)
    png = print_weight_gradients(model, t, out_dir)
    dead = print_dead_relus(model, t)

    optimizer = Adam(model.parameters(), lr=lr)
    optimizer.step(model.gradients())
    for name, rng in generators.items():          # the same dropout masks: only the step differs
        rng.bit_generator.state = dropout_states[name]
    loss_after, _ = bce_with_logits(model.forward(x), target)
    print(f"\nOne Adam step (lr {lr:g}), then the same forward again (same dropout masks):")
    print(f"   loss before {loss_before:.6f}   after {loss_after:.6f}   change {loss_after - loss_before:+.6f}")
    if not loss_after < loss_before:
        print("   the loss did not go down: try a lower --lr (Adam's first step moves every weight by about lr)")
    return StepReport(loss_before, loss_after, t, dead, png, seconds)


def print_skips(t: Tracer) -> None:
    print("\nSkip connections: the output h_i of down level i goes into down{i}.pool AND across to "
          "up{i}.concat,\nso dL/dh_i is the SUM of the gradient via the skip and via the pool (the chain rule "
          "for a\nvariable used twice; tinyunet/unet.py adds them, tests/test_unet.py proves it). "
          "cosine +1: they agree, 0: unrelated")
    print(t.skip_table())


def print_weight_gradients(model, t: Tracer, out_dir) -> Path:
    """The |dL/dW| table of every layer with weights, and the same as a PNG bar chart."""
    params = model.parameters()
    rows, names, values = [], [], []
    for name, record in t.records.items():
        norms = record.param_grad_norms
        if "weight" not in norms:
            continue
        weight = params[f"{name}.weight"]
        w_norm = norm(weight)
        rows.append((name, str(tuple(weight.shape)), f"{w_norm:.3e}", f"{norms['weight']:.3e}",
                     f"{norms['bias']:.3e}" if "bias" in norms else "-",
                     f"{norms['weight'] / w_norm:.2e}" if w_norm else "-"))
        names.append(name)
        values.append(norms["weight"])
    print("\nWeight gradients: the norm of dL/dW and dL/db of every conv, and |dL/dW| / |W| "
          "(how far one plain SGD step of lr 1 would move the weights)")
    print(format_table(("layer", "weight shape", "|W|", "|dL/dW|", "|dL/db|", "|dL/dW| / |W|"), rows))
    path = Path(out_dir) / PNG_NAME
    plot_gradients(names, values, t, path, f"{model.config.to_json()}")
    print(f"   bar chart (log scale): {path}")
    return path


def plot_gradients(names, values, t: Tracer, path: Path, title: str) -> None:
    """Two panels: |dL/dW| per layer (log scale; a zero is marked, not drawn) and each skip's
    two gradients. Written to a temporary file, then moved over ``path`` (never half a PNG)."""
    from matplotlib.figure import Figure     # no pyplot: no global backend, no GUI, no warnings

    levels = sorted(t.skips)
    fig = Figure(figsize=(10, 3 + 0.22 * len(names)), layout="constrained")
    bars, skips = fig.subplots(1, 2, width_ratios=(3, 2))
    positions = np.arange(len(names))
    drawn = [v if v > 0 else np.nan for v in values]
    bars.barh(positions, drawn, color="tab:blue")
    for p, v in zip(positions, values):
        if not v > 0:
            bars.annotate("0: no gradient", (0.01, p), xycoords=("axes fraction", "data"),
                          va="center", fontsize=8, color="tab:red")
    bars.set_yticks(positions, names, fontsize=8)
    bars.invert_yaxis()                      # forward order, top to bottom
    if any(v > 0 for v in values):
        bars.set_xscale("log")
    bars.set_xlabel("|dL/dW| (log scale)")
    bars.set_title("weight gradient norm per layer", fontsize=10)
    width = 0.4
    for offset, key, label in ((-width / 2, "skip_norm", "via the skip (concat)"),
                               (width / 2, "pool_norm", "via the pool")):
        skips.bar(np.arange(len(levels)) + offset, [getattr(t.skips[i], key) for i in levels], width,
                  label=label)
    skips.set_xticks(np.arange(len(levels)), [f"level {i}" for i in levels])
    skips.set_ylabel("|dL/dh_i|")
    skips.set_title("the two gradients that add at each skip", fontsize=10)
    skips.legend(fontsize=8)
    fig.suptitle(title, fontsize=7)
    atomic_write(path, lambda stream: fig.savefig(stream, format="png", dpi=100))


def print_dead_relus(model, t: Tracer) -> list:
    """The share of zeros of every ReLU, and the head check; returns the dead head channels."""
    rows = []
    for name, record in t.records.items():
        if record.kind != "ReLU":
            continue
        always = sum(1 for share in record.channel_zero_fraction if share == 1.0)
        rows.append((name, str(record.shape[1]), f"{100 * record.zero_fraction:.1f}%",
                     f"{always} of {record.shape[1]}"))
    print("\nDead ReLUs: the share of each ReLU's outputs that are exactly 0 (there dx = dy * [x > 0] is 0 "
          "too,\nso nothing upstream learns from those pixels); channels that were 0 at every pixel of this batch")
    print(format_table(("layer", "channels", "zeros", "channels all 0"), rows))

    record = t.records.get("head.relu")
    if record is None:
        why = ("the 'valid' network's head is a single 1x1 conv" if model.config.padding == "valid"
               else "built with UNetConfig(head_relu=False)")
        print(f"   head: no ReLU before the logits ({why}), so the head cannot die this way")
        return []
    shares = record.channel_zero_fraction
    print("   head.relu, the 2-channel ReLU before the last 1x1 conv: "
          + ", ".join(f"channel {k} zero at {100 * s:.1f}% of pixels" for k, s in enumerate(shares)))
    dead = [k for k, s in enumerate(shares) if s > DEAD_HEAD_THRESHOLD]
    if not dead:
        print(f"   no head channel is dead (more than {DEAD_HEAD_THRESHOLD:.0%} zeros): the head is fine")
        return dead
    which = " and ".join(f"channel {k}" for k in dead)
    print(f"""
   DEAD HEAD: {which} of head.relu {'is' if len(dead) == 1 else 'are'} zero at more than {DEAD_HEAD_THRESHOLD:.0%} of pixels.
   Where a channel is zero its gradient is zero too, so head.conv's weights for it learn from
   (almost) no pixels, and a dead channel stays dead. The logit is b + w0 relu0 + w1 relu1 with
   relu >= 0: with one channel dead the logit can move only one way from the bias b (the way of
   the live channel's weight); with both dead it is the constant b, the same prediction at every
   pixel (the all-black or all-grey masks users report), and no gradient reaches any layer below.
   What to do: train with the head ReLU removed, UNetConfig(head_relu=False) (--no-head-relu in
   examples/train_membranes.py); or start again with a different --seed; or lower the learning rate.""")
    return dead


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="backprop_tour.py",
        description="A live tour of backprop in tinyunet: each layer's gradient against central "
                    "differences, then one traced training step of the U-Net.")
    parser.add_argument("--layer", default="all", choices=("all", "none") + LAYER_TOURS,
                        help="the layer type(s) of part 1 ('none': skip part 1)")
    parser.add_argument("--no-step", action="store_true", help="skip part 2, the U-Net step")
    parser.add_argument("--size", type=int, default=64, help="input height and width of part 2 (default 64)")
    parser.add_argument("--batch", type=int, default=1, help="images in the batch of part 2 (default 1)")
    parser.add_argument("--base-width", type=int, default=64, help="channels of the first level (default 64)")
    parser.add_argument("--depth", type=int, default=4, help="pooling steps (default 4)")
    parser.add_argument("--padding", default="same", choices=("same", "valid"))
    parser.add_argument("--no-head-relu", action="store_true",
                        help="build the U-Net without the ReLU before the logits")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam's learning rate (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, dropout and the input")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--out", default="runs/tour", help="folder of the PNG (default runs/tour)")
    args = parser.parse_args(argv)
    for name in ("size", "batch", "base_width", "depth"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.lr > 0:
        parser.error("--lr must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        if args.device == "gpu":
            require_gpu()
        model = None
        if not args.no_step:      # build and size-check first: a bad --size fails before part 1
            model = UNet(UNetConfig(base_width=args.base_width, depth=args.depth, padding=args.padding,
                                    head_relu=not args.no_head_relu, seed=args.seed)).to(args.device)
            model.output_shape((args.batch, model.config.in_channels, args.size, args.size))
    except (DeviceError, UNetInputError, ValueError) as error:
        print(f"backprop_tour: error: {error}", file=sys.stderr)
        return 2
    if args.layer != "none":
        layer_tour(LAYER_TOURS if args.layer == "all" else (args.layer,), args.device, args.seed)
    if model is not None:
        x, target = synthetic_batch(model, args.batch, args.size, args.seed)
        unet_step(model, x, target, lr=args.lr, out_dir=args.out)
    print(f"\nTour finished in {time.perf_counter() - start:.1f} s")
    return 0
