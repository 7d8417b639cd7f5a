"""Predict membranes with a trained checkpoint, on images of any size.

    python examples/predict_membranes.py runs/membranes/checkpoint.npz ../shared/data/isbi2012/test
    python examples/predict_membranes.py CHECKPOINT stack.tif --out predictions --tta
    python examples/predict_membranes.py CHECKPOINT a.png b.png --threshold 0.6

For every image it writes NAME_prob.png (16-bit membrane probability), NAME_mask.png
(0 = membrane, 255 = cell, as the ISBI labels) and NAME_overlay.png. Overlap-tile with
mirror padding, as in the U-Net paper, so no image is resized (tinyunet/infer.py).
"""
import argparse
import sys
from pathlib import Path


def read_inputs(paths):
    """[(name, (H, W) image in [0, 1])] from a folder, a TIFF stack, or single image files."""
    from tinyunet.data import load_tiff_stack, read_image, resolve_data
    items = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            dataset = resolve_data(str(path), labelled=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            dataset = load_tiff_stack(path)
        elif path.is_file():
            items.append((path.stem, read_image(path)))
            continue
        else:
            raise FileNotFoundError(f"{path} does not exist: give a folder, a TIFF stack or image files")
        items.extend(zip(dataset.names, dataset.images))
    return items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint.npz written by train_membranes.py")
    parser.add_argument("inputs", nargs="+", help="folders, TIFF stacks or image files")
    parser.add_argument("--out", default="predictions", help="output folder")
    parser.add_argument("--threshold", type=float, default=0.5, help="membrane probability threshold")
    parser.add_argument("--tta", action="store_true", help="average the 8 flips/rotations")
    parser.add_argument("--tile", type=int, default=None, help="tile side (default: whole image if it fits)")
    parser.add_argument("--margin", type=int, default=32, help="context kept around each tile")
    parser.add_argument("--memory-gb", type=float, default=0.9, help="memory for the model, activations and "
                        "workspace of one batch of tiles; picks the tile and the batch (tinyunet.infer.auto_tile)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from tinyunet.backend import DeviceError
    from tinyunet.checkpoint import load_checkpoint
    from tinyunet.infer import predict_probability, save_prediction
    try:
        model = load_checkpoint(args.checkpoint).model.to(args.device).eval()
        items = read_inputs(args.inputs)
        for name, image in tqdm(items, desc="predicting", unit="image"):
            probability = predict_probability(model, image, tile=args.tile, margin=args.margin, tta=args.tta,
                                              memory_budget=int(args.memory_gb * 1e9))
            save_prediction(image, probability, args.out, name, args.threshold)
    except (ValueError, OSError, DeviceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {3 * len(items)} files for {len(items)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
