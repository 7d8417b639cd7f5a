"""Block-wise prediction of volumes larger than memory: Dask schedules, Zarr stores.

    predict_volume("run/checkpoint.npz", "stack.zarr", "membranes.zarr")           # local, 1 worker
    predict_volume(model, volume_array, "membranes.zarr", chunk=512, address="tcp://host:8786")

A volume is (Z, Y, X): Z slices of Y x X pixels, integers scaled by their dtype's maximum
(uint8 / 255, uint16 / 65535) or floats in [0, 1]. The output is a Zarr array of the same
shape, chunked (1, chunk, chunk): for a one-class U-Net float32 membrane probabilities (and
optionally a uint8 mask: 1 membrane, 0 cell); for a U-Net of K >= 2 classes, an FCN or a
SegNet uint8 class labels, the argmax over the K logits at each pixel (what predict_labels gives a
slice). The only module of tinyunet that imports dask and zarr (the optional extra
``pip install -e ".[scale]"``).

How a block is predicted. The volume is cut into blocks of one slice and chunk x chunk pixels
(the last block of a row takes the remainder when that is smaller than the halo). Dask's
``map_overlap`` gives each block a halo of H pixels on each side in y and x, taken from its
neighbours, or mirrored (symmetric, edge pixel repeated, as infer.py pads) at the volume's
border. The network sees the whole haloed block at once (zero-padded at the end to a multiple
of its pooling grid, 2**depth or 32), and the central chunk x chunk of its output is kept and
written.

The halo H, from the receptive field. A 'same' U-Net's logit at pixel p depends on input
pixels [p - left, p + right] only. Walking back from the output: the head's 3x3 conv reads
p +- 1; each level's two 3x3 convs widen an interval [lo, hi] to [lo - 2, hi + 2]; a 2x2
max-pool maps coarse pixels [lo, hi] to fine [2 lo, 2 hi + 1]; an up-level reads its skip
over the same interval and, through the 2x2 'same' up-conv (which reads rows q and q + 1 of
the upsampled map, the pad below) and the nearest upsampling (row q is coarse row q // 2), the
coarse interval [lo // 2, (hi + 1) // 2]. The union over both paths, maximized over the 2**depth
phases of p (``receptive_field``), gives left/right = 108/123 pixels at depth 4, 24/27 at
depth 2. Then:

    H >= max(left, right), a multiple of 2**depth (so that every block's pooling grid lines up
    with the whole slice's): every kept pixel sees exactly the pixels it sees in a whole-slice
    prediction with at least H pixels of mirrored margin, so the output equals
    ``predict_probability(model, slice, margin=H)`` to float32 rounding (the sums run in
    another order). halo_for(config) = 128 at depth 4.
    H smaller: pixels within max(left, right) - H of a block's edge see zeros (the network's
    padding) where the whole-slice prediction sees their neighbours' pixels: seams appear.

SegNet, the same walk through its own table (``segnet_receptive_field``): each block b of
n_b = 2, 2, 3, 3, 3 3x3 convs widens an interval by n_b; its pool maps coarse [lo, hi] to fine
[2 lo, 2 hi + 1]. A decoder block unpools: its pixel q takes coarse pixel q // 2 of the block
below, placed where the encoder's pool found that window's maximum, so it reads the coarse
interval [lo // 2, hi // 2] AND the encoder block's own output over the windows' fine pixels
[2 (lo // 2), 2 (hi // 2) + 1] (the indices); at the bottom the coarse values are pool5's.
Over the 32 phases of the five pools: 211 pixels each side, H = 224. Batch norm in evaluation
mode is a per-channel affine map: it reads one pixel.

FCN, by running its own wiring (FCN._graph, as its crop offsets are derived) on intervals
instead of arrays (``fcn_receptive_field``): a blob is (a, lo, hi), its position u reading
input pixels [a u + lo, a u + hi]. A conv or pool (kernel k, stride s, padding p) makes it
(a s, lo - a p, hi + a (k - 1 - p)); a transposed conv (k, s, cropping p), whose output v
comes from inputs ceil((v + p - k + 1) / s) .. floor((v + p) / s), makes it (a / s,
lo + a (p - k + 1) / s, hi + a p / s), dropping the rounding, so the bound can only be wider;
a crop by o shifts both ends by a o; a sum fusion takes the union. conv1_1's padding cancels
against the final crop: 233 / 241 / 245 pixels each side for FCN-32s / 16s / 8s (fc6's 7x7
at stride 32 alone spans 192 of them), H = 256.

(``predict_probability``'s default margin of 32 pixels is less than 123: its own pixels near an
image border see zero padding past the mirrored margin, so it matches this module only when
given margin=H.)

Memory is bounded by the block, not the volume: one haloed block of (chunk + 2H)^2 pixels and
its forward pass per worker, which keeps no layer's saved tensors (forward_keeping_nothing);
nothing else of the volume is held. Resumable: an output chunk holding no fill value (NaN for
probabilities, 255 for labels and masks) was written (Zarr writes a chunk to a temporary file
and renames it), so a second run predicts only the blocks that are missing. Runs on Dask's local
threaded scheduler by default, on a dask.distributed cluster when given its address (then
the model travels as its checkpoint path, loaded once per worker process).
Proofs: tests/test_volume.py (equality with predict_probability for sizes not a multiple of
the chunk; a halo too small gives seams; an interrupted run resumes to the same result; a
LocalCluster of 2 workers; K-class U-Net, SegNet and FCN labels against the whole slice's
argmax; SegNet's and FCN's reach checked against their receptive fields).
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

INSTALL_HINT = 'pip install -e ".[scale]"'


class VolumeError(ValueError):
    """The volume, the output or the options cannot be used (the message says what to do)."""


def _require():
    """(dask, dask.array, zarr), or one line naming the extra to install."""
    try:
        import dask
        import dask.array as da
        import zarr
    except ImportError as error:
        raise VolumeError(f"block-wise prediction needs dask and zarr ({error}); install them with: "
                          f"{INSTALL_HINT}") from None
    return dask, da, zarr


# ---------------------------------------------------------------------------------------------
# The receptive field and the halo
# ---------------------------------------------------------------------------------------------
def receptive_field(depth: int, head_conv: bool = True) -> tuple[int, int]:
    """(left, right): a 'same' U-Net's logit at p reads input pixels p - left .. p + right only
    (the walk is in the module docstring; tests/test_volume.py checks it against the network).
    ``head_conv``: the one-class (Keras) head's 3x3 conv; a K-class U-Net's head is one 1x1
    conv, which reads p alone."""
    def down(level, lo, hi):                 # input needed for down{level}'s output over [lo, hi]
        lo, hi = lo - 2, hi + 2              # two 3x3 convs
        return (lo, hi) if level == 1 else down(level - 1, 2 * lo, 2 * hi + 1)   # through the pool

    def bottom(lo, hi):
        return down(depth, 2 * (lo - 2), 2 * (hi + 2) + 1)

    def up(level, lo, hi):                   # input needed for up{level}'s output over [lo, hi]
        lo, hi = lo - 2, hi + 2              # two 3x3 convs on the concat
        skip = down(level, lo, hi)
        coarse_lo, coarse_hi = lo // 2, (hi + 1) // 2      # up-conv rows q, q + 1; upsampling q // 2
        coarse = up(level + 1, coarse_lo, coarse_hi) if level < depth else bottom(coarse_lo, coarse_hi)
        return min(skip[0], coarse[0]), max(skip[1], coarse[1])

    left = right = 0
    for p in range(2 ** depth):              # the pattern repeats with the pooling grid
        lo, hi = up(1, p - 1, p + 1) if head_conv else up(1, p, p)   # the head's 3x3 conv, or none
        left, right = max(left, p - lo), max(right, hi - p)
    return left, right


def segnet_receptive_field() -> tuple[int, int]:
    """(left, right) of SegNet's logit at p (the walk is in the module docstring; any width or
    class count: the table's conv counts fix it; tests/test_volume.py checks it)."""
    from tinyunet.segnet import VGG16_BLOCKS

    def encoder(b, lo, hi):                  # input needed for encoder block b's convs over [lo, hi]
        lo, hi = lo - VGG16_BLOCKS[b - 1], hi + VGG16_BLOCKS[b - 1]
        return (lo, hi) if b == 1 else encoder(b - 1, 2 * lo, 2 * hi + 1)     # through pool b - 1

    def decoder(b, lo, hi):                  # input needed for decoder block b's output over [lo, hi]
        lo, hi = lo - VGG16_BLOCKS[b - 1], hi + VGG16_BLOCKS[b - 1]         # its convs
        coarse_lo, coarse_hi = lo // 2, hi // 2                              # the unpool's sources
        where = encoder(b, 2 * coarse_lo, 2 * coarse_hi + 1)                 # pool b's indices
        below = decoder(b + 1, coarse_lo, coarse_hi) if b < len(VGG16_BLOCKS) else where   # pool5's values
        return min(where[0], below[0]), max(where[1], below[1])

    left = right = 0
    for p in range(2 ** len(VGG16_BLOCKS)):
        lo, hi = decoder(1, p, p)
        left, right = max(left, p - lo), max(right, hi - p)
    return left, right


def fcn_receptive_field(config) -> tuple[int, int]:
    """(left, right) of an FCN's logit at p (the walk is in the module docstring). The widths
    do not move it, so the walk runs on a width-1 copy of the network (nothing large is
    allocated); tests/test_volume.py checks it against the network."""
    import dataclasses

    from tinyunet.fcn import FCN
    from tinyunet.layers import Add, CeilMaxPool2d, Conv2d, ConvTranspose2d, Crop2d
    model = FCN(dataclasses.replace(config, base_width=1, fc_width=1))

    def interval_run(name, *inputs):
        layer = model.layers[name]
        if isinstance(layer, Add):                               # sum fusion: the union
            (a, lo, hi), (_, lo2, hi2) = inputs[0]
            return a, min(lo, lo2), max(hi, hi2)
        a, lo, hi = inputs[0]
        if isinstance(layer, Conv2d):
            k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding
            return a * s, lo - a * p, hi + a * (k - 1 - p)
        if isinstance(layer, CeilMaxPool2d):
            k, s = layer.kernel_size, layer.stride
            return a * s, lo, hi + a * (k - 1)
        if isinstance(layer, ConvTranspose2d):
            k, s, p = layer.kernel_size[0], layer.stride[0], layer.cropping[0][0]
            return a / s, lo + a * (p - k + 1) / s, hi + a * p / s
        if isinstance(layer, Crop2d):
            return a, lo + a * layer.offset[0], hi + a * layer.offset[0]
        return a, lo, hi                                         # ReLU, Dropout: one pixel

    scale, lo, hi = model._graph((1.0, 0.0, 0.0), interval_run)
    assert scale == 1.0
    return int(np.ceil(-lo)), int(np.ceil(hi))


def grid_for(config) -> int:
    """The pooling grid every block must start on: 2**depth (U-Net), 32 (SegNet's five pools):
    the multiple overlap-tile prediction cuts its tiles on (tinyunet/infer.py)."""
    from tinyunet.infer import _multiple
    return _multiple(config)


def halo_for(config) -> int:
    """The smallest halo that makes block-wise prediction exact: max(left, right) rounded up to
    the pooling grid. 128 for the exact U-Net (with one class or K), 224 for SegNet, 256 for FCN."""
    from tinyunet.fcn import FCNConfig
    from tinyunet.unet import UNetConfig
    grid = grid_for(config)
    if isinstance(config, UNetConfig):
        field = receptive_field(config.depth, head_conv=config.classes == 1)
    elif isinstance(config, FCNConfig):
        field = fcn_receptive_field(config)
    else:
        field = segnet_receptive_field()
    return -(-max(field) // grid) * grid


# ---------------------------------------------------------------------------------------------
# The model, shared by the blocks of one process
# ---------------------------------------------------------------------------------------------
class ModelSource:
    """A model, or the checkpoint it is loaded from once per process: what a block task holds.

    Layers keep state between forward and backward, so one model must not run two forwards at
    once: a lock serializes the threads of one process (Dask's threads, or a LocalCluster's
    workers without processes). Pickles as the checkpoint path (never the weights), and gives
    Dask a short token instead of hashing 124 MB of weights.
    """
    _loaded: dict = {}
    _loading = threading.Lock()

    def __init__(self, model=None, checkpoint: str | None = None, device: str = "cpu"):
        self.checkpoint, self.device = checkpoint, device
        self._model = model
        self.lock = threading.Lock()

    def get(self):
        if self._model is None:
            with self._loading:
                key = (self.checkpoint, self.device)
                if key not in self._loaded:
                    from tinyunet.checkpoint import load_checkpoint
                    model = load_checkpoint(self.checkpoint).model.to(self.device).eval()
                    self._loaded[key] = (model, threading.Lock())
                self._model, self.lock = self._loaded[key]
        return self._model

    def __getstate__(self):
        if self.checkpoint is None:
            raise VolumeError("a model object cannot travel to dask.distributed workers; give the checkpoint path")
        return {"checkpoint": self.checkpoint, "device": self.device}

    def __setstate__(self, state):
        self.__init__(None, state["checkpoint"], state["device"])

    def __dask_tokenize__(self):
        return ("tinyunet-model", self.checkpoint or id(self._model), self.device)


def forward_keeping_nothing(model, x):
    """model.forward(x), but each layer drops what it kept for a backward (which prediction
    never runs) as soon as it has run: the peak is then the live activations (the skips and
    the layer at work), not every layer's saved input at once."""
    model._check_input(x)

    def run(name, *inputs):
        layer = model.layers[name]
        output = layer.forward(*inputs)
        layer.release()
        return output

    return model._graph(x, run)


def predict_block(block, source: ModelSource, grid: int) -> np.ndarray:
    """Of a haloed block (z, y, x), an array of its shape: membrane probabilities (float32) for
    a one-class model, class labels (uint8, the argmax of the logits) for K classes."""
    from tinyunet.backend import to_device, to_numpy
    from tinyunet.layers.activation import sigmoid
    model = source.get()
    z, h, w = block.shape
    x = block.astype(np.float32)
    if block.dtype.kind in "ui":
        x /= np.float32(np.iinfo(block.dtype).max)
    pad_h, pad_w = -h % grid, -w % grid               # zeros past the halo: no kept pixel sees them
    x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w)))[:, None].astype(model.dtype)
    one_class = model.config.classes == 1
    out = np.empty((z, h, w), np.float32 if one_class else np.uint8)
    with source.lock:
        for i in range(z):                            # one slice at a time: memory of one forward
            logits = forward_keeping_nothing(model, to_device(x[i:i + 1], model.device))
            if one_class:
                out[i] = to_numpy(sigmoid(logits))[0, 0, :h, :w]
            else:                                     # the softmax keeps the order: argmax of logits
                out[i] = to_numpy(logits[0, :, :h, :w].argmax(axis=0))
    return out


def write_block(probability, region, output: str, mask_output: str | None, threshold: float) -> int:
    """Write one block's probabilities (and mask), or its labels, into the output arrays;
    returns its pixels."""
    import zarr
    zarr.open_array(output, mode="r+")[region] = probability
    if mask_output is not None:
        zarr.open_array(mask_output, mode="r+")[region] = (probability >= threshold).astype(np.uint8)
    return int(probability.size)


# ---------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------
def open_volume(source, converted: str | None = None):
    """A (Z, Y, X) array-like from: an array, a Zarr array path, a TIFF stack, or a folder of
    images (the last two converted page by page into a Zarr array at ``converted``)."""
    _, _, zarr = _require()
    if hasattr(source, "shape") and hasattr(source, "dtype"):
        volume = source
    else:
        path = Path(source)
        if path.is_dir() and ((path / "zarr.json").exists() or (path / ".zarray").exists()):
            volume = zarr.open_array(str(path), mode="r")
        elif path.is_file() and path.suffix.lower() in (".tif", ".tiff") or path.is_dir():
            volume = _convert_to_zarr(path, converted)
        else:
            raise VolumeError(f"{path} is not a Zarr array, a TIFF stack or a folder of images")
    if len(volume.shape) == 2:                  # one slice
        volume = volume[None] if isinstance(volume, np.ndarray) else _require()[1].from_array(volume)[None]
    if len(volume.shape) != 3:
        raise VolumeError(f"expected a (Z, Y, X) volume of grey slices, got shape {tuple(volume.shape)}")
    if np.dtype(volume.dtype).kind not in "uif":
        raise VolumeError(f"the volume's dtype {volume.dtype} is not a number type")
    return volume


def _convert_to_zarr(path: Path, converted: str | None):
    """A TIFF stack or a folder of images as a Zarr array, one slice in memory at a time."""
    _, _, zarr = _require()
    if converted is None:
        raise VolumeError(f"{path} is not a Zarr array: give a path for its Zarr copy (--converted)")
    if path.is_dir():
        from tinyunet.data import _image_files, natural_key, read_image
        files = [f for _, f in sorted(_image_files(path).items(), key=lambda item: natural_key(item[0]))]
        if not files:
            raise VolumeError(f"{path} holds no images")
        return _write_pages(converted, len(files), lambda i: read_image(files[i]), str(path))
    import tifffile
    with tifffile.TiffFile(str(path)) as tif:
        return _write_pages(converted, len(tif.pages), lambda i: tif.pages[i].asarray(), str(path))


def _write_pages(converted: str, pages: int, page, source: str):
    import zarr
    first = page(0)
    if Path(converted).exists():
        existing = zarr.open_array(converted, mode="r")
        if existing.attrs.get("converted_from") == source and existing.shape == (pages,) + first.shape:
            return existing                    # converted whole by an earlier run
    target = zarr.create_array(store=converted, shape=(pages,) + first.shape, chunks=(1,) + first.shape,
                               dtype=first.dtype, overwrite=True)
    for i in range(pages):
        values = page(i)
        if values.shape != first.shape:
            raise VolumeError(f"slice {i} of {source} is {values.shape}, the first {first.shape}: not one volume")
        target[i] = values
    target.attrs["converted_from"] = source    # the mark of a finished conversion
    return target


def _block_chunks(size: int, chunk: int, halo: int) -> tuple[int, ...]:
    """chunk, chunk, ..., then the remainder; a remainder smaller than the halo joins the block
    before it (Dask takes a halo only from the next block). Every block starts on the grid."""
    sizes = [chunk] * (size // chunk)
    remainder = size % chunk
    if remainder and (remainder >= halo or not sizes):
        sizes.append(remainder)
    elif remainder:
        sizes[-1] += remainder
    return tuple(sizes)


def _open_output(path: str, shape, chunk: int, dtype, fill, what: str):
    _, _, zarr = _require()
    if Path(path).exists():
        try:
            existing = zarr.open_array(path, mode="r+")
        except Exception as error:
            raise VolumeError(f"{path} exists but is not a Zarr array ({error}); choose another {what} path") from None
        if existing.shape != tuple(shape) or existing.dtype != np.dtype(dtype):
            raise VolumeError(f"{path} already holds a {existing.dtype} array of shape {existing.shape}, not the "
                              f"{np.dtype(dtype)} {tuple(shape)} this volume needs; remove it or choose another path")
        return existing
    return zarr.create_array(store=path, shape=tuple(shape), chunks=(1, chunk, chunk), dtype=dtype,
                             fill_value=fill)


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------
def predict_volume(model, source, output: str, *, chunk: int = 512, halo: int | None = None,
                   mask_output: str | None = None, threshold: float | None = None, address: str | None = None,
                   workers: int = 1, device: str = "cpu", converted: str | None = None,
                   progress: bool = True) -> dict:
    """Predict every block of ``source`` that ``output`` does not hold yet; returns the counts
    (blocks, predicted, skipped), the halo and the model's classes.

    model     a UNet (one class: probabilities; K classes: labels), an FCN or a SegNet (labels),
              or the path of its checkpoint (needed with ``address``)
    source    (Z, Y, X) array, Zarr array path, TIFF stack or image folder (see open_volume)
    output    the Zarr array to write or complete: float32 probabilities (one class) or uint8
              labels (K classes)
    mask_output, threshold   one class only: a uint8 mask, probability >= threshold (None: 0.5)
    chunk     block side in y and x, a multiple of the pooling grid (grid_for), at least the halo
    halo      context each block gets on each side; None: halo_for(config), exact
    address   a dask.distributed scheduler ('tcp://host:8786'); None: local threads (``workers``)
    """
    dask, da, _ = _require()
    from tinyunet.models import model_kind
    if isinstance(model, (str, Path)):
        from tinyunet.checkpoint import load_checkpoint
        checkpoint = str(model)
        loaded = load_checkpoint(checkpoint)
        kind, config = loaded.kind, loaded.config
        holder = ModelSource(None, checkpoint, device)
    else:
        kind, config, holder = model_kind(model), model.config, ModelSource(model.eval(), None, device)
        if address is not None:
            raise VolumeError("with a dask.distributed address give the checkpoint path, not a model object: "
                              "every worker loads it once")
    if config.in_channels != 1:
        raise VolumeError(f"a volume is grey slices, one channel each; this {kind} takes {config.in_channels} "
                          f"input channels: use a model built with in_channels=1")
    one_class = config.classes == 1
    if config.classes > 255:
        raise VolumeError(f"labels are written as uint8 with 255 marking a block not yet written: at most 255 "
                          f"classes, this {kind} has {config.classes}")
    if not one_class and (mask_output is not None or threshold is not None):
        what = "the mask" if mask_output is not None else "the threshold"
        raise VolumeError(f"a mask is for a one-class model (probability >= threshold); this {kind} has "
                          f"{config.classes} classes and writes its class labels to the output itself: drop {what}")
    threshold = 0.5 if threshold is None else threshold
    if kind == "unet" and config.padding != "same":
        raise VolumeError("block-wise prediction supports the 'same' U-Net (the Keras model): the unpadded "
                          "network's output grid depends on the tile, so blocks would not line up")
    grid = grid_for(config)
    halo = halo_for(config) if halo is None else int(halo)
    if chunk % grid or halo % grid or halo < 0:
        raise VolumeError(f"chunk {chunk} and halo {halo} must be multiples of the pooling grid {grid} (every "
                          f"block's pooling grid must line up with the slice's)")
    if chunk < halo:
        raise VolumeError(f"chunk {chunk} is smaller than the halo {halo}: Dask takes a block's halo from its "
                          f"neighbours only; use chunk >= {halo}")
    if not 0.0 < threshold < 1.0:
        raise VolumeError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    volume = open_volume(source, converted)
    z, h, w = volume.shape
    if min(h, w) < halo:
        raise VolumeError(f"slices of {h} x {w} pixels are smaller than the halo {halo}: predict them whole "
                          f"with examples/predict_membranes.py")
    out = _open_output(output, volume.shape, chunk, *((np.float32, np.nan) if one_class else (np.uint8, 255)),
                       "output")
    if mask_output is not None:
        _open_output(mask_output, volume.shape, chunk, np.uint8, 255, "mask")

    chunks = ((1,) * z, _block_chunks(h, chunk, halo), _block_chunks(w, chunk, halo))
    data = (volume if hasattr(volume, "dask") else da.from_array(volume, chunks=(1, chunk, chunk))).rechunk(chunks)
    probability = da.map_overlap(predict_block, data, depth={0: 0, 1: halo, 2: halo},
                                 boundary={0: "none", 1: "reflect", 2: "reflect"}, trim=True, allow_rechunk=False,
                                 dtype=out.dtype, source=holder, grid=grid, meta=np.empty((0, 0, 0), out.dtype))
    blocks = probability.to_delayed()
    starts = [np.cumsum((0,) + c) for c in chunks]
    tasks, skipped = [], 0
    for index in np.ndindex(*blocks.shape):
        region = tuple(slice(int(s[i]), int(s[i + 1])) for s, i in zip(starts, index))
        if _written(out, region, mask_output):
            skipped += 1
            continue
        tasks.append(dask.delayed(write_block, pure=False)(blocks[index], region, str(output), mask_output,
                                                          threshold))
    _run(tasks, address, workers, progress)
    return {"blocks": len(tasks) + skipped, "predicted": len(tasks), "skipped": skipped, "halo": halo,
            "classes": config.classes}


def _written(out, region, mask_output) -> bool:
    """True when the output (and mask) already hold this block: no fill value left (NaN in
    probabilities, 255 in labels and masks: K is at most 255, so no label is 255)."""
    try:
        values = out[region]
        if np.isnan(values).any() if values.dtype.kind == "f" else (values == 255).any():
            return False
        if mask_output is not None:
            import zarr
            return not (zarr.open_array(mask_output, mode="r")[region] == 255).any()
        return True
    except Exception:                            # an unreadable chunk: predict it again
        return False


def _run(tasks, address, workers, progress) -> None:
    """Compute the write tasks with a progress bar: local threads, or the cluster at address."""
    import dask
    from tqdm import tqdm
    bar = tqdm(total=len(tasks), desc="blocks", unit="block", disable=not progress, dynamic_ncols=True)
    try:
        if address is None:
            from dask.callbacks import Callback
            names = {task.key for task in tasks}

            class Progress(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):
                    if key in names:
                        bar.update(1)

            with Progress():
                dask.compute(*tasks, scheduler="threads", num_workers=workers)
        else:
            from distributed import Client, as_completed
            with Client(address) as client:
                for future in as_completed(client.compute(tasks)):
                    future.result()             # a failed block raises here, with its traceback
                    bar.update(1)
    finally:
        bar.close()
