"""The command line a user can guess: --help grouped and fast (no Jittor), PEFT / HF Trainer
spellings beside the seed's, --config FILE (a run's own config.json) under the command line."""
import json
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from helpers import measured
from training.train_config import CLI_GROUPS, TrainConfig, parse_args, spellings

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("model", "LoRA", "data", "optimisation", "evaluation", "output and resume", "device and processes")

# What PEFT / the HF Trainer / litgpt users type, and the field it must reach.
OTHER_TOOLS = {"--lora-r": "r", "--lora_r": "r", "--lora-alpha": "alpha", "--lora_alpha": "alpha",
               "--lora-dropout": "dropout", "--target-modules": "targets", "--target_modules": "targets",
               "--learning-rate": "lr", "--learning_rate": "lr", "--max-grad-norm": "clip",
               "--num-train-epochs": "epochs", "--num_train_epochs": "epochs",
               "--gradient-accumulation-steps": "grad_accum", "--per-device-train-batch-size": "batch_size",
               "--eval-steps": "eval_interval", "--save-steps": "save_interval",
               "--save-total-limit": "keep_checkpoints", "--lr-scheduler-type": "schedule"}
VALUES = {int: "7", float: "0.25", str: "linear"}


@pytest.mark.parametrize("script", ["train_default_lora.py", "test_generation.py"])
def test_help_is_grouped_fast_and_imports_no_jittor(script):
    code = (f"import runpy, sys, time\nsys.argv = [{script!r}, '--help']\nt = time.perf_counter()\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('SECONDS', time.perf_counter() - t, 'jittor' in sys.modules, 'torch' in sys.modules)\n")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    seconds, jittor, torch = r.stdout.strip().splitlines()[-1].split()[1:]
    measured(f"{script} --help: {float(seconds):.2f} s after Python's start ({wall:.2f} s with it), "
             f"Jittor imported: {jittor}")
    assert jittor == "False" and torch == "False" and float(seconds) < 5  # Jittor alone: 2 s warm, minutes cold
    assert "(default: )" not in r.stdout
    if script == "train_default_lora.py":
        heads = [line[:-1] for line in r.stdout.splitlines() if line.endswith(":") and not line.startswith(" ")]
        assert [h for h in heads if h in GROUPS] == list(GROUPS)
        for shown in ("--lora-r N", "--learning-rate X", "--max-grad-norm X", "--device {auto,cpu,cuda}",
                      "--report-to {none,tensorboard}", "--lr-scheduler-type {cosine,linear,constant}",
                      "(default: 8)", "--config FILE", "--debug", "--model-dropout X", "--revision REVISION"):
            assert shown in r.stdout, shown
        flat = " ".join(r.stdout.split())
        assert "--r = --lora-r;" in flat and "--lr = --learning-rate;" in flat and "--clip = --max-grad-norm;" in flat
    else:
        assert "--interactive" in r.stdout and "(default: 32)" in r.stdout and "--adapter" in r.stdout


def test_every_field_in_one_group_and_other_tools_spellings():
    assert sorted(n for g in CLI_GROUPS.values() for n in g) == sorted(f.name for f in fields(TrainConfig))
    assert tuple(CLI_GROUPS) == GROUPS
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    for flag, name in OTHER_TOOLS.items():
        cfg, _ = parse_args([flag, VALUES[kinds[name]]])
        assert str(getattr(cfg, name)) == VALUES[kinds[name]] or getattr(cfg, name) == kinds[name](VALUES[kinds[name]])
    # every spelling of every option reaches its field, the seed's included (--r, --lr, --clip)
    n = 0
    for f in fields(TrainConfig):
        for flag in spellings(f.name):
            argv = [flag] if f.type is bool else [flag, {int: "3", float: "0.5", str: "x"}[f.type]]
            assert getattr(parse_args(argv)[0], f.name) == (True if f.type is bool else f.type(argv[1])), argv
            n += 1
    assert {"--r", "--lr", "--clip", "--alpha", "--dropout", "--targets", "--epochs", "--grad-accum"} <= \
        {s for f in fields(TrainConfig) for s in spellings(f.name)}
    print(f"\n{n} spellings of {len(fields(TrainConfig))} options parsed to their fields")
    assert parse_args(["--model-dropout", "0"])[0].model_dropout == 0.0


def test_config_file_under_the_command_line(tmp_path):
    """--config reads a run's own config.json; options given override it; an unknown key is refused."""
    saved = asdict(TrainConfig(r=4, lr=3e-4, epochs=1, output_dir=str(tmp_path / "old")))
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg, resume = parse_args(["--config", str(tmp_path / "config.json"), "--learning_rate", "1e-3",
                              "--output-dir", str(tmp_path / "new")])
    assert asdict(cfg) == {**saved, "lr": 1e-3, "output_dir": str(tmp_path / "new")} and not resume
    (tmp_path / "bad.json").write_text(json.dumps({"lora_rank": 4}))
    with pytest.raises(ValueError, match=r"bad.json: unknown settings \['lora_rank'\]"):
        parse_args(["--config", str(tmp_path / "bad.json")])


def test_compile_notice_before_a_cold_jittor_cache(tmp_path):
    """backend.jittor_env says, before Jittor's first import compiles its core, that it does so
    (Jittor's own log is silenced). Cold: no jittor_core*.so for this installation in Jittor's
    cache layout; a stand-in `jittor` module keeps the test from compiling for minutes."""
    import hashlib
    import importlib.util
    from importlib import metadata
    code = ("import sys, types\nsys.modules['jittor'] = types.ModuleType('jittor')\n"
            "import backend.jittor_env\n")
    env = {**__import__("os").environ, "JITTOR_HOME": str(tmp_path), "use_mkl": "0"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    print(f"\ncold cache: {r.stderr.strip()}")
    assert f"Jittor compiles its core for this machine" in r.stderr and str(tmp_path / ".cache" / "jittor") in r.stderr
    # the same with the core in place, where Jittor puts it: silent
    key = hashlib.md5(importlib.util.find_spec("jittor_utils").origin.encode()).hexdigest()[:4]
    version = metadata.version("jittor").rsplit(".", 1)[0]
    core = tmp_path / ".cache" / "jittor" / f"jt{version}" / "g++" / "py" / "os" / "cpu" / key / "main"
    core.mkdir(parents=True)
    (core / "jittor_core.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "compiles" not in r.stderr, r.stderr


@pytest.mark.parametrize("script, args", [("train_default_lora.py", ["--random-base", "n_layer=1,n_head=2,n_embd=8",
                                                                      "--train-file", "MISSING.json"]),
                                          ("test_generation.py", ["--model", "MISSING_DIR/x/y", "--context", "c",
                                                                  "--question", "q"])])
def test_debug_shows_the_traceback(script, args, tmp_path):
    """--debug adds the traceback to the one-line error (which tests/test_train.py and
    tests/test_generation_cli.py check without it)."""
    args = [a.replace("MISSING", str(tmp_path / "missing")) for a in args]
    if script == "train_default_lora.py":
        args += ["--output-dir", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, script, *args, "--debug"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    last = r.stderr.strip().splitlines()[-1]
    print(f"\n{script} --debug: {len(r.stderr.splitlines())} lines, the last: {last}")
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert last.startswith("error: ") or "Error: " in last
    assert str(tmp_path / "missing") in r.stderr
