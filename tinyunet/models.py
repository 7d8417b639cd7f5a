"""The five networks by name, built one way, with the sizes they take.

    MODELS = ("unet", "fcn32s", "fcn16s", "fcn8s", "segnet")
    model = build_model("segnet", classes=3, base_width=8)      # any of MODELS
    model_kind(model)                                           # 'segnet'
    input_multiple(model)                                       # 32: crops and tiles are multiples
    check_input_size(model, 100)                                # ValueError: '... nearest valid sizes: 96 or 128'

Every model has the same interface, so that a trainer, a checkpoint and the prediction code
need not know which one they hold:

    config                   .classes, .in_channels, .dtype, .to_json(); saved in checkpoints
    forward(x) -> logits     (N, C_in, H, W) -> (N, K, H', W') (K = 1: one logit, sigmoid)
    backward(dlogits) -> dx  fills gradients()
    predict_proba(x)         sigmoid (K = 1) or softmax over axis 1 (K >= 2)
    parameters(), trainable_parameters() (give the optimizer these), gradients(), buffers()
    load_parameters(values), random_generators(), num_parameters()
    to(device), astype(dtype), train(mode), eval()
    layer_shapes(input_shape), summary(input_shape), output_shape(input_shape)
    inference_bytes(input_shape)   peak memory of one forward inside no_grad() (tiles, batches)

The files: tinyunet/unet.py (U-Net, skips by concatenation), tinyunet/fcn.py (FCN-32s/16s/8s,
sum-fusion skips), tinyunet/segnet.py (SegNet, unpooling with the encoder's indices).

Defaults: ``base_width=None`` keeps each reference's own 64 (the U-Net's 31 M parameters, the
FCN's VGG16 with fc6/fc7 of 4096 channels: 134 M, SegNet's 29 M); a CPU trains at 8 to 16.
FCN keeps the reference ``input_pad=100`` (conv1_1 pads every side by 100, so a 128-pixel crop
is 326 pixels wide at conv1_1 and every VGG block works on 6.5x the crop's pixels).
On a CPU use ``input_pad=FCN_CPU_INPUT_PAD[variant]`` (FCN-8s 69, 16s 73, 32s 81: the
smallest pad for which every crop offset is >= 0, the final crop's 0; FCN-8s then takes inputs
from 64 pixels, and a 128-pixel crop is 264 pixels at conv1_1, 1.5x fewer pixels than 326) and a small ``fc_width`` (e.g. 8 * base_width): fc6 is
a 7x7 conv to fc_width channels, the largest layer of the reference (103 M of its 134 M).
"""
from __future__ import annotations

from tinyunet.fcn import FCN, FCNConfig
from tinyunet.segnet import SegNet, SegNetConfig
from tinyunet.unet import UNet, UNetConfig, nearest_valid_sizes, output_size

MODELS = ("unet", "fcn32s", "fcn16s", "fcn8s", "segnet")
# The smallest conv1_1 padding for which the final crop's offset is >= 0: the reference's 100
# minus its final offset (FCN-8s 31, 16s 27, 32s 19); tests/test_models.py builds each, and
# refuses each minus one.
FCN_CPU_INPUT_PAD = {"8s": 69, "16s": 73, "32s": 81}
POOLING_MULTIPLE = 32           # FCN and SegNet pool five times by 2


def _unknown_kind(kind) -> ValueError:
    return ValueError(f"unknown model {kind!r}: choose one of {', '.join(MODELS)}")


def config_class(kind: str):
    """The config dataclass of a kind: UNetConfig, FCNConfig or SegNetConfig."""
    if kind == "unet":
        return UNetConfig
    if kind in ("fcn32s", "fcn16s", "fcn8s"):
        return FCNConfig
    if kind == "segnet":
        return SegNetConfig
    raise _unknown_kind(kind)


def config_from_dict(kind: str, values: dict):
    """The config of ``kind`` from its JSON fields (as a checkpoint stores them); an FCN's
    variant must agree with the kind. ValueError (one line) for unknown or bad fields."""
    cls = config_class(kind)
    import dataclasses
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown} (written by a newer tinyunet?)")
    config = cls(**values)
    if cls is FCNConfig and f"fcn{config.variant}" != kind:
        raise ValueError(f"the config is an FCN-{config.variant}, not a {kind}")
    return config


def build_model(kind: str, *, classes: int, in_channels: int = 1, base_width: int | None = None,
                seed: int = 0, dtype: str = "float32", **options):
    """A fresh model of ``kind`` (one of MODELS) for ``classes`` classes.

    classes      1: the U-Net's sigmoid head (binary); K >= 2: K logits and a softmax (every model)
    base_width   None: each reference's own (64); the blocks/levels have w, 2w, 4w, 8w, (8w|16w)
    options      passed to the config: depth, dropout, padding, head_relu (unet); fc_width,
                 input_pad, dropout, learn_upsampling, score_init (fcn*); momentum, eps (segnet)
    Raises ValueError with one line for an unknown kind, too few classes or a bad option.
    """
    if kind not in MODELS:
        raise _unknown_kind(kind)
    if isinstance(classes, bool) or not isinstance(classes, int):
        raise ValueError(f"build_model: classes must be an int, got {classes!r}")
    if kind != "unet" and classes < 2:
        raise ValueError(f"build_model: {kind} needs classes >= 2 (a softmax over K classes), got {classes}: "
                         f"use --model unet for one class (sigmoid), or --classes 2")
    values = dict(classes=classes, in_channels=in_channels, seed=seed, dtype=dtype, **options)
    if base_width is not None:
        values["base_width"] = base_width
    if kind.startswith("fcn"):
        if "variant" in values and values["variant"] != kind[3:]:
            raise ValueError(f"build_model: variant={values['variant']!r} contradicts kind {kind!r}")
        values["variant"] = kind[3:]
    cls = config_class(kind)
    import dataclasses
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"build_model: {kind} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(sorted(known - {'classes', 'in_channels', 'seed', 'dtype', 'variant'}))}")
    return model_from_config(cls(**values))


def model_from_config(config):
    """A fresh model built from its config (a UNetConfig, FCNConfig or SegNetConfig)."""
    return {UNetConfig: UNet, FCNConfig: FCN, SegNetConfig: SegNet}[type(config)](config)


def model_kind(model) -> str:
    """'unet', 'fcn32s', 'fcn16s', 'fcn8s' or 'segnet'; TypeError for anything else."""
    if isinstance(model, UNet):
        return "unet"
    if isinstance(model, FCN):
        return f"fcn{model.config.variant}"
    if isinstance(model, SegNet):
        return "segnet"
    raise TypeError(f"not a tinyunet model: {type(model).__name__} (build one with tinyunet.models.build_model)")


def input_multiple(model) -> int:
    """Crops and tiles must be multiples of this: 2**depth for the U-Net, 32 for FCN and SegNet
    (five 2x2 pools: on that grid a tile's pool windows are the whole image's, so tiles agree
    with one whole-image pass away from their borders)."""
    if isinstance(model, UNet):
        return 2 ** model.config.depth
    model_kind(model)
    return POOLING_MULTIPLE


def is_valid_input_size(model, size: int) -> bool:
    """Whether a side of ``size`` pixels is a valid crop or tile for ``model``."""
    if isinstance(model, UNet):
        return output_size(size, model.config.depth, model.config.padding) is not None
    if size < POOLING_MULTIPLE or size % POOLING_MULTIPLE:
        return False
    try:
        model.layer_shapes((1, model.config.in_channels, size, size))
    except ValueError:                  # too small for fc6's 7x7 (FCN with a small input_pad)
        return False
    return True


def nearest_input_sizes(model, size: int) -> tuple[int | None, int]:
    """(the largest valid side <= size or None, the smallest valid side >= size)."""
    if isinstance(model, UNet):
        return nearest_valid_sizes(size, model.config.depth, model.config.padding)
    below = next((s for s in range(size - size % POOLING_MULTIPLE, 0, -POOLING_MULTIPLE)
                  if is_valid_input_size(model, s)), None)
    start = max(POOLING_MULTIPLE, -(-size // POOLING_MULTIPLE) * POOLING_MULTIPLE)
    above = next(s for s in range(start, start + 64 * POOLING_MULTIPLE, POOLING_MULTIPLE)
                 if is_valid_input_size(model, s))
    return below, above


def check_input_size(model, size: int, what: str = "crop size") -> int:
    """``size`` if a side of that many pixels fits ``model``, else ValueError in one line
    naming the nearest valid sizes."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{what} must be a whole number >= 1, got {size!r}")
    if is_valid_input_size(model, size):
        return size
    below, above = nearest_input_sizes(model, size)
    nearest = f"{below} or {above}" if below else f"{above}"
    if not isinstance(model, UNet) and size % POOLING_MULTIPLE == 0:     # a multiple, but fc6 does not fit
        raise ValueError(f"{what} {size} is too small for a {model_kind(model)} (its 7x7 fc6 needs 7 pixels "
                         f"after five poolings); the smallest valid size: {above}")
    raise ValueError(f"{what} {size} does not fit a {model_kind(model)} (sides must be multiples of "
                     f"{input_multiple(model)}"
                     f"{' that stay whole under its unpadded convs' if getattr(model.config, 'padding', 'same') == 'valid' else ''}"
                     f"); nearest valid sizes: {nearest}")
