"""Training state on disk, kept intact whenever and however the run stops.

Checkpoints. checkpoint-<step>/ holds the adapter in PEFT's format (adapter_model.safetensors +
adapter_config.json) and what else a resumed run needs:
    trainer_state.safetensors   param/<name>, exp_avg/<name>, exp_avg_sq/<name>: the LoRA
                                weights and AdamW's two moments, for every adapter tensor
    trainer_state.json          {"step": optimizer steps done, "epoch": the epoch the next
                                step is in (0-based), "batches": global batches of it done,
                                "global_batch": examples per step (batch size x grad accum
                                x processes; a resumed run must have the same), and in fp16
                                "loss_scaler": the LossScaler's state_dict}
    manifest.json               {"step", "files": {name: {"bytes", "sha256"}}}, written last
It is written into .tmp-checkpoint-<step>/, fsync'ed and renamed into place, then read back
and verified (read_checkpoint: every file there and matching its checksum, the safetensors
readable, every tensor of this model's shape, the state consistent with the folder's step).
Only then are older ones pruned, so the newest good checkpoint is never deleted before a
newer one is known good. On --resume every checkpoint is verified; a damaged one is
reported (folder and what is wrong), moved aside to damaged-checkpoint-<step>/ and skipped
for the newest good one.

Logs. Append-only lines (step<TAB>loss, or JSON with a "step"). They are fsync'ed before a
checkpoint is written, so a checkpoint never exists without the log lines of its steps; a
resumed run cuts them back to its checkpoint's step (atomically), which also drops a torn
last line (a power cut, or a full disk, mid-write).

One run per folder. RunLock holds an flock on OUTPUT_DIR/.lock for the whole run: a second
run there is refused with the holder's pid and host. The kernel drops the lock when its
process dies, however it dies, so a killed run's lock is simply taken over.

Write failures. Writes go through writing(path): an OSError there (ENOSPC, EACCES, EROFS,
...) becomes a WriteError naming the file and the cause. Checkpoints written before stay
intact: a failed one never got its real name.

Ctrl-C and SIGTERM. Inside `with StopSignals()` (the training loop) they only set `signum`;
the loop writes a checkpoint at the step boundary and raises Stopped (exit code 128 +
signal: 130 for SIGINT, 143 for SIGTERM). A second signal stops at once.

Test hook. With TRAIN_STOP_AT=<point>@<step>[:<SIGNAL>] in the environment, the process sends
itself SIGNAL (default SIGKILL) when it reaches <point> at optimizer step <step>, once; the
tests use it to stop a run inside a given window on purpose (tests/test_crash_safety.py).
The points, in the order a run meets them (see STOP_POINTS): "restored" (after the
checkpoint is loaded and the logs cut back); per step "step" (after the weight update),
"log:train_loss.txt", "log:metrics.jsonl", "log:val_loss.txt" (each after writing half the
line: a torn line), "checkpoint:adapter", "checkpoint:state", "checkpoint:manifest" (the
temporary folder partly or fully written), "checkpoint:renamed" (in place, before
verification and pruning), "prune" (an old checkpoint renamed for deletion, not yet deleted);
at the end "finish:adapter" (written, not yet in place), "finish:predictions",
"finish:scores", "finish:curves"; and "base_model" (a --random-base model written, not yet
in place). Unset, it does nothing.
"""
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager

from backend.jittor_env import jt
from lora_models import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from model_utils import atomic_save_safetensors, atomic_write, atomic_write_json, load_safetensors

CHECKPOINT = re.compile(r"checkpoint-(\d{6,})")
CHECKPOINT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "trainer_state.safetensors", "trainer_state.json")
MANIFEST = "manifest.json"
LOGS = ("train_loss.txt", "val_loss.txt", "metrics.jsonl")
STOP_POINTS = ("restored", "step", "log:train_loss.txt", "log:metrics.jsonl", "log:val_loss.txt",
               "checkpoint:adapter", "checkpoint:state", "checkpoint:manifest", "checkpoint:renamed", "prune",
               "finish:adapter", "finish:predictions", "finish:scores", "finish:curves", "base_model")


# ----------------------------------------------------------------------------
# Errors

class WriteError(OSError):
    """A failed write (disk full, no permission, read-only file system, ...), naming the file."""

    def __init__(self, path, cause):
        code = errno.errorcode.get(cause.errno, "")
        super().__init__(cause.errno, f"cannot write {path}: {cause.strerror or cause}"
                                      + (f" ({code})" if code else ""))
        self.path = path

    def __str__(self):
        return self.strerror


class CheckpointError(ValueError):
    """A checkpoint that a run cannot resume from; the message names the folder and what is wrong."""


class RunInUse(RuntimeError):
    """Another training run holds the output folder."""


class Stopped(BaseException):
    """The run was stopped by SIGINT / SIGTERM. A BaseException, like KeyboardInterrupt, so no
    `except Exception` swallows it; the script exits with `exit_code` (128 + the signal)."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.exit_code = 128 + signum


@contextmanager
def writing(path):
    """Turn an OSError raised inside into a WriteError that names `path` (or the file the
    error itself names) and the cause."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.filename or path, e) from e


# ----------------------------------------------------------------------------
# The test hook (see the module doc): a no-op unless TRAIN_STOP_AT is set.

class StopAt:
    def __init__(self, spec):
        self.step, self.target, self.signum = 0, None, signal.SIGKILL
        if spec:
            m = re.fullmatch(r"([\w:.]+)@(\d+)(?::(SIG[A-Z]+))?", spec)
            if not m or m[1] not in STOP_POINTS or not hasattr(signal, m[3] or "SIGKILL"):
                raise ValueError(f"TRAIN_STOP_AT={spec!r}: expected <point>@<step>[:<SIGNAL>] with a point "
                                 f"among {', '.join(STOP_POINTS)}")
            self.target, self.signum = (m[1], int(m[2])), getattr(signal, m[3] or "SIGKILL")

    def __call__(self, point, step=None, before=None):
        """At `point`; `step` updates the current step; `before()` runs just before a SIGKILL."""
        if step is not None:
            self.step = step
        if self.target != (point, self.step):
            return
        self.target = None  # once per process
        if before is not None and self.signum == signal.SIGKILL:  # a process that goes on must not tear its line
            before()
        print(f"TRAIN_STOP_AT: {signal.Signals(self.signum).name} at {point}, step {self.step}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), self.signum)
        if self.signum == signal.SIGKILL:
            time.sleep(60)  # the signal is on its way; nothing after this line may run


stop_at = StopAt(os.environ.get("TRAIN_STOP_AT"))


# ----------------------------------------------------------------------------
# Files and folders

def file_digest(path):
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fsync_path(path):
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder(final, write, stop=None):
    """Make the folder `final` whole or not at all: write(tmp) fills .tmp-<name> beside it
    (failures named by WriteError), then it is renamed into place. `stop`: the test hook's
    name for the moment between the two."""
    tmp = final.with_name(f".tmp-{final.name}")
    with writing(tmp):
        write(tmp)
    if stop:
        stop_at(stop)
    replace_folder(tmp, final)


def replace_folder(tmp, final):
    """Rename the finished folder `tmp` to `final`. An existing `final` is moved aside to
    .old-<name> first and deleted after: a rename cannot replace a folder that is not empty."""
    old = final.with_name(f".old-{final.name}")
    with writing(final):
        fsync_path(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(out):
    """Delete what a run stopped mid-write leaves: temporary checkpoint / adapter / base-model
    folders, folders half-deleted by pruning, and atomic_write's temporary files."""
    for p in out.iterdir():
        if p.name.startswith((".tmp-", ".old-", ".deleted-")):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)


def clear_folder(out, keep=(".lock",)):
    for p in out.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# ----------------------------------------------------------------------------
# Checkpoints

def checkpoint_step(path):
    m = CHECKPOINT.fullmatch(path.name)
    return int(m[1]) if m else None


def list_checkpoints(out):
    """The checkpoint-<step> folders of `out`, oldest first (temporary, half-deleted and
    damaged-checkpoint-* folders are not checkpoints)."""
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if checkpoint_step(p) is not None and p.is_dir()), key=checkpoint_step)


def latest_checkpoint(out):
    found = list_checkpoints(out)
    return found[-1] if found else None


def checkpoint_path(out, step):
    return out / f"checkpoint-{step:06d}"


def save_checkpoint(out, model, opt, state, scaler=None):
    """Write checkpoint-<step>/ as the module doc says (with `scaler`'s state in fp16), then
    verify it; returns its path."""
    final = checkpoint_path(out, state["step"])
    tmp = out / f".tmp-{final.name}"
    for name in LOGS:  # the log lines of the steps this checkpoint covers reach the disk first
        if (out / name).is_file():
            with writing(out / name):
                fsync_path(out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp):
        model.save_lora_weights(tmp)
    stop_at("checkpoint:adapter", state["step"])
    tensors = {}
    for name, p, m, v in adam_moments(model, opt):
        tensors[f"param/{name}"], tensors[f"exp_avg/{name}"], tensors[f"exp_avg_sq/{name}"] = p.numpy(), m.numpy(), v.numpy()
    with writing(tmp / "trainer_state.safetensors"):
        atomic_save_safetensors(tmp / "trainer_state.safetensors", tensors)
    if scaler is not None:
        state = {**state, "loss_scaler": scaler.state_dict()}
    with writing(tmp / "trainer_state.json"):
        atomic_write_json(tmp / "trainer_state.json", state)
    stop_at("checkpoint:state")
    manifest = {"step": state["step"], "files": {name: file_digest(tmp / name) for name in CHECKPOINT_FILES}}
    with writing(tmp / MANIFEST):
        atomic_write_json(tmp / MANIFEST, manifest)
    stop_at("checkpoint:manifest")
    replace_folder(tmp, final)
    stop_at("checkpoint:renamed")
    read_checkpoint(final, model)  # what is on disk is what a resumed run will read
    return final


def read_checkpoint(path, model):
    """(tensors, state) of a checkpoint, verified against its manifest and `model`; raises
    CheckpointError saying what is wrong."""
    def damaged(what):
        raise CheckpointError(f"{path}: {what}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files, manifest_step = manifest["files"], manifest["step"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        damaged(f"no {MANIFEST} (the checkpoint is incomplete)")
    except (ValueError, KeyError, TypeError):
        damaged(f"{MANIFEST} is not a valid manifest")
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            damaged(f"{name} is missing")
        found = file_digest(path / name)
        if found != files.get(name):
            damaged(f"{name} does not match its checksum in {MANIFEST} ({found['bytes']} bytes, "
                    f"sha256 {found['sha256'][:12]}..., expected {files.get(name)})")
    try:
        load_safetensors(path / ADAPTER_WEIGHTS)
        tensors = load_safetensors(path / "trainer_state.safetensors")
    except ValueError as e:
        damaged(f"unreadable ({e})")
    for name, p in model.lora_state_dict().items():
        for key in (f"param/{name}", f"exp_avg/{name}", f"exp_avg_sq/{name}"):
            if key not in tensors or tuple(tensors[key].shape) != tuple(p.shape):
                damaged(f"trainer state does not match this model ({key}: "
                        f"{tuple(tensors[key].shape) if key in tensors else 'missing'}, expected {tuple(p.shape)})")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except ValueError:
        state = None
    if isinstance(state, dict) and "micro" in state and "global_batch" not in state:  # intact, but not resumable
        raise ValueError(f"{path}: written by an older version of this script (its data position counts "
                         f"micro-batches), whose batch order this version does not reproduce; start a new run")
    consistent = (isinstance(state, dict) and all(type(state.get(k)) is int and state[k] >= 0
                                                  for k in ("step", "epoch", "batches", "global_batch"))
                  and state["global_batch"] > 0 and state["step"] == checkpoint_step(path) == manifest_step)
    if not consistent:
        damaged(f"trainer_state.json is not a state of step {checkpoint_step(path)}")
    return tensors, state


def restore_checkpoint(out, model, opt, log, scaler=None):
    """Load the newest good checkpoint of `out` into model and opt (and the loss scale into
    scaler) and return its state, or None when there is none. Every checkpoint is verified;
    each damaged one is reported and moved aside to damaged-checkpoint-<step>/. Only damaged
    ones: CheckpointError."""
    good, damaged = None, []
    for path in reversed(list_checkpoints(out)):
        try:
            found = (path, *read_checkpoint(path, model))
            good = good or found
        except CheckpointError as e:
            damaged.append(path)
            log(f"warning: damaged checkpoint skipped: {e}")
    if good is None:
        if damaged:
            raise CheckpointError(f"{out}: no intact checkpoint to resume from ({len(damaged)} damaged, see above); "
                                  f"move them away to start the run again from step 0")
        return None
    for path in damaged:
        aside = path.with_name(f"damaged-{path.name}")
        with writing(aside):
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
    path, tensors, state = good
    if scaler is not None:
        if "loss_scaler" not in state:
            raise ValueError(f"{path}: no loss-scaler state in trainer_state.json (not an fp16 run's checkpoint)")
        scaler.load_state_dict(state["loss_scaler"])
    load_into(model, opt, tensors)
    log(f"resumed from {path} (step {state['step']}, epoch {state['epoch'] + 1})")
    return state


def adam_moments(model, opt):
    """(name, tensor, exp_avg, exp_avg_sq) for every LoRA tensor of `model`, from whichever of
    the AdamW param groups holds it (LoRA+ has two)."""
    moments = {id(p): (m, v) for pg in opt.param_groups for p, m, v in zip(pg["params"], pg["m"], pg["values"])}
    return [(name, p, *moments[id(p)]) for name, p in model.lora_state_dict().items()]


def load_into(model, opt, tensors):
    """Put a checkpoint's weights and AdamW moments into model and opt."""
    for name, p, m, v in adam_moments(model, opt):
        for key, var in ((f"param/{name}", p), (f"exp_avg/{name}", m), (f"exp_avg_sq/{name}", v)):
            var.update(jt.array(tensors[key]))


def prune_checkpoints(out, keep, newest):
    """Delete all but the `keep` newest checkpoints up to `newest`, the one just written and
    verified (keep 0 = keep all). Each is renamed to .deleted-<name> first, so a crash in the
    middle of a deletion never leaves a half checkpoint under a checkpoint's name."""
    if keep <= 0:
        return
    up_to = [p for p in list_checkpoints(out) if checkpoint_step(p) <= checkpoint_step(newest)]
    for old in up_to[:-keep]:
        trash = out / f".deleted-{old.name}"
        with writing(old):
            os.replace(old, trash)
        stop_at("prune")
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------
# Logs

def append_line(path, text):
    with writing(path), open(path, "a", encoding="utf-8") as f:
        stop_at(f"log:{path.name}", before=lambda: (f.write(text[:len(text) // 2]), f.flush()))
        f.write(text + "\n")


def log_step(line, is_json):
    """The step of a log record (step<TAB>loss, or JSON with a "step"), or None if the line is not one."""
    try:
        if is_json:
            step = json.loads(line)["step"]
        else:
            step, loss = line.split()
            step, _ = int(step), float(loss)
        return step if type(step) is int else None
    except (ValueError, KeyError, TypeError):
        return None


def truncate_log(path, last_step, is_json=False, warn=print):
    """Keep the log records up to `last_step` (a resumed run re-does the later ones); a torn
    or unreadable line is dropped with a warning. Rewritten atomically, and only if changed."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    *lines, torn = text.split("\n")  # every record ends with a newline; what follows the last one is torn
    if torn:
        warn(f"warning: {path}:{len(lines) + 1}: torn last line {torn!r} dropped")
    keep = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            keep.append(line + "\n")
            continue
        step = log_step(line, is_json)
        if step is None:
            warn(f"warning: {path}:{lineno}: unreadable line {line!r} dropped")
        elif step <= last_step:
            keep.append(line + "\n")
    if "".join(keep) != text:
        with writing(path):
            atomic_write(path, lambda f: f.write("".join(keep)))


# ----------------------------------------------------------------------------
# One run per output folder

class RunLock:
    """`with RunLock(out):` holds OUTPUT_DIR/.lock (fcntl.flock) for the whole run; raises
    RunInUse naming the folder and the holder (pid, host) when another process has it."""

    def __init__(self, out, log=print):
        self.out, self.path, self.log, self.fd = out, out / ".lock", log, None

    def __enter__(self):
        with writing(self.path):
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "pid and host not yet written"
            os.close(fd)
            raise RunInUse(f"{self.out} is in use by another training run ({holder}); wait for it to end "
                           f"or pass another --output-dir") from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:  # a clean exit empties the file: this run was killed
            self.log(f"note: taking over {self.path} from a run that did not exit cleanly ({previous})")
        me = f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        with writing(self.path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass  # e.g. a full disk; the lock itself goes with the descriptor
        os.close(self.fd)  # closing releases the flock
        self.fd = None


# ----------------------------------------------------------------------------
# Ctrl-C and SIGTERM

class StopSignals:
    """`with StopSignals() as stop:` SIGINT / SIGTERM only set stop.signum (the loop saves a
    checkpoint at the step boundary and raises Stopped); a second signal raises Stopped at
    once. Outside the `with` (and off the main thread) signum stays None."""

    def __init__(self):
        self.signum, self.saved = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise Stopped(signum, f"stopped at once by a second {name}; the last checkpoint is intact, "
                                  f"--resume continues from it")
        self.signum = signum
        print(f"\n{name}: finishing this step and saving a checkpoint, then stopping "
              f"({name} again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        self.saved = {}
