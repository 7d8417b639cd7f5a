"""safetensors, both ways: the only module that imports safetensors (lazily).

    save_safetensors("unet.safetensors", model)           # any model: U-Net, FCN, SegNet
    model = load_safetensors("unet.safetensors")          # built from the saved kind and config
    load_safetensors("unet.safetensors", model)           # into an existing model

safetensors is a named-tensor format without pickle (a JSON header, then the raw bytes) that
PyTorch, JAX and the Hugging Face tools read. The file holds one tensor per tinyunet parameter
and buffer (SegNet's batch-norm running statistics, which its evaluation forward uses), under
its dotted name and in tinyunet's layout ('down1.conv1.weight': (F, C, kh, kw), the layout of
PyTorch's Conv2d too), and in its metadata the model's kind and config as JSON
(``tinyunet.kind``, absent in files of U-Nets written before other models existed, and
``tinyunet.config``), so that ``load_safetensors`` can build the model. A file from elsewhere,
without that metadata, loads into a model you build yourself (pass ``model``).

Everything is checked before a weight is copied: every name present with its shape, floating
point (float16/32/64, cast to the model's dtype), nothing extra. Writes are atomic.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tinyunet.backend import to_numpy
from tinyunet.formats.common import FormatError, require, write_atomically
from tinyunet.models import config_from_dict, model_from_config, model_kind

CONFIG_KEY = "tinyunet.config"
KIND_KEY = "tinyunet.kind"
FORMAT_KEY = "format"


class SafetensorsFileError(FormatError):
    """The file is not readable safetensors, or its tensors do not fit the model."""


def _safetensors():
    require("safetensors", "safetensors", "reading and writing safetensors files")
    import safetensors.numpy
    return safetensors


def save_safetensors(path, model) -> Path:
    """Write every parameter and buffer of ``model``, its kind and its config to ``path`` (atomically)."""
    safetensors = _safetensors()
    tensors = {name: np.ascontiguousarray(to_numpy(value)) for name, value in _state(model).items()}
    # format 'pt': the tensors are in PyTorch's layout (Conv2d weight (F, C, kh, kw)), as tinyunet's
    data = safetensors.numpy.save(tensors, metadata={FORMAT_KEY: "pt", KIND_KEY: model_kind(model),
                                                     CONFIG_KEY: model.config.to_json()})
    return write_atomically(path, data, "save_safetensors")


def read_safetensors(path) -> tuple[dict, dict]:
    """(metadata, {name: array}) of a safetensors file, every tensor read and checked to be
    floating point. SafetensorsFileError for a truncated, corrupt or non-float file."""
    safetensors = _safetensors()
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    try:
        with safetensors.safe_open(path, framework="np") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:      # safetensors raises its own SafetensorError (and OSError, ValueError)
        raise SafetensorsFileError(f"{path!r} cannot be read as safetensors ({type(error).__name__}: {error}): "
                                   f"it is truncated, corrupt, or another format") from None
    bad = {name: str(a.dtype) for name, a in tensors.items() if a.dtype.kind != "f"}
    if bad:
        name = next(iter(bad))
        raise SafetensorsFileError(f"{path!r}: tensor {name!r} is {bad[name]}, not floating point: these are not "
                                   f"the weights of a float model")
    return metadata, tensors


def _state(model) -> dict:
    """{dotted name: array}: the parameters and the buffers (names never collide: a layer's
    parameters are weight and bias, its buffers running_mean and running_var)."""
    return {**model.parameters(), **model.buffers()}


def load_safetensors(path, model=None):
    """The model of ``path`` with its weights (built from the file's kind and config when
    ``model`` is None). Every name and shape is checked first; a mismatch lists them all and
    changes nothing."""
    metadata, tensors = read_safetensors(path)
    if model is None:
        if CONFIG_KEY not in metadata:
            raise SafetensorsFileError(f"{str(path)!r} has no {CONFIG_KEY!r} metadata (not written by tinyunet): build "
                                       f"the model yourself and pass it, load_safetensors(path, UNet(...))")
        try:
            config = config_from_dict(metadata.get(KIND_KEY, "unet"), json.loads(metadata[CONFIG_KEY]))
        except (TypeError, ValueError) as error:
            raise SafetensorsFileError(f"{str(path)!r}: the saved config cannot be read ({error}); build the model "
                                       f"yourself and pass it, load_safetensors(path, model)") from None
        model = model_from_config(config)
    own = _state(model)
    problems = [f"  {name}: expected {tuple(a.shape)}, found nothing" for name, a in own.items() if name not in tensors]
    problems += [f"  {name}: expected nothing, found {tuple(a.shape)}"
                 for name, a in tensors.items() if name not in own]
    problems += [f"  {name}: expected {tuple(own[name].shape)}, found {tuple(a.shape)}"
                 for name, a in tensors.items() if name in own and tuple(a.shape) != tuple(own[name].shape)]
    if problems:
        raise SafetensorsFileError(f"{str(path)!r} does not fit this model ({len(problems)} mismatches, expected = "
                                   f"the model, found = the file):\n" + "\n".join(problems))
    model.load_parameters({name: a.astype(own[name].dtype, copy=False) for name, a in tensors.items()})
    return model
