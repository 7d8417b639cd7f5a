"""Checkpoints: one .npz that holds everything needed to resume training bit for bit.

    save_checkpoint("run/last.npz", model, optimizer, step=1200, rngs={"data": data_rng})
    loaded = load_checkpoint("run/last.npz", model, optimizer, rngs={"data": data_rng})
    loaded.step                                  # 1200
    model = load_checkpoint("run/last.npz").model   # or build the model from the saved config

What the file holds (a zip of .npy arrays, written and read with allow_pickle=False, so loading
a file never runs code: there is no pickle in it)::

    __tinyunet__              JSON text: format and version, the model config, the step, the
                              optimizer's class, hyper-parameters and step, every random
                              generator's state (Dropout's and the caller's), caller's extras
    param/<dotted name>       every parameter, e.g. param/down1.conv1.weight
    optim/<slot>.<name>       the optimizer's state, e.g. optim/m.down1.conv1.weight (Adam)

A generator's state holds 128-bit integers, which no NumPy integer dtype can hold; JSON
integers can, so states travel in the JSON text.

Atomic: the file is written to a temporary file in the same folder, flushed to disk (fsync)
and renamed over the old one (os.replace is atomic on one file system). A crash during a save
leaves the previous checkpoint whole, and at worst a stray '.<name>.*.tmp' file.

Loading checks that the file is a tinyunet checkpoint, that every name is there with its
shape, and lists each mismatch (expected against found); a truncated, corrupt or foreign file
raises CheckpointError saying so. Proofs: tests/test_checkpoint.py (bit-identical resume,
crash during save, mismatches, corrupt and foreign files).
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyunet.backend import to_numpy
from tinyunet.unet import UNet, UNetConfig

FORMAT = "tinyunet-checkpoint"
VERSION = 1
META_KEY = "__tinyunet__"


class CheckpointError(ValueError):
    """The file is not a readable tinyunet checkpoint, or it does not fit the model."""


@dataclass
class LoadedCheckpoint:
    """What load_checkpoint returns: the model (given or built), the step, the saved config."""
    model: UNet
    step: int
    config: UNetConfig
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def _optimizer_meta(optimizer) -> dict | None:
    if optimizer is None:
        return None
    hyper = {key: float(getattr(optimizer, key)) for key in ("lr", "beta1", "beta2", "epsilon", "momentum")
             if hasattr(optimizer, key)}
    return {"class": type(optimizer).__name__, "hyper": hyper, "step": int(optimizer.step_count)}


def save_checkpoint(path, model: UNet, optimizer=None, *, step: int = 0, rngs: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write model, optimizer, generators and ``step`` to ``path`` atomically; returns the path.

    rngs:  {name: numpy Generator} of the caller (data order, augmentation); the model's own
           Dropout generators are always saved.
    extra: JSON-serializable values to keep beside (e.g. the best validation score).
    """
    path = Path(path)
    rngs = dict(rngs or {})
    for name, rng in rngs.items():
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"save_checkpoint: rngs[{name!r}] must be a numpy Generator, got {type(rng).__name__}")
    meta = {
        "format": FORMAT, "version": VERSION,
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
    if optimizer is not None:
        for key, value in optimizer.state_dict().items():
            if key != "step":
                arrays[f"optim/{key}"] = to_numpy(value)
    _write_atomically(path, arrays)
    return path


def _write_atomically(path: Path, arrays: dict) -> None:
    """Temporary file in the same folder, fsync, os.replace, fsync the folder."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"save_checkpoint: the folder {str(directory)!r} does not exist; create it first")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, allow_pickle=False, **arrays)
            handle.flush()
            os.fsync(handle.fileno())          # the bytes are on disk before the name points at them
        os.replace(temporary, path)            # atomic: readers see the old file or the new one
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):             # make the rename itself durable (POSIX)
        folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_checkpoint(path) -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint file, every array read into memory and checked.

    Raises CheckpointError for a missing, truncated, corrupt or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        # Our own handle: np.load leaks the file it opened when the zip is broken.
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
            names = list(archive.keys())
            if META_KEY not in names:
                raise CheckpointError(
                    f"{str(path)!r} is a .npz file but not a tinyunet checkpoint (no {META_KEY!r} entry; "
                    f"it holds {names[:5]}{' ...' if len(names) > 5 else ''}). Weights saved by another "
                    f"program must be converted into {{'down1.conv1.weight': array, ...}} and loaded with "
                    f"UNet.load_parameters")
            arrays = {name: archive[name] for name in names}   # reading checks every CRC
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as error:
        raise CheckpointError(f"{str(path)!r} is truncated or corrupt and cannot be read ({type(error).__name__}: "
                              f"{error}); use an earlier checkpoint") from None
    except ValueError as error:            # not a zip and not a .npy, or an object array
        raise CheckpointError(f"{str(path)!r} is not a tinyunet checkpoint: NumPy cannot read it as .npz "
                              f"without pickle ({error})") from None
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except (json.JSONDecodeError, ValueError) as error:
        raise CheckpointError(f"{str(path)!r}: the {META_KEY!r} entry is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a tinyunet checkpoint (format {meta.get('format') if isinstance(meta, dict) else meta!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} is checkpoint format version {meta.get('version')}; this tinyunet "
                              f"reads version {VERSION}")
    return meta, arrays


def _mismatches(expected: dict, found: dict, what: str) -> list[str]:
    """Lines 'name: expected (shape), found (shape)' for every difference."""
    lines = [f"  {what}{name}: expected {tuple(a.shape)}, found nothing" for name, a in expected.items()
             if name not in found]
    lines += [f"  {what}{name}: expected nothing, found {tuple(b.shape)}" for name, b in found.items()
              if name not in expected]
    lines += [f"  {what}{name}: expected {tuple(a.shape)}, found {tuple(found[name].shape)}"
              for name, a in expected.items() if name in found and tuple(found[name].shape) != tuple(a.shape)]
    return lines


def load_checkpoint(path, model: UNet | None = None, optimizer=None, *, rngs: dict | None = None) -> LoadedCheckpoint:
    """Restore a checkpoint into ``model`` (built from the saved config when None), the
    ``optimizer`` (state, step and hyper-parameters) and the generators in ``rngs``.

    Everything is checked before anything is changed: a mismatch leaves the model as it was,
    and the error lists every mismatch, expected (the model) against found (the file).
    Parameters are copied INTO the existing arrays, so an optimizer built on
    ``model.parameters()`` stays attached.
    """
    meta, arrays = read_checkpoint(path)
    try:
        config = UNetConfig(**meta["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{str(path)!r}: the saved config cannot be read ({error})") from None
    if model is None:
        model = UNet(config)
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    problems = _mismatches(model.parameters(), params, "")
    for key in ("padding", "head_relu"):            # change the function, not the shapes
        if getattr(model.config, key) != getattr(config, key):
            problems.append(f"  config.{key}: expected {getattr(model.config, key)!r}, found {getattr(config, key)!r}")
    model_rngs = model.random_generators()
    saved_model_rngs = meta.get("model_rngs", {})
    if set(model_rngs) != set(saved_model_rngs):
        problems.append(f"  dropout generators: expected {sorted(model_rngs)}, found {sorted(saved_model_rngs)}")
    rngs = dict(rngs or {})
    saved_rngs = meta.get("rngs", {})
    problems += [f"  rngs[{name!r}]: expected a saved generator, found nothing" for name in rngs if name not in saved_rngs]

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
    if problems:
        raise CheckpointError(f"{str(path)!r} does not fit this model ({len(problems)} mismatches, expected "
                              f"= this model, found = the file):\n" + "\n".join(problems))

    model.load_parameters(params)
    for name, rng in model_rngs.items():
        rng.bit_generator.state = saved_model_rngs[name]
    for name, rng in rngs.items():
        rng.bit_generator.state = saved_rngs[name]
    if optimizer is not None:
        optimizer.load_state_dict({"step": optimizer_meta["step"], **state})
        for key, value in optimizer_meta["hyper"].items():
            setattr(optimizer, key, value)
    return LoadedCheckpoint(model=model, step=int(meta["step"]), config=config, extra=meta.get("extra", {}))
