"""Training a segmentation network: the loop, evaluation, collapse checks, and the run folder.

One step, for a batch of random crops x: (B, 1, s, s) with membrane targets t (1 = membrane):

    adam.lr = learning_rate(options, progress)        constant, or a cosine decay
    logits = model.forward(x)                         (B, 1, s, s)
    loss, dlogits = bce_with_logits(logits, t, w)     w: the paper's border weights, optional
    model.backward(dlogits)                           fills every layer's grads
    adam.step(model.gradients())                      Keras Adam, in place

With K >= 2 classes (``classes``; FCN and SegNet always), t holds class indices (B, s, s) and
the logits are (B, K, s, s): softmax_cross_entropy(logits, t, class_weights, ignore_index, w)
replaces the BCE (class_weights: none, or SegNet's median-frequency balancing; ignore_index:
pixels not scored). ``model`` picks the network (tinyunet/models.py): the U-Net, FCN-32s/16s/8s
or SegNet, all trained by this same loop. ``clock`` says what ``minutes`` counts: wall time, or
this process's CPU time (all its threads), which a shared machine does not inflate: runs of
several models compared at "10 CPU minutes" each get the same work whatever else runs.

Every ``eval_every`` steps the validation images are predicted whole (overlap-tile, as any size
would be) and scored (tinyunet.metrics); the scores go to metrics.json. The loop watches for
the two ways this model is known to stop learning and says so instead of training on:
every pixel predicted one class for several evaluations, or a channel of the Keras head's
2-channel ReLU (right before the sigmoid) dead, so the logit can only move one way.

A run folder holds: checkpoint.npz (every ``checkpoint_every`` steps, on Ctrl-C and at the
end; ``resume=True`` continues from it bit-identically), metrics.json, curves.png, the
validation predictions (probability, mask, overlay) and montage.png (image, truth,
prediction, overlay side by side).

Nothing is lost: every option is checked before any work (check_options); a folder that holds
a run is refused unless ``resume`` (continue it: its own options are restored from its
checkpoint, and those that would change what it computes are refused) or ``overwrite``;
Ctrl-C is deferred to the end of the step in progress (DeferredInterrupt), so a checkpoint
always holds a step boundary. Proofs: tests/test_train.py (a tiny run end to end, resume,
options, collapse detection), tests/test_interrupts.py (Ctrl-C in every phase of a step).

Under mpiexec (Trainer's ``comm``, tinyunet/distributed.py) every rank runs this loop on its own
batches, the gradients are averaged right after the backward, and rank 0 alone evaluates and
writes. The few lines that do this are marked "MPI:"; with comm=None none of them runs.
Proof: tests/test_distributed.py.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tinyunet import checkpoint as checkpoints
from tinyunet import distributed
from tinyunet.augment import PRESETS as AUGMENT_PRESETS, Augmenter
from tinyunet.backend import (check_device_name, get_array_module, release_gpu_memory, require_gpu, to_device,
                              to_numpy)
from tinyunet.files import atomic_write
from tinyunet.data import Dataset, binary_as_classes, border_weight_map, random_crops, resolve_data
from tinyunet.classes import save_confusion_png
from tinyunet.infer import predict_probability, save_class_prediction, save_prediction
from tinyunet.losses import bce_with_logits, median_frequency_weights, softmax_cross_entropy
from tinyunet.metrics import class_report_table, class_scores, evaluate, evaluate_classes, report_table
from tinyunet.optim import Adam
from tinyunet.layers import Conv2d, Dropout, MaxPool2d, ReLU
from tinyunet.models import FCN_CPU_INPUT_PAD, MODELS, build_model, check_input_size
from tinyunet.unet import UNet, UNetConfig


ISBI_TRAINING_SLICES = 24


@dataclass
class TrainOptions:
    """Every choice a run makes; saved into the run folder (options.json) and the checkpoint."""
    data: str = "synthetic"          # 'synthetic', 'isbi2012', a folder, or 'images.tif,labels.tif'
    val: str = ""                    # validation items: 'last4', or indices such as '20-23' / '1,5,9'
    out: str = "runs/membranes"
    steps: int = 1000                # stop after this many steps ...
    minutes: float = 8.0             # ... or this much training time, whichever comes first
    crop: int = 128
    batch: int = 2
    lr: float = 1e-4                 # the Keras model's Adam default
    lr_schedule: str = "constant"    # constant | cosine (see learning_rate)
    augment: str = "flips"           # none | flips | keras | elastic (tinyunet.augment)
    border_weights: bool = False     # the U-Net paper's weighted loss
    eval_every: int = 50
    checkpoint_every: int = 100
    collapse_patience: int = 3       # evaluations in a row with one class everywhere
    threshold: float = 0.5
    tta: bool = False
    seed: int = 0
    device: str = "cpu"
    base_width: int = 64
    depth: int = 4
    head_relu: bool = True           # the exact Keras head; False removes the ReLU before the sigmoid
    model: str = "unet"              # unet | fcn32s | fcn16s | fcn8s | segnet (tinyunet.models)
    classes: int = 1                 # 1: membrane or not (sigmoid); K >= 2: K classes (softmax)
    class_weights: str = "none"      # none | median-frequency (SegNet's balancing; K >= 2)
    learn_upsampling: bool = False   # FCN: the bilinear upsamplers learn too (the reference freezes them)
    clock: str = "wall"              # what --minutes counts: wall time, or this process's CPU time
    synthetic_count: int = 24        # synthetic slices (the last 4 validate)
    synthetic_size: int = 256
    resume: bool = False             # continue the run in `out` (its own options are restored)
    overwrite: bool = False          # replace the run in `out`; without it or resume, a run folder is kept
    progress: bool = True


MAX_CLASSES = 254                   # 255 is the ignore label
CLASS_WEIGHTS = ("none", "median-frequency")
CLOCKS = ("wall", "cpu")


class OptionError(ValueError):
    """An option that cannot be used; the message names the command-line flag and a valid value."""


# ----------------------------------------------------------------------------------- the data

VAL_PATTERN = re.compile(r"last\d+|\d+(-\d+)?(,\d+(-\d+)?)*")


def check_val_syntax(text: str) -> None:
    """'' (the default split), 'last4', '20-23', '1,5,9' or '1-3,7': anything else is refused
    before any data is read."""
    text = text.strip()
    if text and not VAL_PATTERN.fullmatch(text.replace(" ", "")):
        raise OptionError(f"--val {text!r}: give validation items as 'last4', '20-23', '1,5,9' or '1-3,7' "
                          f"(indices from 0), or leave it empty for the last 4")
    if text.startswith("last") and int(text[4:]) < 1:
        raise OptionError(f"--val {text!r}: hold out at least one item, e.g. 'last1'")
    for first, last in re.findall(r"(\d+)-(\d+)", text):
        if int(first) > int(last):
            raise OptionError(f"--val {text!r}: the range {first}-{last} runs backwards; write {last}-{first}")


def parse_indices(text: str, count: int) -> list[int]:
    """'last4' -> the last 4 items; '20-23' -> [20, 21, 22, 23]; '1,5,9' -> [1, 5, 9]."""
    check_val_syntax(text)
    text = text.strip().replace(" ", "")
    if text.startswith("last"):
        k = int(text[4:])
        return list(range(max(count - k, 0), count))
    indices: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        first, last = int(first), int(last or first)
        if last >= count:                   # before the range is built: '0-99999999999' must not fill memory
            raise OptionError(f"--val {text}: validation indices up to {last} are outside the {count} items "
                              f"(0..{count - 1})")
        indices.extend(range(first, last + 1))
    return list(dict.fromkeys(indices))     # in the order given, each once


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(o: TrainOptions) -> None:
    """Every option, checked before any work starts and before anything on disk changes:
    an OptionError naming the flag and what it accepts.
    Proof: tests/test_train.py::test_every_bad_option_is_refused_before_any_work."""
    def refuse(name, what):
        raise OptionError(f"{_flag(name)} {getattr(o, name)!r}: {what}")

    def integer(name, low, high=None):
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            refuse(name, "must be a whole number")
        if value < low or (high is not None and value > high):
            refuse(name, f"must be at least {low}" + (f" and at most {high}" if high is not None else ""))

    def number(name):
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or math.isnan(value):
            refuse(name, "must be a number")
        return float(value)

    for name in ("data", "out"):
        if not isinstance(getattr(o, name), str) or not getattr(o, name).strip():
            refuse(name, "must not be empty")
    if not isinstance(o.val, str):
        refuse("val", "must be text such as '20-23'")
    check_val_syntax(o.val)
    integer("steps", 1)
    minutes = number("minutes")
    if not minutes > 0:
        refuse("minutes", "a run needs time to train: give more than 0 minutes (or a large number and --steps)")
    if o.model not in MODELS:
        refuse("model", f"choose one of {', '.join(MODELS)}")
    integer("classes", 1, MAX_CLASSES)
    if o.model != "unet" and o.classes < 2:
        refuse("classes", f"{o.model} scores K >= 2 classes with a softmax: give --classes 2 for membrane "
                          f"and cell (or --model unet for one sigmoid membrane class)")
    if o.class_weights not in CLASS_WEIGHTS:
        refuse("class_weights", f"choose one of {', '.join(CLASS_WEIGHTS)}")
    if o.class_weights != "none" and o.classes < 2:
        refuse("class_weights", "balances the classes of a softmax: give --classes 2 or more (with one "
                                "sigmoid class, --border-weights weights the membranes up)")
    if o.clock not in CLOCKS:
        refuse("clock", f"choose one of {', '.join(CLOCKS)}")
    integer("depth", 1, checkpoints.MAX_DEPTH)
    integer("base_width", 1)
    multiple = crop_multiple(o)
    integer("crop", multiple)
    if o.crop % multiple:
        what = "2**depth" if o.model == "unet" else f"{o.model}'s 5 poolings: 2**5"
        raise OptionError(f"--crop {o.crop} must be divisible by {what} = {multiple} (e.g. "
                          f"{max(multiple, o.crop - o.crop % multiple)})")
    integer("batch", 1)
    lr = number("lr")
    if not (lr > 0 and math.isfinite(lr)):
        refuse("lr", "Adam's learning rate must be a finite number > 0 (the Keras model's is 1e-4)")
    if o.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {o.lr_schedule!r}: choose one of {LR_SCHEDULES}")
    if o.augment not in AUGMENT_PRESETS:
        refuse("augment", f"choose one of {sorted(AUGMENT_PRESETS)}")
    for name in ("eval_every", "checkpoint_every", "collapse_patience"):
        integer(name, 1)
    threshold = number("threshold")
    if not 0 < threshold < 1:
        refuse("threshold", "a membrane probability threshold lies strictly between 0 and 1 (e.g. 0.5)")
    integer("seed", 0, 2 ** 63 - 1)
    check_device_name(o.device)
    integer("synthetic_count", 2)
    integer("synthetic_size", 32)
    for name in ("border_weights", "tta", "head_relu", "learn_upsampling", "resume", "overwrite", "progress"):
        if not isinstance(getattr(o, name), (bool, np.bool_)):
            refuse(name, "must be True or False")
    if o.learn_upsampling and not o.model.startswith("fcn"):
        refuse("learn_upsampling", f"only FCN has bilinear upsamplers to learn; {o.model} has none: drop "
                                   f"--learn-upsampling or use --model fcn32s, fcn16s or fcn8s")
    if o.resume and o.overwrite:
        raise OptionError("--resume and --overwrite contradict each other: --resume continues the run in "
                          f"{o.out}, --overwrite replaces it; give one")
    if o.model == "unet":
        try:
            checkpoints.check_config_bounds(UNetConfig(base_width=o.base_width, depth=o.depth), "--base-width/--depth")
        except checkpoints.CheckpointError as error:
            raise OptionError(str(error).split("; the file")[0]) from None


def model_options(o: TrainOptions) -> dict:
    """The options of o.model beyond its width: the U-Net's depth and head; FCN's fc6/fc7 as
    wide as the reference's relative to its blocks (4096 = 64 x 64), so --base-width scales all,
    and conv1_1 padded by the least that keeps every crop offset >= 0 (tinyunet/models.py);
    --learn-upsampling lets its upsamplers learn from their bilinear start."""
    if o.model == "unet":
        return {"depth": o.depth, "head_relu": o.head_relu}
    if o.model.startswith("fcn"):         # conv1_1's padding: the least that fits, not the reference's 100
        return {"fc_width": 64 * o.base_width, "input_pad": FCN_CPU_INPUT_PAD[o.model[3:]],
                "learn_upsampling": bool(o.learn_upsampling)}
    return {}


def crop_multiple(o: TrainOptions) -> int:
    """What a crop's side must be a multiple of: every pooling halves it exactly."""
    return 2 ** o.depth if o.model == "unet" else 2 ** 5


def split_data(dataset: Dataset, val: str) -> tuple[Dataset, Dataset]:
    """(training items, held-out validation items); the default holds out the last 4 (or 1)."""
    if len(dataset) < 2:
        raise OptionError(f"need at least 2 labelled images to hold one out for validation, got {len(dataset)}")
    held_out = parse_indices(val or f"last{min(4, max(1, len(dataset) // 5))}", len(dataset))
    kept = [i for i in range(len(dataset)) if i not in set(held_out)]
    if not kept or not held_out:
        raise OptionError(f"--val {val!r} leaves no training or no validation images among the "
                          f"{len(dataset)} items; hold out fewer")
    return dataset.split(kept), dataset.split(held_out)


# ------------------------------------------------------------------------------ small helpers

LR_SCHEDULES = ("constant", "cosine")
COSINE_FLOOR = 0.05                  # the cosine ends at 5% of lr, not at 0: the last steps still learn


def learning_rate(options: TrainOptions, progress: float) -> float:
    """Adam's lr at ``progress`` = the share of the run done, in [0, 1].

    constant   lr throughout (the Keras recipe).
    cosine     lr * (f + (1 - f) * (1 + cos(pi * progress)) / 2), f = COSINE_FLOOR: large steps
               early, small ones at the end, so the model a short run ends with is not the
               accident of its last few noisy batches.
    Tests: tests/test_train.py::test_cosine_schedule_runs_from_lr_down_to_its_floor.
    """
    if options.lr_schedule == "constant":
        return options.lr
    if options.lr_schedule == "cosine":
        progress = min(max(progress, 0.0), 1.0)
        return options.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr schedule {options.lr_schedule!r}: choose one of {LR_SCHEDULES}")


def write_json_atomic(path: Path, value) -> None:
    """JSON written all or nothing: a crash keeps the previous file whole (tinyunet/files.py)."""
    atomic_write(path, lambda stream: stream.write(json.dumps(value, indent=1).encode()))


def head_relu_dead_channels(model, limit: float = 0.99) -> list[tuple[int, float]]:
    """[(channel, share of zeros)] for the head ReLU's channels that were > ``limit`` zero in
    the last forward. Empty without a head ReLU (head_relu=False or the 'valid' network)."""
    relu = getattr(model, "head_relu", None)     # the Keras U-Net's sigmoid head only
    positive = getattr(relu, "_positive", None) if relu is not None else None
    if positive is None:
        return []
    dead = 1.0 - to_numpy(positive.mean(axis=(0, 2, 3)))
    return [(c, float(share)) for c, share in enumerate(dead) if share > limit]


class CollapseWatch:
    """Notices when training has stopped learning and says what to do about it.

    Both signs must persist for ``patience`` evaluations in a row: early in training a head
    channel can be nearly all zero and still come back.
    """

    ONE_CLASS = 0.002   # a predicted membrane share below this, or above 1 - this, is "one class"

    def __init__(self, patience: int):
        self.patience = patience
        self.one_class_streak = 0
        self.dead_streaks: dict[int, int] = {}
        self.warned = set()

    def check(self, membrane_share: float, dead_channels, top_class: str | None = None) -> list[str]:
        """Messages for the evaluation just made: membrane_share is the share of validation
        pixels predicted membrane; dead_channels as head_relu_dead_channels returns them. With K
        classes, membrane_share is the share of the most predicted class, named by top_class."""
        messages = []
        one_class = membrane_share > 1 - self.ONE_CLASS or (top_class is None and membrane_share < self.ONE_CLASS)
        self.one_class_streak = self.one_class_streak + 1 if one_class else 0
        if self.one_class_streak >= self.patience and "one-class" not in self.warned:
            self.warned.add("one-class")
            which = top_class or ("membrane" if membrane_share > 0.5 else "cell")
            messages.append(
                f"COLLAPSE: every validation pixel has been predicted '{which}' for {self.one_class_streak} "
                f"evaluations in a row: the model is not learning. Try: a lower --lr (e.g. 3e-5), "
                f"--no-head-relu (a dead head ReLU pins the output), another --seed, or --border-weights "
                f"(weights the rare membrane class up).")
        shares = dict(dead_channels)
        self.dead_streaks = {c: self.dead_streaks.get(c, 0) + 1 for c in shares}
        persistent = [c for c, streak in self.dead_streaks.items() if streak >= self.patience]
        if persistent and "dead-head" not in self.warned:
            self.warned.add("dead-head")
            shown = ", ".join(f"channel {c}: {shares[c]:.1%} zeros" for c in persistent)
            messages.append(
                f"DEAD HEAD: a channel of the 2-channel ReLU before the sigmoid has been dead for "
                f"{self.patience} evaluations ({shown}). Its output is 0 whatever the input, so the logit "
                f"can hardly move one way and probabilities stay on one side of 0.5. Fix: train with "
                f"--no-head-relu (removes that ReLU, the fix reported in zhixuhao/unet's issues), or "
                f"another --seed / a lower --lr.")
        return messages


# ------------------------------------------------------------------ the run folder and resuming

CHECKPOINT_NAME = "checkpoint.npz"
# The options that set the weights a run computes: a resumed run keeps its own (saved in its
# checkpoint). Under the cosine schedule steps and minutes join them: they set its length.
RUN_DEFINING = ("data", "val", "crop", "batch", "lr", "lr_schedule", "augment", "border_weights", "seed",
                "base_width", "depth", "head_relu", "synthetic_count", "synthetic_size", "model", "classes",
                "class_weights", "clock", "learn_upsampling")
NOT_COMPARED = ("out", "resume", "overwrite", "progress")


def saved_options(checkpoint_path) -> dict | None:
    """The options a run saved into its checkpoint, or None for a checkpoint without them.
    Reads the checkpoint's JSON only, no array."""
    meta = checkpoints.read_checkpoint_meta(checkpoint_path)
    saved = meta.get("extra", {}).get("options")
    if not isinstance(saved, dict):
        return None
    known = {f.name for f in fields(TrainOptions)}
    return {name: value for name, value in saved.items() if name in known}


def resume_options(out, given: dict | None = None) -> TrainOptions:
    """The options to continue the run in ``out``: its own, from its checkpoint, with ``given``
    (what a person typed, e.g. {"steps": 600}) on top. Trainer refuses any of those that
    change what the run computes. Proof: tests/test_train.py::test_resume_restores_the_runs_own_options."""
    path = Path(out) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume, or point --out "
                                f"at the run folder to continue")
    return TrainOptions(**{**(saved_options(path) or {}), **(given or {}), "out": str(out), "resume": True})


def _differences(options: TrainOptions, saved: dict) -> tuple[list[str], list[str]]:
    """(refused, reported): the options that differ from the run's own, as '--flag new (the run: old)'."""
    defining = RUN_DEFINING + (("steps", "minutes") if saved.get("lr_schedule") == "cosine" else ())
    refused, reported = [], []
    for name in (f.name for f in fields(TrainOptions)):
        if name in NOT_COMPARED or name not in saved or getattr(options, name) == saved[name]:
            continue
        line = f"{_flag(name)} {getattr(options, name)!r} (the run: {saved[name]!r})"
        (refused if name in defining else reported).append(line)
    return refused, reported


# ------------------------------------------------------------------------------ Ctrl-C

class DeferredInterrupt:
    """Ctrl-C (SIGINT) only asks the run to stop: the step, evaluation or save in progress ends
    first, so what is saved is always the state of a step boundary. A second Ctrl-C stops at
    once (KeyboardInterrupt); the loop then saves only if no step was half done.

    Only the main thread can take signals; elsewhere this does nothing.
    Proof: tests/test_interrupts.py.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        os.write(2, b"\nCtrl-C: finishing the step, evaluation or save in progress, then saving and stopping "
                    b"(Ctrl-C again stops at once)\n")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False


def step_memory_bytes(model, batch: int, crop: int) -> int:
    """What one training step needs, as UNet.summary estimates it: parameters, gradients and
    Adam's m and v, what the forward keeps for the backward, and the largest conv workspace.
    From shapes alone, for one image, the kept part scaled by ``batch`` (it grows linearly;
    the workspace is capped), the convs' for the whole batch (Conv2d.kept_bytes: Winograd's V
    and U are kept up to a size): nothing is allocated, and a huge batch costs no more to check.
    For FCN and SegNet (transposed convs, unpooling, batch norm) the layers without their own
    estimate count as keeping one output-sized array, an upper bound."""
    item = model.dtype.itemsize
    kept = workspace = kept_by_convs = 0
    previous = (1, model.config.in_channels, crop, crop)
    for record in model.layer_shapes(previous):
        # U-Net's records are (name, layer, input shape, output shape); FCN's and SegNet's have no
        # input shape: their convs read the layer before's output (a skip reads its own, no larger)
        layer, out = record[1], record[-1]
        in_shape, previous = (record[2] if len(record) == 4 else previous), out
        if isinstance(layer, Conv2d):
            # for the whole batch: whether Winograd's V and U are kept depends on their size
            kept_by_convs += layer.kept_bytes((batch,) + tuple(in_shape[1:]))
            workspace = max(workspace, layer.workspace_bytes(in_shape))
        elif isinstance(layer, (ReLU, MaxPool2d)):
            kept += math.prod(out) * (8 if getattr(layer, "return_indices", False) else 1)   # mask, argmax, indices
        elif isinstance(layer, Dropout):
            kept += math.prod(out) * item
        elif layer.params or type(layer).__name__ in ("BatchNorm2d", "MaxUnpool2d"):
            kept += math.prod(out) * item
    return 4 * model.num_parameters() * item + batch * kept + kept_by_convs + workspace


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def kernels_need_compiling() -> bool:
    """True on a fresh install: Numba has not yet cached the CPU kernels' machine code, so the
    first steps wait while it compiles them (about a minute; later runs load the cache)."""
    try:
        from tinyunet.kernels import cpu
        index = cpu._im2col_kernel._cache._cache_file._index_path   # Numba's cache index file
    except Exception:                                               # no Numba or another layout: say nothing
        return False
    return not os.path.exists(index)


# --------------------------------------------------------------------------- the training run

class Trainer:
    """Holds the model, optimizer, data and run folder of one training run.

    Everything is checked before anything is done: the options (check_options), the run
    folder (a run in it is kept unless resume or overwrite), and on resume the options
    against the run's own; then the data.

    comm: a tinyunet.distributed.Communicator to train data-parallel on its P ranks (each
    draws ``batch`` samples, the gradients are averaged; rank 0 alone evaluates, logs and
    writes), or None: one process, and nothing of distributed.py runs. Under MPI every rank
    makes the checks above itself (the same options, the same disk; rank 0 writes only once
    every rank has checked), and all go on or all refuse together (Communicator.together).
    """

    def __init__(self, options: TrainOptions, dataset: Dataset | None = None, log=print, comm=None):
        self.options = o = options
        self.comm = comm
        self.writes = comm is None or comm.is_root          # MPI: rank 0 alone writes and talks
        self.log = log if self.writes else (lambda message: None)
        if comm is None:
            self._check_before_work(dataset)
        else:                     # MPI: all ranks pass the checks, or all refuse together; all alike
            comm.together(self._check_before_work, dataset)
            comm.check_same({**asdict(o), "training data": distributed.fingerprint(
                self.train_set.images + self.train_set.targets)}, "options or training data")
        # nothing on disk has changed until here
        if self.writes:
            self._prepare_run_folder()

        self.model.to(o.device)
        # after .to(): it holds the arrays; FCN's frozen bilinear upsamplers are not among them
        self.optimizer = Adam(self.model.trainable_parameters(), lr=o.lr)
        self.batch_rng = np.random.default_rng([o.seed, 1])
        if comm is not None:      # MPI: each rank its own samples and dropout masks (rank 0: the above)
            self.batch_rng = distributed.seed_rank_streams(o.seed, comm.rank, self.model)
        self.augment = Augmenter(o.augment) if o.augment != "none" else None
        self.step = 0
        self.history: list[dict] = []
        self.watch = CollapseWatch(o.collapse_patience)
        self.train_seconds = 0.0
        self._in_step = False       # True from drawing a batch to the optimizer's last update
        self._saved_step = None     # the step the checkpoint on disk holds, once this run saved it
        if o.resume:
            self._resume()
        if comm is not None:      # MPI: one model, the same weights on every rank
            comm.check_same({"step": self.step, "weights": distributed.fingerprint(self.model.parameters().values())},
                            "starting weights (a checkpoint that differs between ranks?)")
        self._first_step = self.step

    # -- before any work ----------------------------------------------------------------------
    def _check_before_work(self, dataset: Dataset | None) -> None:
        """The options, the run folder, memory and the data (loaded here), in that order."""
        o = self.options
        check_options(o)
        if o.device == "gpu":
            require_gpu()
        self.run_dir = Path(o.out)
        self.checkpoint_path = self.run_dir / CHECKPOINT_NAME
        self._check_run_folder()
        self.model = build_model(o.model, classes=o.classes, base_width=o.base_width, seed=o.seed,
                                 **model_options(o))
        try:                      # FCN's fc6 (a 7x7 conv after five pools) needs crops of 64 pixels or more
            check_input_size(self.model, o.crop, "--crop")
        except ValueError as error:
            raise OptionError(str(error)) from None
        self._check_memory()
        self.train_set, self.val_set = self._load_data(dataset)

    def _prepare_run_folder(self) -> None:
        """The first change on disk: the run folder, and with overwrite the old checkpoint gone."""
        o = self.options
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if o.overwrite and self.checkpoint_path.exists():
            self.checkpoint_path.unlink()     # a killed new run must not leave the old checkpoint to --resume
            self.log(f"--overwrite: removed the previous run's checkpoint in {self.run_dir}")

    def _check_run_folder(self) -> None:
        """Keep every run: a folder holding a checkpoint is continued (resume), replaced
        (overwrite), or refused; on resume, the options must not change what the run computes."""
        o = self.options
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise OptionError(f"--out {o.out}: that is a file, not a run folder; choose another --out")
        if not o.resume:
            if self.checkpoint_path.exists() and not o.overwrite:
                try:
                    where = f"at step {checkpoints.read_checkpoint_meta(self.checkpoint_path)['step']}"
                except (ValueError, OSError):
                    where = "unreadable"
                raise OptionError(f"{self.run_dir} already holds a run (checkpoint.npz, {where}): continue it "
                                  f"with --resume, replace it with --overwrite, or choose another --out")
            return
        if not self.checkpoint_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path}; start without "
                                    f"--resume, or point --out at the run folder to continue")
        meta = checkpoints.read_checkpoint_meta(self.checkpoint_path)
        saved = saved_options(self.checkpoint_path)
        if saved is None:
            self.log(f"--resume: {self.checkpoint_path} does not hold its run's options; using the ones given")
        else:
            refused, reported = _differences(o, saved)
            if refused:
                raise OptionError(f"--resume: {', '.join(refused)} would change what the run computes; resume "
                                  f"without {'it' if len(refused) == 1 else 'them'} (the run's own options are "
                                  f"restored from its checkpoint), or start a new run with another --out")
            for line in reported:
                self.log(f"--resume: {line}")
        step, seconds = meta["step"], meta["extra"].get("train_seconds", 0.0)
        if step >= o.steps:
            raise OptionError(f"--resume: the run in {self.run_dir} is at step {step}, which reaches --steps {o.steps}: "
                              + ("its cosine schedule is over; start a new run to train more" if o.lr_schedule == "cosine"
                                 else f"give a larger --steps to train on"))
        if isinstance(seconds, (int, float)) and seconds >= o.minutes * 60:
            raise OptionError(f"--resume: the run in {self.run_dir} has trained {seconds / 60:.1f} minutes, which "
                              f"reaches --minutes {o.minutes}: " +
                              ("its cosine schedule is over; start a new run to train more" if o.lr_schedule == "cosine"
                               else "give a larger --minutes to train on"))

    def _check_memory(self) -> None:
        """Refuse a --batch/--crop whose training step cannot fit in this machine's memory
        (it would swap, then be killed), before any work."""
        o = self.options
        total = physical_memory_bytes()
        need = step_memory_bytes(self.model, o.batch, o.crop)
        if o.device == "cpu" and total is not None and need > total:
            raise OptionError(f"--batch {o.batch} --crop {o.crop} needs about {need / 1e9:.1f} GB for one training "
                              f"step of this {o.model}, more than this machine's {total / 1e9:.1f} GB; lower --batch "
                              f"or --crop")

    def _load_data(self, dataset: Dataset | None) -> tuple[Dataset, Dataset]:
        """(training set, validation set), with the crop checked against the smallest image."""
        o = self.options
        if dataset is None and o.data == "synthetic" and o.crop > o.synthetic_size:   # before generating it
            raise OptionError(f"--crop {o.crop} is larger than the synthetic slices ({o.synthetic_size} pixels); "
                              f"use --crop {o.synthetic_size - o.synthetic_size % crop_multiple(o)} or less")
        total = physical_memory_bytes()
        need = o.synthetic_count * o.synthetic_size ** 2 * 8          # float32 image and target
        if dataset is None and o.data == "synthetic" and total is not None and need > total / 2:
            raise OptionError(f"--synthetic-count {o.synthetic_count} slices of {o.synthetic_size} pixels need "
                              f"{need / 1e9:.1f} GB, more than half this machine's {total / 1e9:.1f} GB; generate fewer")
        if dataset is None:
            dataset = resolve_data(o.data, count=o.synthetic_count, size=o.synthetic_size, seed=o.seed,
                                   classes=o.classes)
            if o.data == "isbi2012" and len(dataset) > ISBI_TRAINING_SLICES:
                # Slices 24-29 of the download stay unseen: this project keeps them for an
                # independent evaluation of models tuned on 0-23 (see shared data's README).
                dataset = dataset.split(range(ISBI_TRAINING_SLICES))
                self.log(f"isbi2012: training and validating on slices 0-{ISBI_TRAINING_SLICES - 1} only")
        dataset = self._fit_classes(dataset)
        train_set, val_set = split_data(dataset, o.val)
        side, name = min((min(image.shape), name) for image, name in zip(train_set.images, train_set.names))
        if o.crop > side:
            raise OptionError(f"--crop {o.crop} is larger than the training image {name!r} ({side} pixels on its "
                              f"short side); use --crop {side - side % crop_multiple(o)} or less")
        self.class_weights = None
        if o.class_weights == "median-frequency":      # SegNet's balancing, from the training labels
            self.class_weights = median_frequency_weights(np.stack(train_set.targets), o.classes,
                                                          train_set.ignore_index)
            self.log("median-frequency class weights: " + ", ".join(
                f"{name} {w:.3f}" for name, w in zip(train_set.class_names, self.class_weights)))
        return train_set, val_set

    def _fit_classes(self, dataset: Dataset) -> Dataset:
        """The data as --classes K reads it: K = 1 takes membrane maps; K = 2 also takes them, as
        the classes cell (0) and membrane (1); otherwise the data's own classes must be K."""
        o, found = self.options, getattr(dataset, "classes", 1)
        if found == 1 and o.classes == 2:
            dataset = binary_as_classes(dataset)
        elif found != o.classes:
            names = ", ".join(getattr(dataset, "class_names", ()) or ()) or "membrane or not"
            raise OptionError(f"--classes {o.classes}: the data {o.data!r} holds {found} class(es) ({names}); "
                              f"give --classes {found if found > 1 else '1 (or 2)'}")
        if o.border_weights and o.classes > 1 and "membrane" not in dataset.class_names:
            raise OptionError(f"--border-weights weights the pixels between cells, found from the 'membrane' "
                              f"class; the data's classes are {', '.join(dataset.class_names)}: train without it")
        return dataset

    # -- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        extra = {"history": self.history, "options": asdict(self.options), "train_seconds": self.train_seconds}
        if self.options.classes > 1:      # for predict_membranes.py: names and colours of the classes
            extra["class_names"] = list(self.train_set.class_names)
            extra["palette"] = np.asarray(self.train_set.palette).tolist()
        if self.comm is not None:      # MPI: every rank's generators, gathered to rank 0, which alone writes
            extra["ranks"] = self.comm.gather(distributed.rank_states(self.batch_rng, self.model))
        if self.writes:
            checkpoints.save_checkpoint(
                self.checkpoint_path, self.model, self.optimizer, step=self.step,
                rngs={"batches": self.batch_rng},          # the model's dropout generators go in too
                extra=extra)
        self._saved_step = self.step

    def _resume(self) -> None:
        loaded = checkpoints.load_checkpoint(self.checkpoint_path, self.model, self.optimizer,
                                             rngs={"batches": self.batch_rng})
        history, seconds = loaded.extra.get("history", []), loaded.extra.get("train_seconds", 0.0)
        self.step = loaded.step
        self.history = history if isinstance(history, list) else []
        self.train_seconds = float(seconds) if isinstance(seconds, (int, float)) else 0.0
        if self.comm is not None or loaded.extra.get("ranks"):    # MPI: written by, or resumed on, several ranks
            rank, size = (self.comm.rank, self.comm.size) if self.comm is not None else (0, 1)
            distributed.restore_rank_streams(loaded.extra.get("ranks"), rank, size, self.options.seed, self.step,
                                             self.batch_rng, self.model, self.log)
        self.log(f"resumed from {self.checkpoint_path} at step {self.step}")

    # -- one step -----------------------------------------------------------------------------
    def train_step(self):
        """One step; returns the loss as bce_with_logits does (on the GPU a device scalar, read by
        fit() only when it logs). self._in_step is True while the state is part way between two
        steps."""
        o = self.options
        self._in_step = True
        failure = None
        try:
            images, targets = random_crops(self.train_set, o.crop, o.batch, self.batch_rng, self.augment)
            if o.classes > 1:      # class maps (B, H, W); the softmax loss takes them so
                targets = targets.reshape(len(targets), *targets.shape[-2:])
            weights = None
            if o.border_weights:
                membranes = targets if o.classes == 1 else \
                    (targets == self.train_set.class_names.index("membrane"))[:, None].astype(np.float32)
                weights = np.stack([border_weight_map(m[0])[None] for m in membranes])
                weights = to_device(weights if o.classes == 1 else weights[:, 0], o.device)
            x, t = to_device(images, o.device), to_device(targets, o.device)
            logits = self.model.forward(x)
            # Non-finite logits are caught before the update, so the weights stay as they were. On the
            # GPU that read waits for the device, so there it is made on the run's first step only;
            # later steps check on the device, folded into the loss (tinyunet/losses.py), read when logged.
            first = self.step == self._first_step
            if (o.device == "cpu" or first) and not bool(get_array_module(logits).isfinite(logits).all()):
                raise FloatingPointError(self._why_not_finite(images, targets))
            if o.classes == 1:
                loss, dlogits = bce_with_logits(logits, t, weights, check=True if first else None)
            else:
                loss, dlogits = softmax_cross_entropy(logits, t, self.class_weights, self.train_set.ignore_index,
                                                      weights)
            self.model.backward(dlogits)
        except Exception as error:    # MPI: the other ranks must hear of it, not wait for ever
            if self.comm is None:
                raise
            failure, loss = error, math.nan
        grads = self.model.gradients()
        if self.comm is not None:     # MPI: the mean over ranks, or every rank raises naming the failed one
            grads, loss = self.comm.average_gradients(grads, loss, failure, self.step + 1)
        self.optimizer.lr = learning_rate(o, self.progress())
        self.optimizer.step(grads)
        self.step += 1
        self._in_step = False
        return loss

    def _why_not_finite(self, images, targets) -> str:
        """Blame what is to blame for NaN or infinite logits: the data, or the weights (the learning rate)."""
        step = self.step + 1
        if not (np.isfinite(images).all() and np.isfinite(targets.astype(np.float32)).all()):
            return (f"the logits became NaN at step {step} because the training batch holds NaN or infinite "
                    f"values: check the data ({self.options.data}) and the augmentation ({self.options.augment})")
        if not all(np.isfinite(to_numpy(p)).all() for p in self.model.parameters().values()):
            return (f"the logits became NaN at step {step}: the weights hold NaN or infinite values, the run "
                    f"diverged. Resume from an earlier checkpoint with a lower --lr (now {self.options.lr:g})")
        return (f"the logits overflowed at step {step} with finite data and weights. "
                f"Lower --lr (now {self.options.lr:g}), or try --no-head-relu")

    def progress(self) -> float:
        """The share of the run done: steps or training time, whichever limit comes first."""
        o = self.options
        return max(self.step / max(o.steps, 1), self.train_seconds / max(o.minutes * 60.0, 1e-9))

    # -- evaluation ---------------------------------------------------------------------------
    def predict(self, image) -> np.ndarray:
        return predict_probability(self.model, image, tta=self.options.tta)

    def evaluate(self) -> dict:
        """Scores on the validation images, predicted whole. One class: the membrane scores of
        tinyunet.metrics.evaluate; K classes: the FCN paper's four and per-class IoU
        (class_scores), and the share of pixels given the most predicted class (CollapseWatch)."""
        probabilities = [self.predict(image) for image in self.val_set.images]
        release_gpu_memory()      # the whole-image blocks would stay in CuPy's pool and raise the next peak
        if self.options.classes == 1:
            scores = evaluate(np.stack(probabilities), np.stack(self.val_set.targets))
            scores["membrane_share_predicted"] = float(np.mean([(p >= self.options.threshold).mean()
                                                                for p in probabilities]))
            return scores
        labels = np.stack([p.argmax(axis=0) for p in probabilities])
        scores = self._class_scores(labels)
        shares = np.bincount(labels.ravel(), minlength=self.options.classes) / labels.size
        scores["top_class_predicted"] = self.val_set.class_names[int(shares.argmax())]
        scores["top_class_share_predicted"] = float(shares.max())
        return scores

    def _class_scores(self, labels) -> dict:
        """class_scores of (N, H, W) predicted labels against the validation set's, flattened for
        metrics.json: mean_iou, pixel_accuracy, ..., iou_<class>, precision_<class>, recall_<class>."""
        v = self.val_set
        return flatten_class_scores(class_scores(labels, np.stack(v.targets), self.options.classes, v.ignore_index,
                                                 v.class_names))

    def _record(self, loss_window: list[float]) -> dict:
        scores = self.evaluate()
        dead = head_relu_dead_channels(self.model)
        # the eval forward ran on validation images: its head ReLU statistics are the ones above
        record = {"step": self.step, "train_loss": float(np.mean(loss_window)) if loss_window else None,
                  "seconds": round(self.train_seconds, 1), **scores,
                  "head_relu_dead": [share for _, share in dead]}
        self.history.append(record)
        write_json_atomic(self.run_dir / "metrics.json", self.history)
        if self.options.classes == 1:
            messages = self.watch.check(scores["membrane_share_predicted"], dead)
        else:
            messages = self.watch.check(scores["top_class_share_predicted"], dead, scores["top_class_predicted"])
        for message in messages:
            self.log(message)
        return record

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until --steps or --minutes, then evaluate, save and report.

        Ctrl-C stops at the next step boundary (DeferredInterrupt), saves, and still writes
        the report: a resumed run then continues bit-identically. A second Ctrl-C (any
        KeyboardInterrupt) stops at once: the checkpoint is saved if the state is a step
        boundary, and nothing is saved inside a step (the last checkpoint is kept whole).

        MPI: rank 0's Ctrl-C is the one that counts: it reaches the other ranks with rank 0's
        clock after every step, so all stop after the same step and save together. A second
        Ctrl-C stops every rank at once, with nothing saved (the ranks cannot agree on it).
        """
        o = self.options
        if o.device == "cpu" and kernels_need_compiling():
            self.log("first run: Numba compiles the CPU kernels before the first steps finish (about a minute, "
                     "once; later runs load them from its cache)")
        with DeferredInterrupt() as interrupt:
            losses: list[float] = []
            try:
                self._loop(losses, interrupt)
                if interrupt.requested:
                    self.log(f"\ninterrupted at step {self.step}: saving a checkpoint (continue with --resume)")
                if self.writes and (not self.history or self.history[-1]["step"] != self.step):
                    self._record(losses[-o.eval_every:])
                self.save()
                if not self.writes:   # MPI: rank 0 alone reports
                    return {"step": self.step, "rank": self.comm.rank, "interrupted": interrupt.requested}
                result = self.finish()
            except KeyboardInterrupt:
                self._stop_at_once()
                raise
        result["interrupted"] = interrupt.requested
        return result

    def _stop_at_once(self) -> None:
        """After a second Ctrl-C: save only a step boundary, and say what is kept."""
        if self.comm is not None:     # MPI: a save would wait for ranks that may be gone
            self.log(f"\nstopped at once: {self.checkpoint_path} keeps the last saved step (continue with --resume)")
            return
        if self._in_step:
            self.log(f"\nstopped at once inside step {self.step + 1}: nothing saved, so no half-done step is; "
                     f"{self.checkpoint_path} keeps the last saved step (continue with --resume)")
            return
        if self._saved_step != self.step:
            self.save()
        self.log(f"\nstopped at once at step {self.step}: {self.checkpoint_path} holds it (continue with --resume); "
                 f"the report and montage were not written")

    def _stop_requested(self, interrupt: DeferredInterrupt) -> bool:
        """Has Ctrl-C asked the run to stop? MPI: rank 0's answer and clock, sent to every rank
        (a collective: every rank calls this before every step), so all stop after the same step."""
        if self.comm is None:
            return interrupt.requested
        self.train_seconds, requested = self.comm.root_value((self.train_seconds, interrupt.requested))
        return requested

    def _loop(self, losses: list[float], interrupt: DeferredInterrupt) -> None:
        o = self.options
        budget = o.minutes * 60.0
        clock = time.process_time if o.clock == "cpu" else time.perf_counter   # CPU time: all threads'
        unread: list = []                       # losses not yet read back (device scalars on the GPU)
        read_every = 10 if o.device == "gpu" else 1
        bar = tqdm(total=o.steps, initial=self.step, desc="training", unit="step",
                   disable=not (o.progress and self.writes), dynamic_ncols=True)
        try:
            # (first: under MPI it also sets every rank's clock to rank 0's, before the budget is compared)
            while not self._stop_requested(interrupt) and self.step < o.steps and self.train_seconds < budget:
                started = clock()
                unread.append(self.train_step())
                self.train_seconds += clock() - started
                # Reading a GPU loss waits for the GPU: read every 10 steps there, every step on the CPU
                if (len(unread) >= read_every or self.step % o.eval_every == 0 or self.step >= o.steps
                        or self.train_seconds >= budget):
                    for back, value in enumerate(float(loss) for loss in unread):
                        if not math.isfinite(value):
                            at = self.step - len(unread) + 1 + back
                            raise FloatingPointError(f"the loss became {value} at step {at}: the data or the weights hold non-finite "
                                                     f"values, or the run diverged (then resume from an earlier checkpoint with a lower --lr)")
                        losses.append(value)
                    unread = []
                    postfix = {"loss": f"{np.mean(losses[-20:]):.4f}"}
                    if self.history and o.classes == 1:
                        postfix.update(iou=f"{self.history[-1]['iou_membrane']:.3f}",
                                       dice=f"{self.history[-1]['dice']:.3f}")
                    elif self.history:
                        postfix.update(miou=f"{self.history[-1]['mean_iou']:.3f}")
                    bar.set_postfix(postfix)
                bar.update(1)
                if self.step % o.eval_every == 0 and self.writes:    # MPI: once, on rank 0
                    self._record(losses[-o.eval_every:])
                if self.step % o.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
        losses += [float(loss) for loss in unread]   # read after a Ctrl-C

    # -- what the run leaves behind -----------------------------------------------------------
    def finish(self) -> dict:
        """Predict the validation images, write them (predictions/), score them against the
        baselines, write final.json, report.txt, curves.png, montage.png and confusion.png.

        Every run, one class or K, is also scored as K >= 2 classes (a membrane run as cell and
        membrane) with the FCN paper's metrics, beside k-means on intensity and the majority class,
        so that any two runs can share one table (examples/compare_models.py)."""
        o, v = self.options, self.val_set
        prediction_dir = self.run_dir / "predictions"
        probabilities = [self.predict(image) for image in v.images]
        images, targets = np.stack(v.images), np.stack(v.targets)
        if o.classes == 1:
            for image, probability, name in zip(v.images, probabilities, v.names):
                save_prediction(image, probability, prediction_dir, name, o.threshold)
            scores = evaluate(np.stack(probabilities), targets, image=images)   # with Otsu and majority
            table = report_table([("tinyunet", scores), ("Otsu threshold", scores["otsu"]),
                                  ("majority class", scores["majority"])])
            labels = (np.stack(probabilities) >= o.threshold).astype(np.int64)
            truth, names, ignore = targets.astype(np.int64), ("cell", "membrane"), None
        else:
            labels = np.stack([p.argmax(axis=0) for p in probabilities])
            for image, label, name in zip(v.images, labels, v.names):
                save_class_prediction(image, label, v.palette, prediction_dir, name)
            truth, names, ignore = targets, v.class_names, v.ignore_index
        # the baselines: k-means on intensity, its clusters matched to the classes; the majority class
        compared = evaluate_classes(labels, truth, len(names), image=images,
                                    ignore_index=255 if ignore is None else ignore, class_names=names, seed=o.seed)
        baselines = {"k-means on intensity": compared.pop("kmeans"), "majority class": compared.pop("majority")}
        class_text = class_report_table([(f"tinyunet {o.model}", compared), *baselines.items()])
        if o.classes == 1:
            table = table + "\n\nas two classes (cell, membrane):\n" + class_text
            scores["classes"] = flatten_class_scores(compared)
        else:
            table, scores = class_text, flatten_class_scores(compared)
        scores["baselines"] = {method: flatten_class_scores(result) for method, result in baselines.items()}
        confusion = np.asarray(compared["confusion"])
        scores["confusion"] = {"rows_truth_columns_prediction": list(names), "counts": confusion.tolist()}
        self.log(table)
        write_json_atomic(self.run_dir / "final.json", {
            "step": self.step, "train_seconds": round(self.train_seconds, 1), "options": asdict(o),
            "model": o.model, "parameters": self.model.num_parameters(), "class_names": list(names),
            "scores": scores})
        atomic_write(self.run_dir / "report.txt", lambda stream: stream.write((table + "\n").encode()))
        save_confusion_png(confusion, names, self.run_dir / "confusion.png")
        from tinyunet.plots import save_class_montage, save_curves, save_montage   # matplotlib only when a run ends
        save_curves(self.history, self.run_dir / "curves.png")
        if o.classes == 1:
            save_montage(images, targets, np.stack(probabilities), v.names, self.run_dir / "montage.png", o.threshold)
        else:
            save_class_montage(images, truth, labels, v.names, v.palette, self.run_dir / "montage.png")
        self.log(f"run folder: {self.run_dir} (checkpoint.npz, metrics.json, curves.png, montage.png, "
                 f"confusion.png, predictions/)")
        return {"step": self.step, "scores": scores, "table": table}


def flatten_class_scores(scores: dict) -> dict:
    """class_scores' result as flat JSON numbers (metrics.json, final.json): the FCN paper's four,
    then iou_<class>, precision_<class>, recall_<class>; the confusion matrix is kept apart."""
    flat = {key: float(scores[key]) for key in ("pixel_accuracy", "mean_accuracy", "mean_iou",
                                                "frequency_weighted_iou")}
    for metric in ("iou", "precision", "recall"):
        flat.update({f"{metric}_{name}": float(value) for name, value in zip(scores["class_names"], scores[metric])})
    return flat


def train(options: TrainOptions, dataset: Dataset | None = None, log=print, comm=None) -> dict:
    """Run training with ``options`` (on comm's ranks when given); returns the final scores
    (see Trainer.finish; ranks other than 0 return only the step)."""
    return Trainer(options, dataset, log, comm).fit()
