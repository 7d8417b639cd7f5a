"""Training a U-Net to segment membranes: the loop, evaluation, collapse checks, and the run folder.

One step, for a batch of random crops x: (B, 1, s, s) with membrane targets t (1 = membrane):

    adam.lr = learning_rate(options, progress)        constant, or a cosine decay
    logits = model.forward(x)                         (B, 1, s, s)
    loss, dlogits = bce_with_logits(logits, t, w)     w: the paper's border weights, optional
    model.backward(dlogits)                           fills every layer's grads
    adam.step(model.gradients())                      Keras Adam, in place

Every ``eval_every`` steps the validation images are predicted whole (overlap-tile, as any size
would be) and scored (tinyunet.metrics); the scores go to metrics.json. The loop watches for
the two ways this model is known to stop learning and says so instead of training on:
every pixel predicted one class for several evaluations, or a channel of the Keras head's
2-channel ReLU (right before the sigmoid) dead, so the logit can only move one way.

A run folder holds: checkpoint.npz (every ``checkpoint_every`` steps, on Ctrl-C and at the
end; ``resume=True`` continues from it bit-identically), metrics.json, curves.png, the
validation predictions (probability, mask, overlay) and montage.png (image, truth,
prediction, overlay side by side). Proof: tests/test_train.py (a tiny run end to end,
resume, collapse detection).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tinyunet import checkpoint as checkpoints
from tinyunet.augment import Augmenter
from tinyunet.backend import check_device_name, release_gpu_memory, require_gpu, to_device, to_numpy
from tinyunet.files import atomic_write
from tinyunet.data import Dataset, border_weight_map, random_crops, resolve_data
from tinyunet.infer import predict_probability, save_prediction
from tinyunet.losses import bce_with_logits
from tinyunet.metrics import evaluate, report_table
from tinyunet.optim import Adam
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
    synthetic_count: int = 24        # synthetic slices (the last 4 validate)
    synthetic_size: int = 256
    resume: bool = False
    progress: bool = True


# ----------------------------------------------------------------------------------- the data

def parse_indices(text: str, count: int) -> list[int]:
    """'last4' -> the last 4 items; '20-23' -> [20, 21, 22, 23]; '1,5,9' -> [1, 5, 9]."""
    text = text.strip()
    if text.startswith("last"):
        k = int(text[4:] or 1)
        return list(range(max(count - k, 0), count))
    indices: list[int] = []
    for part in text.split(","):
        if "-" in part:
            first, last = part.split("-")
            indices.extend(range(int(first), int(last) + 1))
        elif part:
            indices.append(int(part))
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise ValueError(f"validation indices {bad} are outside the {count} items (0..{count - 1})")
    return indices


def split_data(dataset: Dataset, val: str) -> tuple[Dataset, Dataset]:
    """(training items, held-out validation items); the default holds out the last 4 (or 1)."""
    if len(dataset) < 2:
        raise ValueError(f"need at least 2 labelled images to hold one out for validation, got {len(dataset)}")
    held_out = parse_indices(val or f"last{min(4, max(1, len(dataset) // 5))}", len(dataset))
    kept = [i for i in range(len(dataset)) if i not in set(held_out)]
    if not kept or not held_out:
        raise ValueError(f"the validation split {val!r} leaves no training or no validation images")
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
    relu = model.head_relu
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

    def check(self, membrane_share: float, dead_channels) -> list[str]:
        """Messages for the evaluation just made: membrane_share is the share of validation
        pixels predicted membrane; dead_channels as head_relu_dead_channels returns them."""
        messages = []
        one_class = membrane_share < self.ONE_CLASS or membrane_share > 1 - self.ONE_CLASS
        self.one_class_streak = self.one_class_streak + 1 if one_class else 0
        if self.one_class_streak >= self.patience and "one-class" not in self.warned:
            self.warned.add("one-class")
            which = "membrane" if membrane_share > 0.5 else "cell"
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


# --------------------------------------------------------------------------- the training run

class Trainer:
    """Holds the model, optimizer, data and run folder of one training run."""

    def __init__(self, options: TrainOptions, dataset: Dataset | None = None, log=print):
        self.options = o = options
        self.log = log
        check_device_name(o.device)
        if o.device == "gpu":
            require_gpu()
        learning_rate(o, 0.0)                                   # an unknown --lr-schedule fails here
        if o.crop % 2 ** o.depth:
            raise ValueError(f"--crop {o.crop} must be divisible by 2**depth = {2 ** o.depth} (e.g. "
                             f"{max(2 ** o.depth, o.crop - o.crop % 2 ** o.depth)})")
        if dataset is None:
            dataset = resolve_data(o.data, count=o.synthetic_count, size=o.synthetic_size, seed=o.seed)
            if o.data == "isbi2012" and len(dataset) > ISBI_TRAINING_SLICES:
                # Slices 24-29 of the download stay unseen: this project keeps them for an
                # independent evaluation of models tuned on 0-23 (see shared data's README).
                dataset = dataset.split(range(ISBI_TRAINING_SLICES))
                self.log(f"isbi2012: training and validating on slices 0-{ISBI_TRAINING_SLICES - 1} only")
        self.train_set, self.val_set = split_data(dataset, o.val)
        self.run_dir = Path(o.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.run_dir / "checkpoint.npz"

        self.model = UNet(UNetConfig(base_width=o.base_width, depth=o.depth, head_relu=o.head_relu,
                                     seed=o.seed)).to(o.device)
        self.optimizer = Adam(self.model.parameters(), lr=o.lr)   # after .to(): it holds the arrays
        self.batch_rng = np.random.default_rng([o.seed, 1])
        self.augment = Augmenter(o.augment) if o.augment != "none" else None
        self.step = 0
        self.history: list[dict] = []
        self.watch = CollapseWatch(o.collapse_patience)
        self.train_seconds = 0.0
        if o.resume:
            self._resume()
        self._first_step = self.step

    # -- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        checkpoints.save_checkpoint(
            self.checkpoint_path, self.model, self.optimizer, step=self.step,
            rngs={"batches": self.batch_rng},          # the model's dropout generators go in too
            extra={"history": self.history, "options": asdict(self.options),
                   "train_seconds": self.train_seconds})

    def _resume(self) -> None:
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path}; start without "
                                    f"--resume, or point --out at the run folder to continue")
        loaded = checkpoints.load_checkpoint(self.checkpoint_path, self.model, self.optimizer,
                                             rngs={"batches": self.batch_rng})
        self.step = loaded.step
        self.history = loaded.extra.get("history", [])
        self.train_seconds = loaded.extra.get("train_seconds", 0.0)
        self.log(f"resumed from {self.checkpoint_path} at step {self.step}")

    # -- one step -----------------------------------------------------------------------------
    def train_step(self):
        """One step; returns the loss as bce_with_logits does (on the GPU a device scalar,
        read by fit() only when it logs)."""
        o = self.options
        images, targets = random_crops(self.train_set, o.crop, o.batch, self.batch_rng, self.augment)
        weights = None
        if o.border_weights:
            weights = np.stack([border_weight_map(t[0])[None] for t in targets])
            weights = to_device(weights, o.device)
        x, t = to_device(images, o.device), to_device(targets, o.device)
        logits = self.model.forward(x)
        # the first step reads the loss inputs back (bad labels named at once); later steps on
        # the GPU check them on the device, folded into the loss (tinyunet/losses.py)
        loss, dlogits = bce_with_logits(logits, t, weights, check=True if self.step == self._first_step else None)
        self.model.backward(dlogits)
        self.optimizer.lr = learning_rate(o, self.progress())
        self.optimizer.step(self.model.gradients())
        self.step += 1
        return loss

    def progress(self) -> float:
        """The share of the run done: steps or training time, whichever limit comes first."""
        o = self.options
        return max(self.step / max(o.steps, 1), self.train_seconds / max(o.minutes * 60.0, 1e-9))

    # -- evaluation ---------------------------------------------------------------------------
    def predict(self, image) -> np.ndarray:
        return predict_probability(self.model, image, tta=self.options.tta)

    def evaluate(self) -> dict:
        probabilities = [self.predict(image) for image in self.val_set.images]
        release_gpu_memory()      # the whole-image blocks would stay in CuPy's pool and raise the next peak
        scores = evaluate(np.stack(probabilities), np.stack(self.val_set.targets))
        scores["membrane_share_predicted"] = float(np.mean([(p >= self.options.threshold).mean()
                                                            for p in probabilities]))
        return scores

    def _record(self, loss_window: list[float]) -> dict:
        scores = self.evaluate()
        dead = head_relu_dead_channels(self.model)
        # the eval forward ran on validation images: its head ReLU statistics are the ones above
        record = {"step": self.step, "train_loss": float(np.mean(loss_window)) if loss_window else None,
                  "seconds": round(self.train_seconds, 1), **scores,
                  "head_relu_dead": [share for _, share in dead]}
        self.history.append(record)
        write_json_atomic(self.run_dir / "metrics.json", self.history)
        for message in self.watch.check(scores["membrane_share_predicted"], dead):
            self.log(message)
        return record

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        o = self.options
        budget = o.minutes * 60.0
        losses: list[float] = []
        unread: list = []                       # losses not yet read back (device scalars on the GPU)
        read_every = 10 if o.device == "gpu" else 1
        interrupted = False
        bar = tqdm(total=o.steps, initial=self.step, desc="training", unit="step", disable=not o.progress,
                   dynamic_ncols=True)
        try:
            while self.step < o.steps and self.train_seconds < budget:
                started = time.perf_counter()
                unread.append(self.train_step())
                self.train_seconds += time.perf_counter() - started
                # Reading a GPU loss waits for the GPU: read every 10 steps there, every step on the CPU
                if (len(unread) >= read_every or self.step % o.eval_every == 0 or self.step >= o.steps
                        or self.train_seconds >= budget):
                    for back, value in enumerate(float(loss) for loss in unread):
                        if not math.isfinite(value):
                            at = self.step - len(unread) + 1 + back
                            raise FloatingPointError(f"the loss became {value} at step {at}: lower --lr")
                        losses.append(value)
                    unread = []
                    postfix = {"loss": f"{np.mean(losses[-20:]):.4f}"}
                    if self.history:
                        postfix.update(iou=f"{self.history[-1]['iou_membrane']:.3f}",
                                       dice=f"{self.history[-1]['dice']:.3f}")
                    bar.set_postfix(postfix)
                bar.update(1)
                if self.step % o.eval_every == 0:
                    self._record(losses[-o.eval_every:])
                if self.step % o.checkpoint_every == 0:
                    self.save()
        except KeyboardInterrupt:
            interrupted = True
            self.log(f"\ninterrupted at step {self.step}: saving a checkpoint (continue with --resume)")
        finally:
            bar.close()
        losses += [float(loss) for loss in unread]   # read after a Ctrl-C
        if not self.history or self.history[-1]["step"] != self.step:
            self._record(losses[-o.eval_every:])
        self.save()
        result = self.finish()
        result["interrupted"] = interrupted
        return result

    # -- what the run leaves behind -----------------------------------------------------------
    def finish(self) -> dict:
        o = self.options
        prediction_dir = self.run_dir / "predictions"
        probabilities = []
        for image, name in zip(self.val_set.images, self.val_set.names):
            probability = self.predict(image)
            probabilities.append(probability)
            save_prediction(image, probability, prediction_dir, name, o.threshold)
        images, targets = np.stack(self.val_set.images), np.stack(self.val_set.targets)
        scores = evaluate(np.stack(probabilities), targets, image=images)   # with Otsu and majority
        table = report_table([("tinyunet", scores), ("Otsu threshold", scores["otsu"]),
                              ("majority class", scores["majority"])])
        self.log(table)
        write_json_atomic(self.run_dir / "final.json", {
            "step": self.step, "train_seconds": round(self.train_seconds, 1), "options": asdict(o),
            "scores": scores})
        atomic_write(self.run_dir / "report.txt", lambda stream: stream.write((table + "\n").encode()))
        from tinyunet.plots import save_curves, save_montage   # matplotlib only when a run ends
        save_curves(self.history, self.run_dir / "curves.png")
        save_montage(images, targets, np.stack(probabilities), self.val_set.names,
                     self.run_dir / "montage.png", o.threshold)
        self.log(f"run folder: {self.run_dir} (checkpoint.npz, metrics.json, curves.png, montage.png, "
                 f"predictions/)")
        return {"step": self.step, "scores": scores, "table": table}


def train(options: TrainOptions, dataset: Dataset | None = None, log=print) -> dict:
    """Run training with ``options``; returns the final scores (see Trainer.finish)."""
    return Trainer(options, dataset, log).fit()
