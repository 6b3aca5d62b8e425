"""Kill anywhere, lose nothing but time.

train_default_lora.py is stopped again and again, by SIGKILL, SIGINT and SIGTERM, at moments
drawn from a seeded schedule over one small run: inside the random base model's write, inside
the very first checkpoint, mid log line (a torn line), right after a resume, inside later
checkpoints, while pruning, in the final phase. Each time it is started again with --resume.
The run must end with exactly the adapter, train_loss.txt, val_loss.txt, predictions and
scores of an uninterrupted run. The moments are named points of the TRAIN_STOP_AT test hook
(train_state.py), so nothing depends on timing. Also here: one run per output folder.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import write_sample_split
from train_default_lora import main
from training.train_state import STOP_POINTS, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY = "n_layer=2,n_head=2,n_embd=32,n_positions=256,initializer_range=0.1"
STEPS, SAVE, KEEP = 8, 2, 2
SIGNAL_EXIT = {"SIGKILL": -9, "SIGINT": 130, "SIGTERM": 143}


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    return write_sample_split(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def children_may_die():
    """Jittor's C++ SIGCHLD handler (src/utils/log.cc) ends a process that imported Jittor as
    soon as one of its children dies of a signal other than SIGTERM ("Caught SIGCHLD ... quick
    exit"), which would end pytest at the first SIGKILLed run. SIGCHLD's default action is to
    ignore it; Jittor's handler cannot be put back from Python, and nothing here needs it."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def command(split_files, out, *extra):
    train_file, eval_file = split_files
    return [sys.executable, "train_default_lora.py", "--random-base", TINY, "--train-file", str(train_file),
            "--eval-file", str(eval_file), "--output-dir", str(out), "--max-steps", str(STEPS),
            "--save-interval", str(SAVE), "--eval-interval", str(SAVE), "--keep-checkpoints", str(KEEP),
            "--eval-examples", "8", "--gen-eval-examples", "2", "--max-new-tokens", "3", "--max-length", "192",
            "--dropout", "0.1", "--lr", "3e-3", "--warmup-steps", "2", *extra]


def run(cmd, stop_at=None):
    env = {k: v for k, v in os.environ.items() if k != "TRAIN_STOP_AT"}
    if stop_at:
        env["TRAIN_STOP_AT"] = stop_at
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return r, time.time() - t0


def schedule(seed):
    """[(point, step or None = wherever the process resumes, signal)] in the order a run meets
    them, one or more per kind of window; the seed picks the points inside each kind."""
    rng = random.Random(seed)
    inside = ("checkpoint:adapter", "checkpoint:state", "checkpoint:manifest")
    return [
        ("base_model", 0, "SIGKILL"),                                  # the random base half written
        (rng.choice(inside), 2, "SIGKILL"),          # the very first checkpoint: back to step 0, base kept
        (rng.choice(("log:train_loss.txt", "log:metrics.jsonl")), 3, "SIGKILL"),  # a torn line
        ("step", 5, "SIGINT"),                                          # Ctrl-C between two saves
        ("restored", None, "SIGKILL"),                                  # right after a resume
        (rng.choice(("checkpoint:renamed", "log:val_loss.txt") + inside), 6, "SIGKILL"),
        (rng.choice(("step", "log:train_loss.txt", "log:metrics.jsonl")), 7, "SIGTERM"),
        (rng.choice(inside), 8, "SIGKILL"),                             # the final checkpoint
        ("prune", 8, "SIGKILL"),
        (rng.choice(("finish:adapter", "finish:predictions", "finish:scores")), 8, "SIGKILL"),
        ("finish:curves", 8, "SIGTERM"),                                # outside the loop: at once
    ]


def test_schedule_names_real_points():
    for seed in range(20):
        assert all(point in STOP_POINTS for point, _, _ in schedule(seed))


def test_killed_and_resumed_run_equals_the_uninterrupted_run(split_files, tmp_path):
    t_start = time.time()
    ref, t_ref = run(command(split_files, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    plan = schedule(seed=12)
    counts, times, took_over = {}, [], 0
    for i, (point, step, sig) in enumerate(plan):
        if step is None:  # the step this process will resume from
            step = int(list_checkpoints(out)[-1].name.split("-")[1]) if list_checkpoints(out) else 0
        r, dt = run(command(split_files, out, *(["--resume"] if i else [])), stop_at=f"{point}@{step}:{sig}")
        times.append(dt)
        marker = f"TRAIN_STOP_AT: {sig} at {point}, step {step}"
        print(f"\nrun {i + 1}: {sig} at {point}, step {step}: exit {r.returncode} ({dt:.1f} s)")
        assert marker in r.stderr, f"run {i + 1} never reached {point}@{step}:\n{r.stderr[-3000:]}"
        assert r.returncode == SIGNAL_EXIT[sig], r.stderr[-3000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        if sig != "SIGKILL":
            last = r.stderr.strip().splitlines()[-1]
            print(f"  {last}")
            assert f"stopped by {sig}" in last and "--resume" in last
        took_over += "did not exit cleanly" in r.stderr  # the lock of a SIGKILLed run, taken over
        counts[sig] = counts.get(sig, 0) + 1
    r, dt = run(command(split_files, out, "--resume"))
    times.append(dt)
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"final --resume: exit 0 ({dt:.1f} s); stops survived: {counts}; SIGKILLed runs' locks taken over: "
          f"{took_over}; {len(times) + 1} processes in {time.time() - t_start:.0f} s "
          f"(uninterrupted run {t_ref:.1f} s)")
    assert counts["SIGKILL"] >= 8 and took_over >= 1
    ref_dir = tmp_path / "ref"
    for name in ("adapter/adapter_model.safetensors", "train_loss.txt", "val_loss.txt", "predictions.json",
                 "scores.json", f"checkpoint-{STEPS:06d}/trainer_state.safetensors"):
        same = (ref_dir / name).read_bytes() == (out / name).read_bytes()
        print(f"  {name}: {'identical' if same else 'DIFFERENT'}")
        assert same, name
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config == {**json.loads((ref_dir / "adapter" / "adapter_config.json").read_text()),
                      "base_model_name_or_path": str(out / "base_model")}
    leftovers = [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-", ".deleted-"))
                 or p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    assert len(list_checkpoints(out)) == KEEP


# ----------------------------------------------------------------------------
# One run per folder

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"pid {os.getpid()} on host testhost, since now".encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_second_run_on_a_folder_in_use_is_refused_and_a_dead_runs_lock_taken_over(split_files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = command(split_files, out, "--max-steps", "1", "--gen-eval-examples", "0")[2:]
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        with capsys.disabled():
            print(f"\nwhile pid {holder.pid} holds the lock: exit {code}: {err[-1]}")
        assert code == 1 and len(err) == 1
        assert err[0] == (f"error: {out} is in use by another training run (pid {holder.pid} on host testhost, "
                          f"since now); wait for it to end or pass another --output-dir")
        assert not (out / "config.json").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    code = main(argv)  # the kernel dropped the dead holder's lock: taken over
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if "taking over" in line]
    with capsys.disabled():
        print(f"after SIGKILL of pid {holder.pid}: exit {code}; {note[0]}")
    assert code == 0 and f"pid {holder.pid} on host testhost" in note[0]
    assert (out / ".lock").read_text() == ""  # a clean exit leaves no holder behind
