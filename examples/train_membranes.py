"""Train the U-Net (or FCN, SegNet) to segment cell membranes (or K classes), evaluate it, and
keep what a person wants to see.

    python examples/train_membranes.py                          # synthetic EM slices, no download
    python examples/train_membranes.py --data ../shared/data/isbi2012/train --val 20-23 --minutes 10
    python examples/train_membranes.py --data isbi2012           # download + verify the ISBI 2012 slices
    python examples/train_membranes.py --out runs/membranes --resume
    python examples/train_membranes.py --classes 3 --out runs/cells    # cytoplasm, membrane, mitochondria
    python examples/train_membranes.py --model segnet --classes 3 --base-width 16 --out runs/segnet
    mpiexec -n 2 python examples/train_membranes.py --batch 1     # 2 processes, data-parallel (".[mpi]")

Everything lands in the run folder (--out): checkpoint.npz, metrics.json, curves.png,
montage.png, predictions/ and report.txt. A folder that holds a run is kept: continue it with
--resume (its own options are restored), or replace it with --overwrite. Ctrl-C stops at the
end of the step in progress and saves; --resume then continues bit-identically.
The library side is tinyunet/train.py.
"""
import argparse
import os
import sys


def set_threads(argv) -> None:
    """--threads must reach the environment before NumPy and Numba load their thread pools.
    Under mpiexec the default is this host's cores divided among its ranks."""
    from tinyunet.distributed import launched_size, threads_per_rank   # imports neither NumPy nor MPI
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--threads", type=int, default=None)
    threads = early.parse_known_args(argv)[0].threads
    if threads is not None and threads < 1:
        print(f"error: --threads {threads}: give at least 1 (or leave it out to use every core)", file=sys.stderr)
        raise SystemExit(2)
    if threads is None and launched_size() > 1:      # under mpiexec: this host's cores shared by its ranks
        threads = threads_per_rank()
    if threads:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[name] = str(threads)


def build_parser(d):
    """The command line, with every default taken from TrainOptions ``d``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data", default=d.data, help="'synthetic', 'isbi2012' (download), a folder with image/ and "
        "label/, or 'images.tif,labels.tif'")
    add("--val", default=d.val, help="validation items, e.g. 20-23 or 1,5,9 (empty: the last 4)")
    add("--out", default=d.out, help="run folder")
    add("--steps", type=int, default=d.steps, help="stop after this many steps ...")
    add("--minutes", type=float, default=d.minutes, help="... or this many minutes of training")
    add("--crop", type=int, default=d.crop, help="side of the random training crops (divisible by 16)")
    add("--batch", type=int, default=d.batch)
    add("--lr", type=float, default=d.lr, help="Adam learning rate (the Keras model's is 1e-4)")
    add("--lr-schedule", default=d.lr_schedule, choices=["constant", "cosine"],
        help="constant (Keras), or a cosine decay to 5%% of --lr over --steps/--minutes")
    add("--augment", default=d.augment, choices=["none", "flips", "keras", "elastic"])
    add("--border-weights", action="store_true", help="the U-Net paper's border-weighted loss")
    add("--eval-every", type=int, default=d.eval_every)
    add("--checkpoint-every", type=int, default=d.checkpoint_every)
    add("--threshold", type=float, default=d.threshold, help="membrane probability threshold for masks")
    add("--tta", action="store_true", help="average the 8 flips/rotations when predicting")
    add("--seed", type=int, default=d.seed)
    add("--device", default=d.device, choices=["cpu", "gpu"])
    add("--threads", type=int, default=None, help="CPU threads for BLAS and Numba (default: all cores; under "
        "mpiexec: the cores divided among the ranks on each host)")
    add("--base-width", type=int, default=d.base_width, help="channels of the first level (64: the exact U-Net)")
    add("--depth", type=int, default=d.depth)
    add("--no-head-relu", action="store_true", help="remove the ReLU before the sigmoid (the exact Keras "
        "head keeps it; removing it avoids a dead head)")
    add("--model", default=d.model, choices=["unet", "fcn32s", "fcn16s", "fcn8s", "segnet"],
        help="the network: the Keras U-Net, FCN-32s/16s/8s on VGG16, or SegNet (tinyunet/models.py)")
    add("--classes", type=int, default=d.classes, help="1: membrane or not (sigmoid); K >= 2: K classes "
        "(softmax); the synthetic data has 3 (cytoplasm, membrane, mitochondrion), membrane maps give 2")
    add("--class-weights", default=d.class_weights, choices=["none", "median-frequency"],
        help="weight the softmax loss per class: median-frequency balancing as SegNet does")
    add("--learn-upsampling", action="store_true", help="FCN: let the upsamplers learn from their bilinear "
        "start (the reference keeps them frozen; examples/fcn_ceiling.py shows what each can express)")
    add("--clock", default=d.clock, choices=["wall", "cpu"],
        help="what --minutes counts: wall time, or this process's CPU time (fair on a shared machine)")
    add("--synthetic-count", type=int, default=d.synthetic_count, help="synthetic slices to generate")
    add("--resume", action="store_true", help="continue the run in --out with its own options (from its "
        "checkpoint); options that change what it computes are refused")
    add("--overwrite", action="store_true", help="replace the run in --out (without this or --resume, a "
        "folder holding a run is refused)")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def given_options(parser, argv) -> dict:
    """The options typed on the command line, and only those, as TrainOptions fields."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    values = vars(parser.parse_args(argv))
    values.pop("threads", None)
    for flag, name in (("no_head_relu", "head_relu"), ("no_progress", "progress")):
        if flag in values:
            values[name] = not values.pop(flag)
    return values


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    set_threads(argv)
    from tinyunet import distributed
    from tinyunet.backend import DeviceError
    from tinyunet.train import TrainOptions, resume_options, train
    parser = build_parser(TrainOptions())
    args = parser.parse_args(argv)
    comm = None
    try:
        comm = distributed.world()        # None in one process: then nothing of MPI is imported
        if args.resume and args.overwrite:
            raise ValueError(f"--resume and --overwrite contradict each other: --resume continues the run in "
                             f"{args.out}, --overwrite replaces it; give one")
        if args.resume:       # the run's own options, from its checkpoint, with what was typed on top
            given = given_options(build_parser(TrainOptions()), argv)
            options = (resume_options(args.out, given) if comm is None    # MPI: every rank reads it, all agree
                       else comm.together(resume_options, args.out, given))
        else:
            options = TrainOptions(
                data=args.data, val=args.val, out=args.out, steps=args.steps, minutes=args.minutes, crop=args.crop,
                batch=args.batch, lr=args.lr, lr_schedule=args.lr_schedule, augment=args.augment,
                border_weights=args.border_weights,
                eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, threshold=args.threshold,
                tta=args.tta, seed=args.seed, device=args.device, base_width=args.base_width, depth=args.depth,
                head_relu=not args.no_head_relu, model=args.model, classes=args.classes,
                class_weights=args.class_weights, learn_upsampling=args.learn_upsampling, clock=args.clock,
                synthetic_count=args.synthetic_count, resume=False,
                overwrite=args.overwrite, progress=not args.no_progress)
        train(options, comm=comm)
    except distributed.DistributedError as error:         # MPI: raised on every rank together (bad input too)
        if comm is None or comm.is_root:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:   # the loss is the mean over ranks: under MPI every rank raises it
        if comm is None or comm.is_root:
            print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError, DeviceError) as error:   # bad input: the message says what to do
        if comm is not None:              # MPI: raised on this rank only, maybe: stop them all, naming it
            comm.abort(error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # a second Ctrl-C: train() has said what was kept
        print("stopped by Ctrl-C", file=sys.stderr)
        return 130
    except Exception as error:            # MPI: a bug, on one rank maybe: its traceback, then stop them all
        if comm is not None:
            import traceback
            traceback.print_exc()
            comm.abort(error)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
