"""Damaged checkpoints, failed writes and torn log lines (in-process, a tiny random GPT-2).

- Every kind of damage to the newest checkpoint is reported by --resume (folder + what is
  wrong), the checkpoint moved aside and skipped for the newest good one; the resumed run
  ends exactly as an uninterrupted one.
- Pruning never deletes the last good checkpoint before the new one is verified.
- An OSError (ENOSPC, EACCES, EROFS) injected at every write site stops the run with a
  WriteError naming the file and the cause; the checkpoints written before stay intact, and
  the run resumes to exactly the uninterrupted run's adapter and logs.
- A torn last log line is repaired on resume and skipped with a warning by plot_loss.py.
"""
import errno
import json
import os
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import model_utils
import train_default_lora
from training import train_state
from helpers import write_sample_split
from lora_models import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from plot_loss import read_loss_file
from training.train_config import TrainConfig
from train_default_lora import main, prepare, train
from training.train_state import (CheckpointError, WriteError, file_digest, list_checkpoints, read_checkpoint,
                         restore_checkpoint, truncate_log)

TINY = "n_layer=2,n_head=2,n_embd=32,n_positions=256,initializer_range=0.1"


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    return write_sample_split(tmp_path_factory.mktemp("data"))


def tiny_cfg(split_files, out, **kw):
    """4 optimizer steps, a checkpoint (and held-out loss) every 2, one checkpoint kept, one
    question answered at the end: every write site of a run, quickly."""
    base = dict(random_base=TINY, train_file=str(split_files[0]), eval_file=str(split_files[1]), output_dir=str(out),
                max_length=192, batch_size=4, max_steps=4, eval_interval=2, save_interval=2, keep_checkpoints=1,
                eval_examples=8, gen_eval_examples=1, max_new_tokens=3, lr=3e-3, warmup_steps=1, dropout=0.1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(split_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_cfg(split_files, out), progress=False)
    return out


def assert_same_end(reference, out):
    for name in (f"adapter/{ADAPTER_WEIGHTS}", "train_loss.txt", "val_loss.txt", "predictions.json", "scores.json"):
        assert (reference / name).read_bytes() == (out / name).read_bytes(), name


@pytest.fixture
def logged(monkeypatch):
    """The lines train_default_lora logs, in a list."""
    lines = []
    monkeypatch.setattr(train_default_lora, "log", lines.append)
    return lines


# ----------------------------------------------------------------------------
# Damaged checkpoints

def flip_byte(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_with_manifest(ckpt, name, write):
    """Damage that a checksum cannot see: `write` replaces a file and the manifest is updated."""
    write(ckpt / name)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = file_digest(ckpt / name)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def transposed_tensor(path):
    t = load_file(str(path))
    key = next(k for k in t if k.startswith("param/"))
    t[key] = np.ascontiguousarray(t[key].T)
    save_file(t, str(path))


def without_moments(path):
    t = load_file(str(path))
    save_file({k: v for k, v in t.items() if not k.startswith("exp_avg_sq/")}, str(path))


def corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[8:20] = b"not a header"
    path.write_bytes(bytes(data))


# damage -> what the report must say
DAMAGES = {
    "no manifest": (lambda c: (c / "manifest.json").unlink(), "no manifest.json (the checkpoint is incomplete)"),
    "manifest not JSON": (lambda c: (c / "manifest.json").write_text("{"), "manifest.json is not a valid manifest"),
    "a file missing": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "a flipped byte": (lambda c: flip_byte(c / "trainer_state.safetensors"),
                       "trainer_state.safetensors does not match its checksum"),
    "a truncated file": (lambda c: (c / ADAPTER_WEIGHTS).write_bytes((c / ADAPTER_WEIGHTS).read_bytes()[:100]),
                         f"{ADAPTER_WEIGHTS} does not match its checksum"),
    "an unreadable header, checksum updated": (
        lambda c: rewrite_with_manifest(c, "trainer_state.safetensors", corrupt_header), "unreadable"),
    "a tensor of the wrong shape, checksum updated": (
        lambda c: rewrite_with_manifest(c, "trainer_state.safetensors", transposed_tensor),
        "trainer state does not match this model (param/"),
    "AdamW moments missing, checksum updated": (
        lambda c: rewrite_with_manifest(c, "trainer_state.safetensors", without_moments), ": missing, expected"),
    "the state of another step, checksum updated": (
        lambda c: rewrite_with_manifest(c, "trainer_state.json", lambda p: p.write_text(
            json.dumps({"step": 3, "epoch": 0, "batches": 3, "global_batch": 4}))),
            "trainer_state.json is not a state of step 4"),
}


def test_damaged_newest_checkpoint_is_reported_and_skipped(split_files, tmp_path, reference, logged):
    cfg = tiny_cfg(split_files, tmp_path / "run", keep_checkpoints=0)
    out = train(cfg, stop_after=4, progress=False)  # checkpoint-000002 and checkpoint-000004, no final phase
    newest = out / "checkpoint-000004"
    pristine = tmp_path / "pristine"
    shutil.copytree(newest, pristine)
    run = prepare(cfg, resume=True)  # a model and optimizer to restore into
    good = load_file(str(out / "checkpoint-000002" / "trainer_state.safetensors"))
    for what, (damage, report) in DAMAGES.items():
        damage(newest)
        logged.clear()
        state = restore_checkpoint(out, run.model, run.opt, logged.append)
        print(f"\n{what}: {logged[0]}")
        assert logged[0].startswith(f"warning: damaged checkpoint skipped: {newest}: ") and report in logged[0]
        assert state["step"] == 2 and logged[-1].startswith(f"resumed from {out / 'checkpoint-000002'}")
        assert not newest.exists() and (out / "damaged-checkpoint-000004").is_dir()  # moved aside, kept to look at
        for name, p in run.model.lora_state_dict().items():
            assert np.array_equal(p.numpy(), good[f"param/{name}"]), name
        shutil.rmtree(out / "damaged-checkpoint-000004")
        shutil.copytree(pristine, newest)
    print(f"{len(DAMAGES)} kinds of damage reported and skipped")

    # intact, but written before the data position counted global batches: refused, not moved aside
    rewrite_with_manifest(newest, "trainer_state.json", lambda p: p.write_text(
        json.dumps({"step": 4, "epoch": 0, "micro": 4})))
    with pytest.raises(ValueError, match=f"{newest}: written by an older version of this script"):
        restore_checkpoint(out, run.model, run.opt, logged.append)
    assert newest.is_dir()
    shutil.rmtree(newest)
    shutil.copytree(pristine, newest)

    # nothing intact: refused, and nothing moved
    DAMAGES["a flipped byte"][0](newest)
    DAMAGES["no manifest"][0](out / "checkpoint-000002")
    with pytest.raises(CheckpointError, match=f"{out}: no intact checkpoint to resume from \\(2 damaged"):
        restore_checkpoint(out, run.model, run.opt, logged.append)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000002", "checkpoint-000004"]


def test_resume_past_a_damaged_checkpoint_ends_like_the_uninterrupted_run(split_files, tmp_path, reference, logged):
    cfg = tiny_cfg(split_files, tmp_path / "run", keep_checkpoints=0)
    out = train(cfg, stop_after=4, progress=False)
    flip_byte(out / "checkpoint-000004" / ADAPTER_WEIGHTS)
    train(cfg, resume=True, progress=False)
    print(f"\n{[line for line in logged if 'damaged' in line or 'resumed' in line]}")
    assert any(line.startswith("resumed from") and line.endswith("checkpoint-000002 (step 2, epoch 1)") for line in logged)
    assert_same_end(reference, out)


def test_pruning_keeps_the_last_good_checkpoint_until_the_new_one_is_verified(split_files, tmp_path, reference,
                                                                             monkeypatch, logged):
    """keep_checkpoints=1 and a disk that corrupts checkpoint-000004 as it lands: the check
    after writing stops the run before pruning, so checkpoint-000002 is still there."""
    replace_folder = train_state.replace_folder

    def corrupting(tmp, final):
        replace_folder(tmp, final)
        if final.name == "checkpoint-000004":
            flip_byte(final / "trainer_state.safetensors")
    monkeypatch.setattr(train_state, "replace_folder", corrupting)
    cfg = tiny_cfg(split_files, tmp_path / "run")
    with pytest.raises(CheckpointError, match="checkpoint-000004: trainer_state.safetensors does not match") as e:
        train(cfg, progress=False)
    print(f"\n{e.value}")
    out = Path(cfg.output_dir)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000002", "checkpoint-000004"]
    monkeypatch.setattr(train_state, "replace_folder", replace_folder)
    train(cfg, resume=True, progress=False)
    assert any("damaged checkpoint skipped" in line for line in logged)
    assert_same_end(reference, out)


# ----------------------------------------------------------------------------
# Failed writes

ERRNOS = (errno.ENOSPC, errno.EACCES, errno.EROFS)


class Fault:
    """OSError(err) at the `nth` write of `kind` whose path satisfies `match`. ENOSPC comes
    after half the data went out (a full disk tears what it was writing); EACCES / EROFS
    before anything is written."""

    def __init__(self, monkeypatch, kind, match, nth, err):
        self.kind, self.match, self.nth, self.err, self.seen, self.fired = kind, match, nth, err, 0, None
        atomic_write, open_, replace_, os_open, fsync_path = (model_utils.atomic_write, open, os.replace, os.open,
                                                              train_state.fsync_path)

        def due(kind, path):
            if kind == self.kind and self.match(Path(path)):
                self.seen += 1
                if self.seen == self.nth:
                    self.fired = Path(path)
                    return True
            return False

        def error(path=None):
            return OSError(self.err, os.strerror(self.err), *([str(path)] if path else []))

        def fake_atomic_write(path, write_fn, mode="w"):
            if not due("file", path):
                return atomic_write(path, write_fn, mode)

            def failing(f):
                if self.err == errno.ENOSPC:
                    f.write(b"\0" * 10 if "b" in mode else "partial")
                raise error()
            return atomic_write(path, failing, mode)

        class TornFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(inner, text):
                inner.f.write(text[:len(text) // 2])
                inner.f.flush()
                raise error()

        def fake_open(path, mode="r", **kw):
            if "a" in mode and due("append", path):
                if self.err != errno.ENOSPC:
                    raise error(path)
                return TornFile(open_(path, mode, **kw))
            return open_(path, mode, **kw)

        def fake_replace(src, dst):
            if due("rename", dst):
                raise error(src)
            return replace_(src, dst)

        def fake_os_open(path, flags, *args, **kw):
            if due("open", path):
                raise error(path)
            return os_open(path, flags, *args, **kw)

        def fake_fsync_path(path):
            if due("fsync", path):
                raise error()
            return fsync_path(path)

        for target, name, fake in ((model_utils, "atomic_write", fake_atomic_write),
                                   (train_state, "atomic_write", fake_atomic_write),
                                   (train_state, "open", fake_open), (os, "replace", fake_replace),
                                   (os, "open", fake_os_open), (train_state, "fsync_path", fake_fsync_path)):
            monkeypatch.setattr(target, name, fake, raising=False)


def in_checkpoint(step, name):
    return lambda p: p.name == name and p.parent.name == f".tmp-checkpoint-{step:06d}"


# site -> (kind of write, which path, which occurrence, the path the message must name, relative
# to the output folder). Each is hit once per run; a resumed run redoes what comes after.
SITES = {
    "the lock file": ("open", lambda p: p.name == ".lock", 1, ".lock"),
    "config.json": ("file", lambda p: p.name == "config.json", 1, "config.json"),
    "the random base model": ("file", lambda p: p.parent.name == ".tmp-base_model", 1, ".tmp-base_model/model.safetensors"),
    "a train_loss.txt line": ("append", lambda p: p.name == "train_loss.txt", 3, "train_loss.txt"),
    "a metrics.jsonl line": ("append", lambda p: p.name == "metrics.jsonl", 3, "metrics.jsonl"),
    "a val_loss.txt line": ("append", lambda p: p.name == "val_loss.txt", 3, "val_loss.txt"),
    "the logs' fsync before a checkpoint": ("fsync", lambda p: p.name == "metrics.jsonl", 2, "metrics.jsonl"),
    "checkpoint: adapter weights": ("file", in_checkpoint(4, ADAPTER_WEIGHTS), 1,
                                    f".tmp-checkpoint-000004/{ADAPTER_WEIGHTS}"),
    "checkpoint: adapter config": ("file", in_checkpoint(4, ADAPTER_CONFIG), 1,
                                   f".tmp-checkpoint-000004/{ADAPTER_CONFIG}"),
    "checkpoint: trainer_state.safetensors": ("file", in_checkpoint(4, "trainer_state.safetensors"), 1,
                                              ".tmp-checkpoint-000004/trainer_state.safetensors"),
    "checkpoint: trainer_state.json": ("file", in_checkpoint(4, "trainer_state.json"), 1,
                                       ".tmp-checkpoint-000004/trainer_state.json"),
    "checkpoint: manifest.json": ("file", in_checkpoint(4, "manifest.json"), 1, ".tmp-checkpoint-000004/manifest.json"),
    "checkpoint: rename into place": ("rename", lambda p: p.name == "checkpoint-000004", 1,
                                      ".tmp-checkpoint-000004"),
    "pruning: rename for deletion": ("rename", lambda p: p.name.startswith(".deleted-"), 1, "checkpoint-000002"),
    "the final adapter": ("file", lambda p: p.parent.name == ".tmp-adapter", 1, f".tmp-adapter/{ADAPTER_WEIGHTS}"),
    "the final adapter: rename into place": ("rename", lambda p: p.name == "adapter", 1, ".tmp-adapter"),
    "predictions.json": ("file", lambda p: p.name == "predictions.json", 1, "predictions.json"),
    "scores.json": ("file", lambda p: p.name == "scores.json", 1, "scores.json"),
}


@pytest.mark.parametrize("site", SITES)
def test_a_failed_write_stops_with_its_path_and_cause_and_the_run_resumes(site, split_files, tmp_path, reference,
                                                                         monkeypatch, logged):
    kind, match, nth, named = SITES[site]
    err = ERRNOS[list(SITES).index(site) % len(ERRNOS)]
    cfg = tiny_cfg(split_files, tmp_path / "run")
    out = Path(cfg.output_dir)
    with monkeypatch.context() as m:
        fault = Fault(m, kind, match, nth, err)
        with pytest.raises(WriteError) as e:
            train(cfg, progress=False)
    print(f"\n{site}: {e.value}")
    assert fault.fired is not None
    assert str(e.value) == f"cannot write {out / named}: {os.strerror(err)} ({errno.errorcode[err]})"
    before = list_checkpoints(out)
    for ckpt in before:  # what was written before the failure is intact
        read_checkpoint(ckpt, prepare_model(cfg))
    resume = (out / "config.json").is_file()
    logged.clear()
    train(cfg, resume=resume, progress=False)
    damaged = [line for line in logged if "damaged" in line]
    repaired = [line for line in logged if "torn last line" in line]
    print(f"  intact before: {[p.name for p in before]}; resumed: {resume}; repaired: {repaired}")
    assert not damaged, damaged
    assert_same_end(reference, out)


_models = {}


def prepare_model(cfg):
    """A LoRAGPT of cfg's shape, built once (read_checkpoint checks shapes against it)."""
    if "m" not in _models:
        from backend.jittor_env import jt
        from GPT2_jittor import GPT, GPTConfig
        from LoRA import LoRAConfig
        from lora_models import LoRAGPT
        from train_default_lora import parse_shape
        from training.train_config import lora_targets
        _models["m"] = LoRAGPT(GPT(GPTConfig(**parse_shape(cfg.random_base))),
                               LoRAConfig(r=cfg.r, alpha=cfg.alpha, **lora_targets(cfg)))
        # Jittor draws random numbers when an op runs, not when it is built: random init ops
        # left pending here would run inside the next training run and shift its dropout masks.
        jt.sync_all(True)
    return _models["m"]


def test_a_failed_write_on_the_command_line_is_one_line_and_exit_code_1(split_files, tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(split_files, tmp_path / "run")
    argv = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is not None and value is not False:
            argv += [f"--{f.name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    Fault(monkeypatch, "file", in_checkpoint(2, "trainer_state.safetensors"), 1, errno.ENOSPC)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    with capsys.disabled():
        print(f"\nexit {code}: {err[-1]}")
    assert code == 1 and err[-1] == (f"error: cannot write {tmp_path / 'run' / '.tmp-checkpoint-000002'}"
                                     f"/trainer_state.safetensors: No space left on device (ENOSPC)")
    assert not any("Traceback" in line for line in err)


# ----------------------------------------------------------------------------
# Torn log lines

def test_torn_last_lines_are_cut_on_resume(tmp_path):
    warnings = []
    for name, lines, torn, garbage in (
            ("train_loss.txt", ["1\t2.5", "2\t2.25", "3\t2.0"], "4\t1.9", "x\ty"),
            ("val_loss.txt", ["0\t3.0", "2\t2.5"], "4\t2.", "2.5"),
            ("metrics.jsonl", [json.dumps({"step": s, "loss": 2.0}) for s in (1, 2, 3)], '{"step": 4, "lo', "[]")):
        path = tmp_path / name
        path.write_text("\n".join(lines[:1] + [garbage] + lines[1:]) + "\n" + torn)
        truncate_log(path, 2, is_json=name.endswith(".jsonl"), warn=warnings.append)
        assert path.read_text() == "".join(line + "\n" for line in lines if log_step_of(line) <= 2), name
    print("\n" + "\n".join(warnings))
    assert len(warnings) == 6 and all(": torn last line" in w or ": unreadable line" in w for w in warnings)


def log_step_of(line):
    return json.loads(line)["step"] if line.startswith("{") else int(line.split()[0])


def test_plot_loss_skips_a_torn_last_line_with_a_warning(tmp_path, capsys):
    path = tmp_path / "train_loss.txt"
    path.write_text("1\t2.5\n2\t2.25\n3\t2.")
    assert read_loss_file(path) == ([1, 2], [2.5, 2.25])
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\n{err.strip()}")
    assert err == f"warning: {path}:3: torn last line '3\\t2.' skipped\n"
    path.write_text("1\t2.5\n2\t2.25\n")
    assert read_loss_file(path) == ([1, 2], [2.5, 2.25]) and capsys.readouterr().err == ""
