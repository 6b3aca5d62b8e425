"""Data-parallel training over MPI, with Jittor's own mechanism: OpenMPI's mpirun starts the
processes ("ranks"), Jittor gives jt.rank / jt.world_size and the Var.mpi_* operators.

    mpirun -np 2 python train_default_lora.py ...      # 2 processes, one result

Every rank holds the whole model and runs the same loop on its own share of each global
batch (gpt2_lora_dataset.rank_share). What this file adds to Jittor:

- no_sync(): Jittor's Optimizer.backward all-reduces (averages) every gradient on every
  call, so k micro-batches cost k all-reduces. Inside no_sync() it only accumulates, like
  PyTorch DDP's no_sync(); all_reduce_grads() then sums the accumulated gradients over the
  ranks ONCE per optimizer step, in one MPI call that also carries the step's loss sum.
- barrier(): only rank 0 writes files; the others wait here. A rank that waits longer than
  the timeout exits with status 1 (faulthandler's watchdog thread, which runs while MPI
  blocks the main thread), and mpirun then stops the others.
- all_gather(): every rank's JSON-able object, on every rank (for the predictions);
  max_over_ranks(): e.g. a stop signal that reached any rank, so that all stop together.
- run_main(): under mpirun an error (an exception, or a non-zero exit code from main) ends
  the process at once (os._exit), so that mpirun aborts the whole job. A normal interpreter
  exit would call MPI_Finalize, which waits for the other ranks while they wait in their
  next all-reduce: the job would hang instead of stopping.

Without mpirun this is rank 0 of 1, and every function here is the identity or does nothing.
"""
import faulthandler
import json
import os
import sys
import traceback
from contextlib import contextmanager

import numpy as np

from backend.jittor_env import jt

rank, world_size = jt.rank, jt.world_size
is_main = rank == 0          # the rank that writes files and prints
BARRIER_TIMEOUT_S = 600      # longer than any wait for rank 0's I/O (a checkpoint takes seconds)


@contextmanager
def no_sync():
    """Optimizer.backward inside this block accumulates gradients locally instead of
    all-reducing them on every call (Jittor reads the module global jt.in_mpi there)."""
    saved = jt.in_mpi
    jt.in_mpi = False
    try:
        yield
    finally:
        jt.in_mpi = saved


def all_reduce_grads(opt, extra=()):
    """Sum the gradients accumulated in `opt` (a Jittor optimizer, under no_sync) over all
    ranks, in place, in one MPI all-reduce of one flat buffer; `extra`: floats summed along
    with them. Returns the summed extra as a list of floats."""
    if world_size == 1:
        return [float(x) for x in extra]
    grads = [g for pg in opt.param_groups for p, g in zip(pg["params"], pg["grads"]) if not p.is_stop_grad()]
    flat = jt.concat([g.flatten() for g in grads] + [jt.array(np.asarray(extra, np.float32).reshape(-1))])
    flat = flat.mpi_all_reduce("add")
    i = 0
    for g in grads:
        g.update(flat[i:i + g.numel()].reshape(g.shape))
        i += g.numel()
    return flat[i:].numpy().astype(float).tolist()  # also runs the all-reduce now, on every rank alike


def sum_over_ranks(values):
    """Element-wise sum of a list of floats over all ranks (float64)."""
    if world_size == 1:
        return [float(v) for v in values]
    return jt.array(np.asarray(values, np.float64)).mpi_all_reduce("add").numpy().tolist()


def max_over_ranks(value):
    """The largest of one int per rank, on every rank."""
    if world_size == 1:
        return value
    slots = np.zeros(world_size, np.int32)
    slots[rank] = value
    return int(jt.array(slots).mpi_all_reduce("add").numpy().max())


def all_gather(obj):
    """[rank 0's obj, rank 1's obj, ...] on every rank; obj must be JSON-serialisable."""
    if world_size == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    # each rank fills its own row of zeros; the sum over ranks is every rank's row
    lengths = np.zeros(world_size, np.int32)
    lengths[rank] = data.size
    lengths = jt.array(lengths).mpi_all_reduce("add").numpy()
    rows = np.zeros((world_size, int(lengths.max())), np.int32)
    rows[rank, :data.size] = data
    rows = jt.array(rows).mpi_all_reduce("add").numpy()
    return [json.loads(rows[r, :lengths[r]].astype(np.uint8).tobytes()) for r in range(world_size)]


def check_same_on_all_ranks(vars_, what):
    """Raise RuntimeError unless every rank holds bit-identical Vars (compared with rank 0's,
    broadcast as one flat buffer): ranks that start from different weights never agree."""
    if world_size == 1:
        return
    flat = jt.concat([v.flatten() for v in vars_])
    differ = (flat != flat.mpi_broadcast(0)).any().numpy()
    if sum_over_ranks([float(differ)])[0]:
        raise RuntimeError(f"the {what} differ between the {world_size} processes: "
                           f"their initialisation depends on the rank")


def barrier(timeout=BARRIER_TIMEOUT_S):
    """Wait until every rank is here; after `timeout` seconds, exit with status 1 (with a
    traceback of where this rank waited) so that mpirun stops the job."""
    if world_size == 1:
        return
    jt.sync_all()  # lazy MPI ops still pending must run before, on every rank in the same order
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        jt.mpi.mpi_barrier()
    finally:
        faulthandler.cancel_dump_traceback_later()


def say(message):
    """A line on stderr from any rank (under MPI prefixed with the rank): for errors, which
    may happen on one rank only."""
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    print(prefix + message, file=sys.stderr, flush=True)


def run_main(main):
    """main() as a script's entry point, returning its exit code; under mpirun an error (an
    exception, or a non-zero exit code) ends this rank at once, so that mpirun aborts the
    other ranks (see the module doc)."""
    if world_size == 1:
        return main()
    try:
        code = main()
        if not code:
            return code
    except SystemExit as e:
        if e.code in (None, 0):
            raise
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            say(str(e.code))
    except BaseException:
        code = 1
        say(traceback.format_exc().rstrip())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
