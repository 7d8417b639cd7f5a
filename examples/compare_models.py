"""Train every network of the lecture on the same data for the same budget and put them in one table.

    python examples/compare_models.py                           # 3-class synthetic EM, 10 CPU minutes each
    python examples/compare_models.py --data ../shared/data/isbi2012/train --val 20-23 --classes 2 \
        --unet-classes 1 --out runs/compare_isbi                 # ISBI 2012: membrane and cell
    python examples/compare_models.py --report-only --out runs/compare   # the table again, from final.json

Each model is one run of examples/train_membranes.py, as a user would start it, in its own
process, with ``--clock cpu --threads 1``: every run gets the same CPU time (``--minutes``
counts this process's CPU seconds), so runs side by side (``--jobs``) or beside other work on a
shared machine still get the same budget. The table gives each model's parameters and steps
reached, the FCN paper's four metrics (pixel accuracy, mean class accuracy, mean IoU,
frequency-weighted IoU) and per-class IoU on the held-out images, then the two baselines every
run computes on the same images: k-means on intensity (clusters matched to classes) and the
majority class. A U-Net run with one class (``--unet-classes 1``: today's sigmoid model) is
scored as two classes, cell and membrane, from its thresholded prediction.

The table is printed and written to OUT/comparison.md (atomically); each run keeps its own
folder OUT/<model> (report.txt, montage.png, confusion.png, checkpoint.npz). Existing run folders
are refused unless --overwrite (or reused with --report-only).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
MODELS = ("unet", "fcn32s", "fcn16s", "fcn8s", "segnet")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--models", nargs="+", default=list(MODELS), choices=MODELS)
    add("--data", default="synthetic")
    add("--val", default="")
    add("--classes", type=int, default=3, help="classes of every model but a --unet-classes 1 U-Net")
    add("--unet-classes", type=int, default=None, help="the U-Net's own class count (1: sigmoid, as the "
        "Keras model); default: --classes")
    add("--minutes", type=float, default=10.0, help="CPU minutes of training per model")
    add("--base-width", type=int, default=16, help="channels of every model's first level")
    add("--crop", type=int, default=128)
    add("--batch", type=int, default=4)
    add("--lr", type=float, default=1e-3)
    add("--eval-every", type=int, default=200)
    add("--learn-upsampling", action="store_true", help="FCN runs let their upsamplers learn (the reference "
        "freezes them)")
    add("--jobs", type=int, default=2, help="runs at the same time (each on one thread)")
    add("--out", default="runs/compare")
    add("--overwrite", action="store_true", help="replace earlier runs in --out")
    add("--report-only", action="store_true", help="only rebuild the table from OUT/<model>/final.json")
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


def command(args, model: str) -> list[str]:
    classes = args.unet_classes if model == "unet" and args.unet_classes is not None else args.classes
    line = [sys.executable, str(HERE / "train_membranes.py"), "--model", model, "--classes", str(classes),
            "--data", args.data, "--minutes", str(args.minutes), "--clock", "cpu", "--threads", "1",
            "--steps", "1000000", "--base-width", str(args.base_width), "--crop", str(args.crop),
            "--batch", str(args.batch), "--lr", str(args.lr), "--lr-schedule", "cosine",
            "--eval-every", str(args.eval_every), "--checkpoint-every", "1000000", "--seed", str(args.seed),
            "--out", str(Path(args.out) / model), "--no-progress"]
    if args.val:
        line += ["--val", args.val]
    if args.learn_upsampling and model.startswith("fcn"):
        line.append("--learn-upsampling")
    if args.overwrite:
        line.append("--overwrite")
    return line


def run(args, model: str) -> tuple[str, int, float]:
    """One training run; its log goes to OUT/<model>.log. Returns (model, exit status, wall seconds)."""
    log = Path(args.out) / f"{model}.log"
    started = time.time()
    with open(log, "w") as stream:
        status = subprocess.call(command(args, model), stdout=stream, stderr=subprocess.STDOUT)
    return model, status, time.time() - started


def row_of(scores: dict, names: list[str]) -> list[str]:
    def cell(key):
        value = scores.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    return [cell(k) for k in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou")] + \
           [cell(f"iou_{name}") for name in names]


def table(args) -> str:
    """The markdown table of every finished run in --out, and the baselines of the first."""
    rows, baselines, names = [], None, None
    for model in args.models:
        path = Path(args.out) / model / "final.json"
        if not path.is_file():
            rows.append((model, None))
            continue
        final = json.loads(path.read_text())
        scores = final["scores"]
        class_scores = scores.get("classes", scores)       # a one-class U-Net: its two-class scores
        if names is None:
            names = final["class_names"]
            baselines = scores.get("baselines", {})
        rows.append((model, final, class_scores))
    names = names or []
    head = ["model", "classes", "parameters", "steps", "CPU s", "pixel acc.", "mean acc.", "mean IoU", "fw IoU"] + \
           [f"IoU {name}" for name in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for model, *found in rows:
        if found[0] is None:
            lines.append(f"| {model} | (no final.json: see {Path(args.out) / (model + '.log')}) |")
            continue
        final, class_scores = found
        o = final["options"]
        label = model + (" (learned upsampling)" if o.get("learn_upsampling") else "")
        lines.append("| " + " | ".join([label, str(o["classes"]), f"{final['parameters']:,}", str(final["step"]),
                                         f"{final['train_seconds']:.0f}"] + row_of(class_scores, names)) + " |")
    for method, scores in (baselines or {}).items():
        lines.append("| " + " | ".join([method, "", "", "", ""] + row_of(scores, names)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.jobs < 1 or args.minutes <= 0:
        print("error: --jobs must be at least 1 and --minutes more than 0", file=sys.stderr)
        return 2
    if not args.report_only:
        held = [m for m in args.models if (out / m / "checkpoint.npz").exists()]
        if held and not args.overwrite:
            print(f"error: {out} already holds runs of {', '.join(held)}: rebuild the table with --report-only, "
                  f"replace them with --overwrite, or choose another --out", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        print(f"training {', '.join(args.models)} for {args.minutes:g} CPU minutes each, {args.jobs} at a time; "
              f"logs in {out}/<model>.log", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for model, status, seconds in pool.map(lambda m: run(args, m), args.models):
                print(f"  {model}: exit {status} after {seconds / 60:.1f} wall minutes", flush=True)
    text = table(args)
    print(text)
    from tinyunet.files import atomic_write
    atomic_write(out / "comparison.md", lambda stream: stream.write((text + "\n").encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
