"""Predict membranes (or K classes) in a volume larger than memory, block by block (Dask + Zarr).

    python examples/predict_volume.py runs/membranes/checkpoint.npz stack.zarr membranes.zarr
    python examples/predict_volume.py CHECKPOINT stack.tif membranes.zarr --mask masks.zarr
    python examples/predict_volume.py CHECKPOINT slices/ membranes.zarr --address tcp://scheduler:8786
    python examples/predict_volume.py runs/cells/checkpoint.npz stack.zarr labels.zarr   # a 3-class U-Net

INPUT is a Zarr array (Z, Y, X), or a TIFF stack or a folder of images, converted page by page
into a Zarr array first (--converted, default INPUT's name + .zarr beside OUTPUT). OUTPUT is a
Zarr array chunked (1, chunk, chunk): for a one-class U-Net float32 membrane probabilities
(--mask adds a uint8 mask: 1 membrane, 0 cell); for a U-Net of K classes, an FCN or a SegNet
uint8 class labels.
Run it again after an interruption: the blocks already written are skipped. Needs the extra:
pip install -e ".[scale]". The library side is tinyunet/volume.py.
"""
import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint.npz written by train_membranes.py")
    parser.add_argument("input", help="a Zarr array (Z, Y, X), a TIFF stack or a folder of images")
    parser.add_argument("output", help="the Zarr array of probabilities (one class) or labels (K classes) "
                        "to write or to complete")
    parser.add_argument("--mask", default=None, help="one class: also write a uint8 mask array here")
    parser.add_argument("--threshold", type=float, default=None, help="one class: the membrane probability "
                        "threshold for --mask (default 0.5)")
    parser.add_argument("--chunk", type=int, default=512, help="block side in pixels, a multiple of the "
                        "pooling grid (16 for the exact U-Net, 32 for SegNet and FCN) and >= halo")
    parser.add_argument("--halo", type=int, default=None, help="context per block side (default: the "
                        "receptive field rounded up to the grid, exact: 128 for the exact U-Net, 224 for SegNet)")
    parser.add_argument("--address", default=None, help="a dask.distributed scheduler; default: this machine")
    parser.add_argument("--workers", type=int, default=1, help="local blocks in flight (each runs the "
                        "model on every core already)")
    parser.add_argument("--converted", default=None, help="where a TIFF stack or folder is converted to Zarr")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from tinyunet.backend import DeviceError
    from tinyunet.volume import predict_volume
    converted = args.converted
    if converted is None and not any((Path(args.input) / name).exists() for name in ("zarr.json", ".zarray")):
        converted = str(Path(args.output).parent / (Path(args.input).stem + ".zarr"))
    try:
        result = predict_volume(args.checkpoint, args.input, args.output, chunk=args.chunk, halo=args.halo,
                                mask_output=args.mask, threshold=args.threshold, address=args.address,
                                workers=args.workers, device=args.device, converted=converted,
                                progress=not args.no_progress)
    except (ValueError, OSError, DeviceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    what = "probabilities" if result["classes"] == 1 else f"labels of {result['classes']} classes"
    print(f"{args.output}: {what}: {result['predicted']} blocks predicted, {result['skipped']} already there "
          f"(halo {result['halo']} pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
