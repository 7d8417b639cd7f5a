"""Export a trained model to another format: ONNX, Keras HDF5 or safetensors, by the output's name.

    python examples/export_model.py runs/membranes/checkpoint.npz model.onnx
    python examples/export_model.py runs/membranes/checkpoint.npz for_keras.h5      # Keras: model.load_weights
    python examples/export_model.py unet_membrane.hdf5 unet.safetensors             # any input load_model reads

The input is anything ``tinyunet.formats.load_model`` reads (a tinyunet checkpoint, a Keras
HDF5 or .keras file, safetensors). The output's suffix picks the format: .onnx, .h5/.hdf5
(Keras 2's weights layout; '.weights.h5' Keras 3's), .safetensors. Writes are atomic.
"""
import argparse
import sys
from pathlib import Path

WRITERS = {".onnx": "ONNX", ".h5": "Keras HDF5", ".hdf5": "Keras HDF5", ".safetensors": "safetensors"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint",
                        help="a tinyunet checkpoint (.npz), a Keras .hdf5/.h5/.keras file or .safetensors")
    parser.add_argument("output", help="model.onnx, weights.h5 (Keras) or model.safetensors")
    args = parser.parse_args(argv)
    suffix = Path(args.output).suffix.lower()
    if suffix not in WRITERS:
        print(f"error: cannot tell the format of {args.output!r} from its suffix: use one of "
              f"{', '.join(WRITERS)}", file=sys.stderr)
        return 2

    import tinyunet  # noqa: F401  (before NumPy: see tinyunet/__init__.py)
    from tinyunet.formats import FormatError, MissingExtraError, load_model
    try:
        model = load_model(args.checkpoint).eval()
        if suffix == ".onnx":
            from tinyunet.formats.onnx_export import export_onnx
            export_onnx(model, args.output)
        elif suffix in (".h5", ".hdf5"):
            from tinyunet.formats.keras_hdf5 import save_keras
            save_keras(args.output, model)
        else:
            from tinyunet.formats.safetensors_io import save_safetensors
            save_safetensors(args.output, model)
    except (FormatError, MissingExtraError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({WRITERS[suffix]}, {model.num_parameters():,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
