"""Predict membranes with a trained checkpoint, on images of any size.

    python examples/predict_membranes.py runs/membranes/checkpoint.npz ../shared/data/isbi2012/test
    python examples/predict_membranes.py CHECKPOINT stack.tif --out predictions --tta
    python examples/predict_membranes.py CHECKPOINT a.png b.png --threshold 0.6

For every image it writes NAME_prob.png (16-bit membrane probability), NAME_mask.png
(0 = membrane, 255 = cell, as the ISBI labels) and NAME_overlay.png. A model of K >= 2 classes
(any of tinyunet/models.py: U-Net, FCN, SegNet) writes NAME_labels.png instead (a palette PNG:
pixel value = class, in the class colours its training data had) and NAME_overlay.png.
Overlap-tile with mirror padding, as in the U-Net paper, so no image is resized (tinyunet/infer.py).
"""
import argparse
import sys
from pathlib import Path

import numpy as np


def read_inputs(paths):
    """[(name, (H, W) image in [0, 1], source)] from folders, TIFF stacks or single image files."""
    from tinyunet.data import load_tiff_stack, read_image, resolve_data
    items = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            dataset = resolve_data(str(path), labelled=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            dataset = load_tiff_stack(path)
        elif path.is_file():
            items.append((path.stem, read_image(path), str(path)))
            continue
        else:
            raise FileNotFoundError(f"{path} does not exist: give a folder, a TIFF stack or image files")
        items.extend((name, image, f"{path} ({name})") for name, image in zip(dataset.names, dataset.images))
    return items


def unique_items(items, out) -> list:
    """The items without repeats: the same image given twice (a file and its folder) is predicted
    once; two different images that would write the same NAME_*.png files are refused."""
    first, kept = {}, []
    for name, image, source in items:
        if name in first:
            earlier_image, earlier_source = first[name]
            if earlier_image.shape == image.shape and np.array_equal(earlier_image, image):
                continue
            raise ValueError(f"two inputs would write the same files {Path(out) / name}_*.png: {earlier_source} "
                             f"and {source}; predict them into separate --out folders, or rename one")
        first[name] = (image, source)
        kept.append((name, image, source))
    return kept


def bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a number of ``kind`` within [low, high] (or the open ends), else a one-line error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if kind is int else 'number'}")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above or value != value:
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"{text} is outside {left}{low if low is not None else '-inf'}, "
                                             f"{high if high is not None else 'inf'}{right}")
        return value
    return parse


def class_colours(checkpoint, classes: int):
    """The palette a K-class run saved in its checkpoint, or tinyunet's default colours."""
    from tinyunet.checkpoint import read_checkpoint_meta
    from tinyunet.classes import default_palette
    try:
        palette = read_checkpoint_meta(checkpoint).get("extra", {}).get("palette")
    except (ValueError, OSError):                   # a Keras or safetensors file: no palette in it
        palette = None
    palette = np.asarray(palette, dtype=np.uint8) if palette is not None else None
    return palette if palette is not None and palette.shape == (classes, 3) else default_palette(classes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint.npz written by train_membranes.py, or a Keras "
                        "unet_membrane.hdf5 (.h5, .keras) or .safetensors file")
    parser.add_argument("inputs", nargs="+", help="folders, TIFF stacks or image files")
    parser.add_argument("--out", default="predictions", help="output folder")
    parser.add_argument("--threshold", type=bounded(float, 0, 1, low_open=True, high_open=True), default=0.5,
                        help="membrane probability threshold, strictly between 0 and 1")
    parser.add_argument("--tta", action="store_true", help="average the 8 flips/rotations")
    parser.add_argument("--tile", type=bounded(int, 16), default=None,
                        help="tile side (default: whole image if it fits)")
    parser.add_argument("--margin", type=bounded(int, 0), default=32, help="context kept around each tile")
    parser.add_argument("--memory-gb", type=bounded(float, 0, low_open=True), default=0.9,
                        help="memory for the model, activations and workspace of one batch of tiles; picks the "
                        "tile and the batch (tinyunet.infer.auto_tile)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from tinyunet.backend import DeviceError, require_gpu
    from tinyunet.formats import load_model
    from tinyunet.infer import labels_from_probability, predict_probability, save_class_prediction, save_prediction
    try:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a file, not a folder; choose another --out")
        if args.device == "gpu":
            require_gpu()
        model = load_model(args.checkpoint).to(args.device).eval()     # .npz, Keras HDF5 or safetensors
        items = read_inputs(args.inputs)
        items = unique_items(items, args.out)
        classes = model.config.classes
        palette = class_colours(args.checkpoint, classes) if classes > 1 else None
        for name, image, _ in tqdm(items, desc="predicting", unit="image"):
            probability = predict_probability(model, image, tile=args.tile, margin=args.margin, tta=args.tta,
                                              memory_budget=int(args.memory_gb * 1e9))
            if classes == 1:
                save_prediction(image, probability, args.out, name, args.threshold)
            else:
                save_class_prediction(image, labels_from_probability(probability), palette, args.out, name)
    except (ValueError, OSError, DeviceError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped by Ctrl-C: the predictions written so far are whole (each file is written atomically)",
              file=sys.stderr)
        return 130
    print(f"wrote {(3 if model.config.classes == 1 else 2) * len(items)} files for {len(items)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
