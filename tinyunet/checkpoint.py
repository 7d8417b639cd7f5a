"""Checkpoints: one .npz that holds everything needed to resume training bit for bit.

    save_checkpoint("run/last.npz", model, optimizer, step=1200, rngs={"data": data_rng})
    loaded = load_checkpoint("run/last.npz", model, optimizer, rngs={"data": data_rng})
    loaded.step                                  # 1200
    model = load_checkpoint("run/last.npz").model   # or build the model from the saved config

What the file holds (a zip of .npy arrays, written and read with allow_pickle=False, so loading
a file never runs code: there is no pickle in it)::

    __tinyunet__              JSON text: format and version, the model kind (one of
                              tinyunet.models.MODELS; absent in files from before it: a U-Net)
                              and config, the step, the optimizer's class, hyper-parameters
                              and step, every random generator's state (Dropout's and the
                              caller's), caller's extras
    param/<dotted name>       every parameter, e.g. param/down1.conv1.weight (frozen ones too:
                              FCN's bilinear upsamplers)
    buffer/<dotted name>      state that is not a parameter: batch norm's running_mean and
                              running_var (SegNet), so that a resumed run continues bit for bit
    optim/<slot>.<name>       the optimizer's state, e.g. optim/m.down1.conv1.weight (Adam), for
                              the parameters it was given (model.trainable_parameters())

A generator's state holds 128-bit integers, which no NumPy integer dtype can hold; JSON
integers can, so states travel in the JSON text.

Atomic: the file is written to a temporary file in the same folder, flushed to disk (fsync)
and renamed over the old one (os.replace is atomic on one file system). A crash during a save
leaves the previous checkpoint whole, and at worst a stray '.<name>.<pid>.*.tmp' file, which the
next save removes (tinyunet/files.py).

Loading reads the zip's .npy headers first (names, shapes, dtypes, stored sizes: nothing of
the arrays), checks the saved config against bounds (MAX_PARAMETERS, MAX_DEPTH) and every
header against the shapes that config means, and only then reads the arrays: a hostile file
cannot make it allocate more than the model it describes. Then every value must be finite and
every generator state valid, and only then is anything changed (all or nothing). A truncated,
corrupt or foreign file (a PNG, a .pt, a pickle) raises CheckpointError saying so, with one
line naming the fix. Proofs: tests/test_checkpoint.py (bit-identical resume, crash during
save, mismatches, corrupt, foreign and hostile files), tests/test_checkpoint_models.py (every
kind, SegNet's bit-identical resume with its batch-norm statistics, frozen FCN upsamplers, a
checkpoint of another model or class count).
"""
from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyunet import fcn as fcn_module
from tinyunet import segnet as segnet_module
from tinyunet.backend import to_numpy
from tinyunet.fcn import FCNConfig
from tinyunet.files import atomic_write
from tinyunet.models import MODELS, config_from_dict, model_from_config, model_kind
from tinyunet.segnet import SegNetConfig
from tinyunet.unet import UNet, UNetConfig

FORMAT = "tinyunet-checkpoint"
VERSION = 1
META_KEY = "__tinyunet__"


class CheckpointError(ValueError):
    """The file is not a readable tinyunet checkpoint, or it does not fit the model."""


@dataclass
class LoadedCheckpoint:
    """What load_checkpoint returns: the model (given or built), the step, the saved config
    and the model kind (tinyunet.models.MODELS)."""
    model: object
    step: int
    config: object
    extra: dict = field(default_factory=dict)
    kind: str = "unet"


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def _optimizer_meta(optimizer) -> dict | None:
    if optimizer is None:
        return None
    hyper = {key: float(getattr(optimizer, key)) for key in ("lr", "beta1", "beta2", "epsilon", "momentum")
             if hasattr(optimizer, key)}
    return {"class": type(optimizer).__name__, "hyper": hyper, "step": int(optimizer.step_count)}


def save_checkpoint(path, model, optimizer=None, *, step: int = 0, rngs: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write model (any of tinyunet.models.MODELS: parameters, batch-norm buffers, config and
    kind), optimizer, generators and ``step`` to ``path`` atomically; returns the path.

    rngs:  {name: numpy Generator} of the caller (data order, augmentation); the model's own
           Dropout generators are always saved.
    extra: JSON-serializable values to keep beside (e.g. the best validation score).
    """
    path = Path(path)
    kind = model_kind(model)
    rngs = dict(rngs or {})
    for name, rng in rngs.items():
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"save_checkpoint: rngs[{name!r}] must be a numpy Generator, got {type(rng).__name__}")
    meta = {
        "format": FORMAT, "version": VERSION, "kind": kind,
        "config": json.loads(model.config.to_json()),
        "step": int(step),
        "optimizer": _optimizer_meta(optimizer),
        "model_rngs": {name: rng.bit_generator.state for name, rng in model.random_generators().items()},
        "rngs": {name: rng.bit_generator.state for name, rng in rngs.items()},
        "extra": extra or {},
    }
    try:
        meta_text = json.dumps(meta)
    except TypeError as error:
        raise TypeError(f"save_checkpoint: extra must hold JSON values only ({error})") from None
    arrays = {META_KEY: np.array(meta_text)}
    arrays.update({f"param/{name}": to_numpy(value) for name, value in model.parameters().items()})
    arrays.update({f"buffer/{name}": to_numpy(value) for name, value in model.buffers().items()})
    if optimizer is not None:
        for key, value in optimizer.state_dict().items():
            if key != "step":
                arrays[f"optim/{key}"] = to_numpy(value)
    _write_atomically(path, arrays)
    return path


def _write_atomically(path: Path, arrays: dict) -> None:
    """tinyunet/files.py: temporary file in the same folder (mode as a plain open would give,
    stray temporaries of killed saves removed), fsync, os.replace, fsync the folder."""
    try:
        atomic_write(path, lambda stream: np.savez(stream, allow_pickle=False, **arrays), create_folder=False)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"save_checkpoint: {error}") from None


# ---------------------------------------------------------------------------------------------
# reading: headers first, arrays only once everything fits
# ---------------------------------------------------------------------------------------------
# Bounds on what a file may ask for, checked before anything is allocated. The exact U-Net has
# 31 million parameters; base_width 128 has 124 million.
MAX_PARAMETERS = 1 << 28          # 268,435,456: 1 GiB of float32 weights (3 GiB with Adam's m and v)
MAX_DEPTH = 12                    # a 4096-pixel crop at the smallest
MAX_ENTRIES = 4096                # arrays in one file (the exact U-Net with Adam: 139)
MAX_META_BYTES = 64 << 20         # the JSON entry (metrics history included)
ZIP_MAGIC = b"PK\x03\x04"


def parameter_shapes(config) -> dict[str, tuple]:
    """{'down1.conv1.weight': (64, 1, 3, 3), ...} of the model ``config`` builds (a UNetConfig,
    FCNConfig or SegNetConfig), computed without building it (nothing is allocated). Mirrors
    each model's __init__ (FCN and SegNet: their layer_table); proof:
    tests/test_checkpoint.py::test_parameter_shapes_match_the_model and
    tests/test_models.py::test_parameter_and_buffer_shapes_match_every_model."""
    if isinstance(config, (FCNConfig, SegNetConfig)):
        return _table_shapes(config)[0]
    shapes: dict[str, tuple] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    widths, cin = config.widths, config.in_channels
    for i in range(1, config.depth + 1):
        conv(f"down{i}.conv1", cin, widths[i - 1], 3)
        conv(f"down{i}.conv2", widths[i - 1], widths[i - 1], 3)
        cin = widths[i - 1]
    conv("bottom.conv1", cin, widths[config.depth], 3)
    conv("bottom.conv2", widths[config.depth], widths[config.depth], 3)
    for i in range(config.depth, 0, -1):
        conv(f"up{i}.upconv", widths[i], widths[i - 1], 2)
        conv(f"up{i}.conv1", 2 * widths[i - 1], widths[i - 1], 3)
        conv(f"up{i}.conv2", widths[i - 1], widths[i - 1], 3)
    if config.padding == "same" and config.classes == 1:
        conv("head.conv", widths[0], 2, 3)
        conv("head.out", 2, 1, 1)
    else:
        conv("head.out", widths[0], config.classes, 1)
    return shapes


def buffer_shapes(config) -> dict[str, tuple]:
    """{'bn1_1.running_mean': (64,), ...}: the batch-norm statistics (SegNet); {} otherwise."""
    if isinstance(config, (FCNConfig, SegNetConfig)):
        return _table_shapes(config)[1]
    return {}


def trainable_shapes(config) -> dict[str, tuple]:
    """parameter_shapes without the frozen ones (FCN's bilinear upsamplers, unless
    learn_upsampling): the parameters an optimizer is given and saves state for."""
    shapes = parameter_shapes(config)
    if isinstance(config, FCNConfig) and not config.learn_upsampling:
        frozen = {name for name, kind, _ in fcn_module.layer_table(config) if kind == "up"}
        shapes = {k: v for k, v in shapes.items() if k.rsplit(".", 1)[0] not in frozen}
    return shapes


def _table_shapes(config) -> tuple[dict, dict]:
    """(parameter shapes, buffer shapes) of an FCN or SegNet from its layer table."""
    params, buffers = {}, {}
    if isinstance(config, FCNConfig):
        for name, kind, a in fcn_module.layer_table(config):
            if kind in ("conv", "score"):
                params[f"{name}.weight"] = (a["cout"], a["cin"], a.get("k", 1), a.get("k", 1))
                params[f"{name}.bias"] = (a["cout"],)
            elif kind == "up":                                  # (K, K, k, k), no bias
                params[f"{name}.weight"] = (config.classes, config.classes, a["k"], a["k"])
        return params, buffers
    for name, kind, a in segnet_module.layer_table(config):
        if kind == "conv":
            params[f"{name}.weight"] = (a["cout"], a["cin"], 3, 3)
            params[f"{name}.bias"] = (a["cout"],)
        elif kind == "bn":
            params[f"{name}.weight"] = params[f"{name}.bias"] = (a["channels"],)
            buffers[f"{name}.running_mean"] = buffers[f"{name}.running_var"] = (a["channels"],)
    return params, buffers


def check_config_bounds(config, source: str = "the config") -> None:
    """Refuse a config whose model would be absurdly large, before anything is allocated."""
    if isinstance(config, UNetConfig) and config.depth > MAX_DEPTH:
        raise CheckpointError(f"{source}: depth {config.depth} is more than this tinyunet builds ({MAX_DEPTH}); "
                              f"the file is corrupt or was not written by tinyunet")
    count = sum(math.prod(shape) for shape in parameter_shapes(config).values())
    if count > MAX_PARAMETERS:
        what = ", ".join(f"{key}={getattr(config, key)}" for key in
                         ("base_width", "depth", "fc_width", "classes", "in_channels") if hasattr(config, key))
        raise CheckpointError(
            f"{source}: {what} "
            f"means {count:,} parameters, more than tinyunet loads ({MAX_PARAMETERS:,}, "
            f"tinyunet.checkpoint.MAX_PARAMETERS); the file is corrupt or was not written by tinyunet")


@dataclass
class _Entry:
    """One .npy entry of the zip, from its header: nothing of the array is read."""
    shape: tuple
    dtype: np.dtype
    fortran_order: bool


def _not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{str(path)!r} is not a tinyunet checkpoint ({why}); give the checkpoint.npz "
                           f"that train_membranes.py writes into its run folder")


def _describe_start(head: bytes) -> str:
    """What a file that is not a zip looks like, for the error message."""
    for magic, what in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                        (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
                        (b"\x93NUMPY", "a single .npy array"), (b"\x89HDF", "an HDF5 file (Keras .h5?)"),
                        (b"\x80", "a Python pickle (PyTorch .pt?), never loaded")):
        if head.startswith(magic):
            return f"it is {what}, not a .npz archive"
    return "it is not a .npz archive"


def _open_archive(path: Path) -> zipfile.ZipFile:
    """The zip, or CheckpointError: a non-zip is 'not a checkpoint', a broken zip 'truncated or corrupt'."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}" +
                                (" (that is a folder: give its checkpoint.npz)" if path.is_dir() else ""))
    with open(path, "rb") as handle:
        head = handle.read(8)
    if not head.startswith(ZIP_MAGIC):
        raise _not_a_checkpoint(path, _describe_start(head))
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{str(path)!r} is truncated or corrupt and cannot be read ({type(error).__name__}: "
                              f"{error}); use an earlier checkpoint") from None


def _read_headers(path: Path, archive: zipfile.ZipFile) -> dict[str, _Entry]:
    """{entry name: _Entry} from the .npy headers alone; the sizes they declare must be the
    sizes stored in the zip, so reading an entry later allocates what the header says, no more."""
    infos = archive.infolist()
    if len(infos) > MAX_ENTRIES:
        raise _not_a_checkpoint(path, f"it holds {len(infos)} entries, more than {MAX_ENTRIES}")
    entries = {}
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise _not_a_checkpoint(path, f"it holds {info.filename!r}, which is not a .npy array")
        name = info.filename[:-len(".npy")]
        try:
            with archive.open(info) as stream:
                version = np.lib.format.read_magic(stream)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran_order, dtype = reader(stream)
                offset = stream.tell()
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, SyntaxError) as error:
            raise CheckpointError(f"{str(path)!r}: the entry {name!r} is truncated or corrupt ({error}); "
                                  f"use an earlier checkpoint") from None
        if dtype.hasobject:
            raise CheckpointError(f"{str(path)!r}: the entry {name!r} holds Python objects, which only pickle "
                                  f"can read; tinyunet never loads pickle (refused without pickle)")
        if offset + math.prod(shape) * dtype.itemsize != info.file_size:
            raise CheckpointError(f"{str(path)!r}: the entry {name!r} declares {shape} {dtype} but stores "
                                  f"{info.file_size - offset} bytes: truncated or corrupt; use an earlier checkpoint")
        entries[name] = _Entry(tuple(shape), dtype, fortran_order)
    return entries


def _read_entry(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """One array, its CRC checked (zipfile checks it on reading the whole entry)."""
    try:
        data = archive.read(f"{name}.npy")
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise CheckpointError(f"{str(path)!r} is truncated or corrupt and cannot be read ({type(error).__name__}: "
                              f"{error}); use an earlier checkpoint") from None


def _read_meta(path: Path, archive: zipfile.ZipFile, entries: dict) -> dict:
    meta_entry = entries.get(META_KEY)
    if meta_entry is None:
        shown = sorted(entries)[:5]
        raise CheckpointError(
            f"{str(path)!r} is a .npz file but not a tinyunet checkpoint (no {META_KEY!r} entry; "
            f"it holds {shown}{' ...' if len(entries) > 5 else ''}). Weights saved by another "
            f"program must be converted into {{'down1.conv1.weight': array, ...}} and loaded with "
            f"UNet.load_parameters")
    if meta_entry.dtype.kind != "U" or meta_entry.shape != () or meta_entry.dtype.itemsize > MAX_META_BYTES:
        raise _not_a_checkpoint(path, f"its {META_KEY!r} entry is {meta_entry.shape} {meta_entry.dtype}, "
                                      f"not the JSON text of at most {MAX_META_BYTES} bytes")
    text = str(_read_entry(path, archive, META_KEY))
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, ValueError) as error:
        raise CheckpointError(f"{str(path)!r}: the {META_KEY!r} entry is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _not_a_checkpoint(path, f"format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} is checkpoint format version {meta.get('version')}; this tinyunet "
                              f"reads version {VERSION}")
    return meta


def saved_kind(meta: dict) -> str:
    """The model kind a checkpoint's JSON names; 'unet' for files written before kinds existed."""
    return meta.get("kind", "unet")


def _check_meta(path: Path, meta: dict):
    """The saved config (of the saved kind), bounded, and the types of everything else in the
    JSON: a clear error for each, before any array is read."""
    def bad(what):
        return CheckpointError(f"{str(path)!r}: {what}; the file is damaged or was not written by this tinyunet")

    if not isinstance(meta.get("config"), dict):
        raise bad("the model config is missing")
    kind = saved_kind(meta)
    if kind not in MODELS:
        raise bad(f"the model kind {kind!r} is none of {', '.join(MODELS)}")
    try:
        config = config_from_dict(kind, meta["config"])
    except (TypeError, ValueError) as error:
        raise bad(f"the saved config cannot be read ({error})") from None
    check_config_bounds(config, repr(str(path)))
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"the step is {step!r}, not an integer >= 0")
    for key in ("model_rngs", "rngs", "extra"):
        if not isinstance(meta.get(key, {}), dict):
            raise bad(f"{key!r} is {type(meta[key]).__name__}, not a JSON object")
    optimizer = meta.get("optimizer")
    if optimizer is not None:
        ok = (isinstance(optimizer, dict) and isinstance(optimizer.get("class"), str)
              and isinstance(optimizer.get("hyper"), dict)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      for v in optimizer["hyper"].values())
              and isinstance(optimizer.get("step"), int) and not isinstance(optimizer["step"], bool)
              and optimizer["step"] >= 0)
        if not ok:
            raise bad(f"the optimizer entry {str(optimizer)[:120]} is not {{class, finite hyper-parameters, step >= 0}}")
    return config


def _check_generator_state(target: np.random.Generator, state, label: str, problems: list) -> None:
    """Try the saved state on a scratch generator of the same kind: a bad state is a listed
    problem, and the real generator is only set once everything fits."""
    scratch = type(target.bit_generator)()
    try:
        scratch.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        problems.append(f"  {label}: the saved state is not a valid {type(scratch).__name__} state ({error})")


def _check_arrays_finite(path: Path, arrays: dict) -> None:
    bad = [name for name, value in arrays.items() if not np.isfinite(value).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise CheckpointError(f"{str(path)!r} holds NaN or infinite values in {shown}: the run it comes from "
                              f"diverged; use an earlier checkpoint, and resume with a lower --lr")


def read_checkpoint(path) -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint file, every array read into memory and checked.

    The headers are checked first (names, dtypes, sizes within bounds), so a hostile file
    cannot make this allocate more than the model it describes. Raises CheckpointError for
    a truncated, corrupt or foreign file, FileNotFoundError for a missing one.
    """
    path = Path(path)
    with _open_archive(path) as archive:
        entries = _read_headers(path, archive)
        meta = _read_meta(path, archive, entries)
        config = _check_meta(path, meta)
        _check_entries(path, entries, config, meta)
        arrays = {name: _read_entry(path, archive, name) for name in entries if name != META_KEY}
    return meta, arrays


def read_checkpoint_meta(path) -> dict:
    """The JSON part of a checkpoint (config, step, optimizer, extra) without reading any
    array; the same checks as read_checkpoint on everything but the arrays' values."""
    path = Path(path)
    with _open_archive(path) as archive:
        entries = _read_headers(path, archive)
        meta = _read_meta(path, archive, entries)
        _check_entries(path, entries, _check_meta(path, meta), meta)
    return meta


def _check_entries(path: Path, entries: dict, config, meta: dict) -> None:
    """Every entry is a parameter or buffer of the saved config (shape and float dtype from
    the headers) or optimizer state for a parameter; nothing else. Optimizer state may leave
    out frozen parameters (an optimizer given trainable_parameters()), nothing else."""
    shapes = parameter_shapes(config)
    expected = {f"param/{name}": shape for name, shape in shapes.items()}
    expected.update({f"buffer/{name}": shape for name, shape in buffer_shapes(config).items()})
    optional = set()
    trainable = trainable_shapes(config)
    problems = []
    optimizer = meta.get("optimizer")
    slots = {k[len("optim/"):].split(".", 1)[0] for k in entries if k.startswith("optim/")}
    if optimizer is None and slots:
        problems.append(f"  optimizer state {sorted(slots)} without an optimizer entry")
    for slot in slots:
        expected.update({f"optim/{slot}.{name}": shape for name, shape in shapes.items()})
        optional.update(f"optim/{slot}.{name}" for name in shapes if name not in trainable)
    dtype = np.dtype(config.dtype)
    for name, entry in entries.items():
        if name == META_KEY:
            continue
        if name not in expected:
            what = (f"a {config.padding!r} U-Net of depth {config.depth}" if isinstance(config, UNetConfig)
                    else f"this {saved_kind(meta)}")
            problems.append(f"  {name}: not part of {what}")
        elif entry.shape != expected[name]:
            problems.append(f"  {name}: the config means {expected[name]}, the file holds {entry.shape}")
        elif entry.dtype != dtype:
            problems.append(f"  {name}: the config means {dtype}, the file holds {entry.dtype}")
    missing = [name for name in expected if name not in entries and name not in optional]
    problems += [f"  {name}: missing" for name in missing[:10]]
    if len(missing) > 10:
        problems.append(f"  ... and {len(missing) - 10} more missing")
    if problems:
        raise CheckpointError(f"{str(path)!r} does not hold what its own config describes ({len(problems)} "
                              f"problem{'s' if len(problems) > 1 else ''}); the file is damaged or was not written by tinyunet:\n" + "\n".join(problems))


def _mismatches(expected: dict, found: dict, what: str) -> list[str]:
    """Lines 'name: expected (shape), found (shape)' for every difference."""
    lines = [f"  {what}{name}: expected {tuple(a.shape)}, found nothing" for name, a in expected.items()
             if name not in found]
    lines += [f"  {what}{name}: expected nothing, found {tuple(b.shape)}" for name, b in found.items()
              if name not in expected]
    lines += [f"  {what}{name}: expected {tuple(a.shape)}, found {tuple(found[name].shape)}"
              for name, a in expected.items() if name in found and tuple(found[name].shape) != tuple(a.shape)]
    return lines


def load_checkpoint(path, model=None, optimizer=None, *, rngs: dict | None = None) -> LoadedCheckpoint:
    """Restore a checkpoint into ``model`` (built from the saved kind and config when None),
    the ``optimizer`` (state, step and hyper-parameters) and the generators in ``rngs``.

    A model of another kind or class count than the file's is refused in one line (build the
    model from the file instead: load_checkpoint(path) with no model). Batch-norm running
    statistics are restored with the parameters.

    All or nothing: the file's headers, config, arrays, values (finite) and generator states
    are all checked before anything is changed, so an error leaves model, optimizer and
    generators as they were; it lists every mismatch, expected (the model) against found
    (the file). Parameters are copied INTO the existing arrays, so an optimizer built on
    ``model.parameters()`` stays attached.
    """
    path = Path(path)
    meta, arrays = read_checkpoint(path)
    kind = saved_kind(meta)
    config = config_from_dict(kind, meta["config"])   # read_checkpoint checked it
    if model is not None:
        own_kind = model_kind(model)
        if own_kind != kind or model.config.classes != config.classes:
            raise CheckpointError(
                f"{str(path)!r} holds a {kind} checkpoint (classes {config.classes}); this model is a {own_kind} "
                f"(classes {model.config.classes}): build it with tinyunet.models.build_model from the file "
                f"(load_checkpoint(path) with no model does)")
    _check_arrays_finite(path, arrays)
    if model is None:
        model = model_from_config(config)
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    buffers = {k[len("buffer/"):]: v for k, v in arrays.items() if k.startswith("buffer/")}
    problems = _mismatches(model.parameters(), params, "")
    problems += _mismatches(model.buffers(), buffers, "buffer ")
    # options that change the function, not the shapes
    keys = {UNetConfig: ("padding", "head_relu", "dtype"), FCNConfig: ("input_pad", "learn_upsampling", "dtype"),
            SegNetConfig: ("momentum", "eps", "dtype")}[type(config)]
    for key in keys:
        if getattr(model.config, key) != getattr(config, key):
            problems.append(f"  config.{key}: expected {getattr(model.config, key)!r}, found {getattr(config, key)!r}")
    model_rngs = model.random_generators()
    saved_model_rngs = meta.get("model_rngs", {})
    if set(model_rngs) != set(saved_model_rngs):
        problems.append(f"  dropout generators: expected {sorted(model_rngs)}, found {sorted(saved_model_rngs)}")
    else:
        for name, rng in model_rngs.items():
            _check_generator_state(rng, saved_model_rngs[name], f"dropout generator {name!r}", problems)
    rngs = dict(rngs or {})
    saved_rngs = meta.get("rngs", {})
    for name, rng in rngs.items():
        if name not in saved_rngs:
            problems.append(f"  rngs[{name!r}]: expected a saved generator, found nothing")
        else:
            _check_generator_state(rng, saved_rngs[name], f"rngs[{name!r}]", problems)

    optimizer_meta = meta.get("optimizer")
    state = {}
    if optimizer is not None:
        if optimizer_meta is None:
            problems.append(f"  optimizer: expected {type(optimizer).__name__} state, found none (saved without one)")
        elif optimizer_meta["class"] != type(optimizer).__name__:
            problems.append(f"  optimizer: expected {type(optimizer).__name__}, found {optimizer_meta['class']}")
        else:
            state = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
            expected = {f"{slot}.{name}": p for slot in optimizer.slots for name, p in optimizer.params.items()}
            problems += _mismatches(expected, state, "optimizer ")
            problems += [f"  optimizer: {type(optimizer).__name__} has no hyper-parameter {key!r}"
                         for key in optimizer_meta["hyper"] if not hasattr(optimizer, key)]
    if problems:
        raise CheckpointError(f"{str(path)!r} does not fit this model ({len(problems)} "
                              f"mismatch{'es' if len(problems) > 1 else ''}, expected "
                              f"= this model, found = the file):\n" + "\n".join(problems))

    # everything fits: nothing below can fail on the file's content
    if isinstance(model, UNet):
        model.load_parameters(params)
    else:
        model.load_parameters({**params, **buffers})     # LayerNetwork: parameters and buffers
    for name, rng in model_rngs.items():
        rng.bit_generator.state = saved_model_rngs[name]
    for name, rng in rngs.items():
        rng.bit_generator.state = saved_rngs[name]
    if optimizer is not None:
        optimizer.load_state_dict({"step": optimizer_meta["step"], **state})
        for key, value in optimizer_meta["hyper"].items():
            setattr(optimizer, key, value)
    return LoadedCheckpoint(model=model, step=int(meta["step"]), config=config, extra=meta.get("extra", {}),
                            kind=kind)
