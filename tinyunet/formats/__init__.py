"""Weights in and out: Keras HDF5 (keras_hdf5.py), ONNX (onnx_export.py), safetensors
(safetensors_io.py), and ``load_model(path)``, which reads any of them by content.

Each module imports its library (h5py, onnx, safetensors) lazily, when a function needs it;
without it the error is one line naming the extra to install. Importing this package imports
none of them.

    model = load_model("unet_membrane.hdf5")      # or checkpoint.npz, model.safetensors, x.keras
"""
from __future__ import annotations

from pathlib import Path

from tinyunet.formats.common import FormatError, MissingExtraError

__all__ = ["FormatError", "MissingExtraError", "load_model", "detect_format"]


def detect_format(path) -> str:
    """'checkpoint' (a tinyunet .npz), 'keras' (HDF5 or a .keras zip) or 'safetensors', by the
    file's first bytes, not its name; FormatError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint or model file at {str(path)!r}")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "keras"
    if head[:4] == b"PK\x03\x04":                      # a zip: a .npz checkpoint or a .keras model
        import zipfile
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            raise FormatError(f"{str(path)!r} starts like a zip (.npz or .keras) but is truncated or corrupt") from None
        if "model.weights.h5" in names:
            return "keras"
        return "checkpoint"
    if len(head) >= 9 and head[8:9] == b"{":           # safetensors: u64 header length, then JSON
        size = int.from_bytes(head[:8], "little")
        if 2 <= size <= path.stat().st_size - 8:
            return "safetensors"
    from tinyunet.checkpoint import _describe_start
    raise FormatError(f"{str(path)!r} is not a tinyunet checkpoint ({_describe_start(head)}) nor a model file "
                      f"tinyunet reads (a Keras HDF5/.keras file or safetensors); give the checkpoint.npz that "
                      f"train_membranes.py writes into its run folder")


def load_model(path, model=None):
    """The model with the weights in ``path``, whatever it is: a tinyunet checkpoint (.npz) or
    safetensors file (any model: U-Net, FCN, SegNet), or a Keras HDF5 model or weights file
    (.hdf5, .h5, .weights.h5, .keras: a U-Net). The model is built from the file (its saved kind
    and config, or the Keras shapes) unless ``model`` is given."""
    kind = detect_format(path)
    if kind == "checkpoint":
        from tinyunet.checkpoint import load_checkpoint
        return load_checkpoint(path, model).model
    if kind == "keras":
        from tinyunet.formats.keras_hdf5 import load_keras
        return load_keras(path, model)
    from tinyunet.formats.safetensors_io import load_safetensors
    return load_safetensors(path, model)
