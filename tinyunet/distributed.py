"""Data-parallel training over MPI: P processes train one model, gradients averaged by hand.

    mpiexec -n 2 python examples/train_membranes.py --batch 2      (global batch 2 x 2 = 4)

The only module of tinyunet that imports mpi4py, and only when an MPI launcher started the
program with more than one process (``world()``): a single process never imports it. MPI is
the transport (the optional extra ``pip install -e ".[mpi]"``: mpi4py and the MPICH wheel);
what data parallelism computes is written here:

    every rank     the same options and seed, so the same initial weights (check_same proves it)
    rank r         draws its own batches from a generator seeded (seed, 1, r) (rank 0: (seed, 1),
                   exactly what a single process draws) and its own dropout masks (seed, 2, r, i)
    every step     forward + backward on its b samples: g_r = dL_r/dw, L_r the mean loss of them
                   g = (1/P) sum_r g_r          one Allreduce(SUM) of all gradients, then / P
                     = dL/dw for L the mean loss over all P*b samples (the loss is a mean over
                       pixels, and every rank has the same b), so every rank applies the same
                       Adam step to the same weights: they stay identical without ever being sent
    rank 0         evaluates, writes the run folder and checkpoints, prints; a checkpoint holds
                   every rank's generator states (gathered to rank 0)

One flat buffer, not buckets. The gradients (47 arrays for the exact U-Net, 8 bytes to 37 MB)
are copied into one contiguous buffer of 31,031,685 floats (124 MB in float32) that lives for
the run, reduced by ONE Allreduce, and handed to Adam as views into the buffer (no copy back).
One message pays the network's latency once and runs at full bandwidth, and MPI's ring or
tree algorithms segment a large buffer themselves. Buckets pay off when each bucket's
reduction overlaps the rest of the backward pass (PyTorch DDP), which needs a non-blocking
Iallreduce started from inside UNet.backward as each layer's gradient appears; not done
here. The cost: one copy of the gradients (124 MB of memory, about 30 ms per step).

Failures. The checks before any work (options, run folder, data) run on every rank through
``Communicator.together``: all pass, or every rank raises, with the single-process message when
all refused alike and naming the failed ranks otherwise. A rank that fails during a step (bad
data, an exception in forward or backward) still joins the step's first collective, a small allgather of (error or None, loss): every
rank sees who failed and raises RankFailedError naming that rank and its error, instead of
waiting for ever in the Allreduce. An error elsewhere (a full disk on rank 0) leaves the other
ranks waiting in their next collective: whoever catches it calls
``Communicator.abort``, which prints it with the rank's number and stops every process
(MPI_Abort); examples/train_membranes.py does so for every error but the DistributedErrors,
which every rank raises together.
Proof: tests/test_distributed.py (2 ranks on loopback: same weights as one process with the
doubled batch, rank 0 alone writes, identical resume, mismatched configurations, a failing
rank, MPI missing).

GPU ranks (device 'gpu'): the buffer is copied to the host, reduced there and copied back,
which works with any MPI. Untested: no GPU on the machine this was written on; NCCL is not
used.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

INSTALL_HINT = 'pip install -e ".[mpi]"'

# What launchers put in each process's environment: (variable for the size, variable for the
# number of ranks on this host). MPICH/Intel MPI (hydra), Open MPI, MVAPICH, Slurm's srun.
LAUNCHER_VARIABLES = (("PMI_SIZE", "MPI_LOCALNRANKS"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                      ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"), ("PMIX_SIZE", "PMIX_LOCAL_SIZE"))


class DistributedError(RuntimeError):
    """Raised on EVERY rank together (so each can exit normally): MPI missing, ranks configured
    differently, or a rank that failed."""


class MPIUnavailableError(DistributedError):
    """Started by an MPI launcher, but mpi4py or its MPI library cannot be loaded."""


class ConfigMismatchError(DistributedError):
    """The ranks were started with different options, models, data or weights."""


class RankFailedError(DistributedError):
    """A rank failed during a training step, or in checks the others passed; every rank stops."""


class RefusedError(DistributedError):
    """Every rank refused alike (bad option, a run folder that holds a run): the message is
    the one a single process gives."""


def launched_size() -> int:
    """The number of processes the MPI launcher started (1 without one), from the environment
    alone: nothing is imported."""
    for size, _ in LAUNCHER_VARIABLES:
        if os.environ.get(size, "").isdigit():
            return int(os.environ[size])
    return 1


def local_ranks() -> int:
    """How many ranks the launcher started on THIS host (1 without a launcher)."""
    for _, local in LAUNCHER_VARIABLES:
        if os.environ.get(local, "").isdigit():
            return int(os.environ[local])
    return launched_size()


def threads_per_rank() -> int:
    """The CPU cores of this host shared among its ranks: P ranks with all cores each would run
    P times more threads than cores, and every kernel would wait for the others'."""
    return max(1, (os.cpu_count() or 1) // local_ranks())


def world():
    """A Communicator over every rank when an MPI launcher started more than one process, else
    None (and mpi4py is not imported). Raises MPIUnavailableError, naming the extra to install,
    when the launcher is there but mpi4py or its MPI library is not."""
    if launched_size() <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise MPIUnavailableError(
            f"started by mpiexec with {launched_size()} processes, but mpi4py is not installed "
            f"({error}); install it with: {INSTALL_HINT}") from None
    except RuntimeError as error:      # mpi4py is there, its MPI library is not
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MPIUnavailableError(
            f"mpi4py cannot load an MPI library ({first}); install one with: {INSTALL_HINT} "
            f"(or point MPI4PY_LIBMPI at your cluster's libmpi.so)") from None
    return Communicator(MPI.COMM_WORLD, MPI)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(arrays) -> str:
    """sha256 of the shapes, dtypes and bytes of ``arrays`` (NumPy or CuPy), in order."""
    from tinyunet.backend import to_numpy
    digest = hashlib.sha256()
    for array in arrays:
        array = to_numpy(array)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(memoryview(array).cast("B") if array.flags.c_contiguous else array.tobytes())
    return digest.hexdigest()


class Communicator:
    """The few collectives training needs, over an mpi4py communicator."""

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._buffer = None            # the flat gradient buffer, made at the first step

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- the same configuration everywhere ------------------------------------------------------
    def check_same(self, values: dict, what: str = "configuration") -> None:
        """Raise ConfigMismatchError on every rank unless every rank passed equal ``values``
        (JSON-able; compared by sha256, then the differing keys named)."""
        text = json.dumps(values, sort_keys=True, default=str)
        digests = self.comm.allgather(_digest(text))
        if len(set(digests)) == 1:
            return
        texts = [json.loads(t) for t in self.comm.allgather(text)]
        lines = []
        for rank, other in enumerate(texts):
            if digests[rank] != digests[0]:
                keys = sorted(k for k in set(other) | set(texts[0]) if other.get(k) != texts[0].get(k))
                shown = ", ".join(f"{k} = {_short(other.get(k))} (rank 0: {_short(texts[0].get(k))})" for k in keys)
                lines.append(f"rank {rank}: {shown}")
        raise ConfigMismatchError(
            f"the {self.size} ranks were not started alike ({what} differs from rank 0's): " + "; ".join(lines)
            + ". Every rank must get the same command line, the same data files and the same checkpoint")

    def together(self, function, *args):
        """``function(*args)`` on every rank, which must all call this; its result when no rank
        raised. Otherwise every rank raises: RefusedError with the message when all raised the
        same (checks that read the same options and disk), RankFailedError naming each rank's
        error when they differ, instead of the ranks that passed waiting for ever."""
        failure, result = None, None
        try:
            result = function(*args)
        except Exception as error:
            failure = error
        reports = self.comm.allgather(None if failure is None else f"{type(failure).__name__}: {failure}")
        if all(text is None for text in reports):
            return result
        if all(text == reports[0] for text in reports):
            raise RefusedError(str(failure)) from failure
        named = "; ".join(f"rank {rank} failed: {text}" for rank, text in enumerate(reports) if text is not None)
        raise RankFailedError(f"{named}. Every rank stops") from failure

    # -- one step ---------------------------------------------------------------------------------
    def average_gradients(self, grads: dict, loss: float, failure: BaseException | None = None,
                          step: int = 0) -> tuple[dict, float]:
        """({name: (1/P) sum_r grads_r[name]}, mean loss over ranks), the same on every rank.

        First a small allgather of (error text or None, loss): if any rank failed (``failure``
        is its exception), every rank raises RankFailedError naming it. Then the gradients are
        copied into one flat buffer, reduced in place by one Allreduce(SUM) and divided by P;
        the returned arrays are views into that buffer (valid until the next call).
        """
        error = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports = self.comm.allgather((error, float(loss)))
        failed = [(rank, text) for rank, (text, _) in enumerate(reports) if text is not None]
        if failed:
            named = "; ".join(f"rank {rank} failed: {text}" for rank, text in failed)
            raise RankFailedError(f"step {step}: {named}. Every rank stops") from failure
        mean_loss = sum(value for _, value in reports) / self.size

        from tinyunet.backend import get_array_module, is_gpu_array, to_device, to_numpy
        first = next(iter(grads.values()))
        xp = get_array_module(first)
        total = sum(int(g.size) for g in grads.values())
        if self._buffer is None or self._buffer.size != total or self._buffer.dtype != first.dtype:
            self._buffer = xp.empty(total, dtype=first.dtype)
        buffer, views, offset = self._buffer, {}, 0
        for name, g in grads.items():                       # the same order on every rank
            view = buffer[offset:offset + g.size]
            view[...] = g.reshape(-1)
            views[name] = view.reshape(g.shape)
            offset += g.size
        if is_gpu_array(buffer):                            # through the host: any MPI (untested)
            host = to_numpy(buffer)
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            buffer[...] = to_device(host, "gpu")
        else:
            self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
        buffer /= buffer.dtype.type(self.size)
        return views, mean_loss

    def root_value(self, value):
        """Rank 0's ``value`` on every rank (e.g. its clock, so every rank stops at one step)."""
        return self.comm.bcast(value, root=0)

    def gather(self, value):
        """[value of rank 0, of rank 1, ...] on rank 0, None elsewhere."""
        return self.comm.gather(value, root=0)

    # -- failures outside a step ------------------------------------------------------------------
    def abort(self, error: BaseException, code: int = 2) -> None:
        """Print the error with this rank's number, then stop every rank (MPI_Abort)."""
        print(f"error on rank {self.rank} of {self.size}: {error}. Stopping every rank.", file=sys.stderr,
              flush=True)
        self.comm.Abort(code)


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# Each rank's random streams, and what a checkpoint keeps of them
# ---------------------------------------------------------------------------------------------
def seed_rank_streams(seed: int, rank: int, model, step: int | None = None):
    """Rank ``rank``'s batch generator; gives the model's Dropout layers their own streams.

    Rank 0 keeps what one process draws (batches (seed, 1), dropout from the model's seed), so
    P = 1 under mpiexec trains exactly as without it; rank r > 0 draws (seed, 1, r) and
    (seed, 2, r, i) for the i-th dropout layer. ``step`` is mixed in when a resume has to
    start new streams (another P), so they do not repeat the first steps' samples.
    """
    import numpy as np
    later = [step] if step is not None else []
    if rank or step is not None:
        for i, rng in enumerate(model.random_generators().values()):
            rng.bit_generator.state = np.random.default_rng([seed, 2, rank, i] + later).bit_generator.state
    return np.random.default_rng([seed, 1] + ([rank] if rank else []) + later)


def rank_states(batch_rng, model) -> dict:
    """This rank's generator states, as JSON-able values for a checkpoint."""
    return {"batches": batch_rng.bit_generator.state,
            "dropout": {name: rng.bit_generator.state for name, rng in model.random_generators().items()}}


def restore_rank_streams(saved: list | None, rank: int, size: int, seed: int, step: int, batch_rng, model,
                         log=print) -> None:
    """Continue rank ``rank``'s streams from a checkpoint's ``saved`` states (one per rank that
    wrote it; None: a single process wrote it, and rank 0's states were restored already).

    Same number of ranks: every rank continues its own streams, so the run continues exactly as
    if never stopped. Another number: the weights and Adam continue exactly; ranks that existed
    continue their streams, new ranks start new ones seeded with the step, and the global batch
    changes (P x batch), so the run is not the one the old P would have made. Rank 0 says so.
    """
    saved_size = len(saved) if saved else 1
    if saved_size != size and rank == 0:
        log(f"resuming a checkpoint written by {saved_size} rank(s) on {size}: the weights and Adam state "
            f"continue exactly; ranks 0-{min(saved_size, size) - 1} continue their batch streams"
            + (f", ranks {saved_size}-{size - 1} start new ones seeded (seed, rank, step {step})"
               if size > saved_size else "")
            + f"; the global batch is now {size} x batch. This is not the run {saved_size} rank(s) would "
              f"have continued")
    if saved and rank < len(saved):
        batch_rng.bit_generator.state = saved[rank]["batches"]
        generators = model.random_generators()
        for name, state in saved[rank]["dropout"].items():
            generators[name].bit_generator.state = state
    elif rank >= saved_size:
        batch_rng.bit_generator.state = seed_rank_streams(seed, rank, model, step).bit_generator.state
