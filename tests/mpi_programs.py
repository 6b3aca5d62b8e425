"""Small programs that tests/test_mpi.py runs under mpirun: `python tests/mpi_programs.py NAME ...`.

helpers        checks distributed.py's functions on every rank, then tests the barrier timeout
               (rank 1 does not come; rank 0 must exit after 2 s and mpirun stop the job)
rank-1-raises  rank 1 raises while rank 0 waits in an all-reduce: run_main must end rank 1 so
               that mpirun stops rank 0 (a plain exit hangs in MPI_Finalize)
train-and-die  train_default_lora.py with the arguments that follow; rank 1 is killed
               (SIGKILL, as the kernel's OOM killer would) when step $DIE_AT_STEP begins
train-and-stop train_default_lora.py with the arguments that follow; each rank prints its pid
               and whether it takes the run's lock; when step $STOP_AT_STEP begins, rank 1
               prints what OUTPUT_DIR/.lock says and sends itself SIGTERM (rank 0 gets none)
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from backend import distributed  # noqa: E402
from backend.jittor_env import jt  # noqa: E402


def count_all_reduces():
    """A list that grows by one for every Var.mpi_all_reduce call from here on."""
    calls, original = [], jt.Var.mpi_all_reduce

    def counted(self, *args, **kw):
        calls.append(tuple(self.shape))
        return original(self, *args, **kw)
    jt.Var.mpi_all_reduce = counted
    return calls


def gradients_after(opt, params, coefs, deferred):
    """Gradients of sum_k (coefs[k] . params) accumulated by opt.backward, one call per k,
    with Jittor's per-call all-reduce or (deferred) under no_sync + one all_reduce_grads."""
    if deferred:
        with distributed.no_sync():
            for c in coefs:
                opt.backward(sum((p * jt.array(c[i])).sum() for i, p in enumerate(params)))
        distributed.all_reduce_grads(opt, [0.0])
    else:
        for c in coefs:
            opt.backward(sum((p * jt.array(c[i])).sum() for i, p in enumerate(params)))
    grads = [g.numpy().copy() for g in opt.param_groups[0]["grads"]]
    opt.zero_grad()
    return grads


def helpers():
    r, w = distributed.rank, distributed.world_size
    assert w == 2 and jt.in_mpi, (w, jt.in_mpi)
    got = distributed.all_gather({"rank": r, "text": "é" * (r + 1)})
    assert got == [{"rank": i, "text": "é" * (i + 1)} for i in range(w)], got
    assert distributed.sum_over_ranks([r + 0.5, 1.0]) == [2.0, 2.0]

    # 3 micro-batches, 2 parameter tensors; coefficient k of rank r is the gradient of its loss k
    params = [jt.zeros((3,)), jt.zeros((2, 2))]
    opt = jt.optim.SGD(params, lr=0.1)
    coefs = [[np.full((3,), 10 * r + k, np.float32), np.full((2, 2), 100 * r + k, np.float32)] for k in range(3)]
    calls = count_all_reduces()
    default = gradients_after(opt, params, coefs, deferred=False)
    n_default = len(calls)
    deferred = gradients_after(opt, params, coefs, deferred=True)
    n_deferred = len(calls) - n_default
    # Jittor: the mean over ranks of each call; deferred: the sum over ranks and micro-batches
    sums = [sum(10 * q + k for q in range(w) for k in range(3)), sum(100 * q + k for q in range(w) for k in range(3))]
    assert np.array_equal(deferred[0], np.full((3,), sums[0], np.float32)), deferred[0]
    assert np.array_equal(deferred[1], np.full((2, 2), sums[1], np.float32)), deferred[1]
    assert np.array_equal(default[0] * w, deferred[0]) and np.array_equal(default[1] * w, deferred[1])
    assert n_default == 3 * 2 and n_deferred == 1, (n_default, n_deferred)
    print(f"rank {r}: all-reduce calls for 3 micro-batches x 2 tensors: Jittor's backward {n_default}, "
          f"no_sync + all_reduce_grads {n_deferred}", flush=True)

    distributed.check_same_on_all_ranks([jt.ones((4,))], "same weights")
    try:
        distributed.check_same_on_all_ranks([jt.array(np.full((4,), float(r), np.float32))], "test weights")
        raise AssertionError("check_same_on_all_ranks accepted different weights")
    except RuntimeError as e:
        assert "the test weights differ between the 2 processes" in str(e), e
    print(f"rank {r}: helpers ok", flush=True)

    # the barrier timeout: rank 1 does not come
    if r == 1:
        time.sleep(120)
    distributed.barrier(timeout=2)
    print(f"rank {r}: passed the barrier", flush=True)  # must not happen


def rank_1_raises():
    if distributed.rank == 1:
        raise RuntimeError("rank 1 fails")
    distributed.sum_over_ranks([1.0])
    print("rank 0: the all-reduce returned", flush=True)  # must not happen


def train_and_die(argv):
    import train_default_lora as T
    die_at, step = int(os.environ["DIE_AT_STEP"]), T.optimizer_step

    def dying(run, batch):
        if distributed.rank == 1 and run.step + 1 == die_at:
            print(f"rank 1: killing myself at the start of step {die_at}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return step(run, batch)
    T.optimizer_step = dying
    sys.argv = ["train_default_lora.py"] + argv
    distributed.run_main(T.main)


def train_and_stop(argv):
    import train_default_lora as T
    from training import train_state
    stop_at, step, enter = int(os.environ["STOP_AT_STEP"]), T.optimizer_step, train_state.RunLock.__enter__

    def entering(lock):
        print(f"rank {distributed.rank}: pid {os.getpid()} takes {lock.path}", flush=True)
        return enter(lock)

    def stopping(run, batch):
        if distributed.rank == 1 and run.step + 1 == stop_at:
            print(f"rank 1: {run.out / '.lock'} says {(run.out / '.lock').read_text()!r}", flush=True)
            print(f"rank 1: SIGTERM to myself at the start of step {stop_at}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        return step(run, batch)
    train_state.RunLock.__enter__, T.optimizer_step = entering, stopping
    sys.argv = ["train_default_lora.py"] + argv
    sys.exit(distributed.run_main(T.main))


if __name__ == "__main__":
    if sys.argv[1] == "helpers":
        distributed.run_main(helpers)
    elif sys.argv[1] == "rank-1-raises":
        distributed.run_main(rank_1_raises)
    elif sys.argv[1] == "train-and-die":
        train_and_die(sys.argv[2:])
    elif sys.argv[1] == "train-and-stop":
        train_and_stop(sys.argv[2:])
    else:
        sys.exit(f"unknown program {sys.argv[1]!r}")
