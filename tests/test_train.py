"""train_default_lora.py: outputs, resume equality, errors, schedule, accumulation."""
import json
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import train_default_lora
from helpers import write_sample_split
from gpt2_lora_dataset import batches, encode_dataset, load_squad_json, rank_share, read_squad
from model_utils import evaluate_squad, load_tokenizer
from test_generation import subset_dataset
from training.train_config import AT_LEAST_ONE, DEMO_OVERRIDES, TrainConfig, UsageError, learning_rate, parse_args
from train_default_lora import train

ROOT = Path(__file__).resolve().parents[1]
TINY = "n_layer=2,n_head=2,n_embd=32,n_positions=256,initializer_range=0.1"


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    """The project's sample file split by article into a train and a held-out file."""
    return write_sample_split(tmp_path_factory.mktemp("data"))


def tiny_cfg(split_files, out, **kw):
    train_file, eval_file = split_files
    base = dict(random_base=TINY, train_file=str(train_file), eval_file=str(eval_file), output_dir=str(out),
                max_length=192, batch_size=4, epochs=2, max_steps=9, eval_interval=3, save_interval=3,
                eval_examples=8, gen_eval_examples=0, lr=3e-3, warmup_steps=2, keep_checkpoints=0)
    base.update(kw)
    return TrainConfig(**base)


def adapter_tensors(out):
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def assert_same_run(full, resumed, what):
    """The resumed run ends with the uninterrupted run's adapter and logs, bit for bit."""
    a, b = adapter_tensors(full), adapter_tensors(resumed)
    diff = max(np.abs(a[k] - b[k]).max() for k in a)
    print(f"\n{what}: max |adapter difference| vs uninterrupted run = {diff:.1e}")
    assert a.keys() == b.keys() and diff == 0
    assert (Path(full) / "train_loss.txt").read_text() == (Path(resumed) / "train_loss.txt").read_text()
    assert (Path(full) / "val_loss.txt").read_text() == (Path(resumed) / "val_loss.txt").read_text()


def record_training_batches(monkeypatch, train_file):
    """A list that fills with the question ids of every training micro-batch, in order."""
    train_ids = {ex.id for ex in read_squad(train_file)[0]}
    seen, collate = [], train_default_lora.collate

    def recording_collate(features):
        ids = [f.id for f in features]
        if set(ids) <= train_ids:  # held-out batches go through collate too
            seen.append(ids)
        return collate(features)
    monkeypatch.setattr(train_default_lora, "collate", recording_collate)
    return seen


def test_outputs_and_logs(split_files, tmp_path):
    out = train(tiny_cfg(split_files, tmp_path / "run", gen_eval_examples=4, train_gen_eval_examples=4), progress=False)
    names = {p.name for p in out.iterdir()}
    for expected in ("config.json", "train_loss.txt", "val_loss.txt", "metrics.jsonl", "adapter", "base_model",
                     "predictions.json", "predictions_train.json", "scores.json", "curves.png",
                     "checkpoint-000003", "checkpoint-000006", "checkpoint-000009"):
        assert expected in names, expected
    steps = [int(l.split()[0]) for l in (out / "train_loss.txt").read_text().splitlines()]
    assert steps == list(range(1, 10))
    assert [int(l.split()[0]) for l in (out / "val_loss.txt").read_text().splitlines()] == [0, 3, 6, 9]
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(rec) >= {"step", "loss", "lr", "tokens_per_s", "elapsed_s"}
    # scores.json holds the official metric of the written predictions, on exactly those questions
    scores = json.loads((out / "scores.json").read_text())
    for name, preds_file, data_file in (("heldout", "predictions.json", split_files[1]),
                                        ("train", "predictions_train.json", split_files[0])):
        preds = json.loads((out / preds_file).read_text())
        assert list(preds) == [ex.id for ex in read_squad(data_file)[0][:4]]
        expected = evaluate_squad(subset_dataset(load_squad_json(data_file), set(preds)), preds)
        print(f"\n{name}: scores.json {scores[name]}, recomputed {expected}")
        assert scores[name] == {**expected, "questions": 4}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["r"] == 8 and cfg["alpha"] == 16 and cfg["targets"] == "c_attn,c_proj,c_fc"
    peft_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 8
    assert not list(out.glob(".tmp-*")), "a temporary checkpoint folder was left behind"


@pytest.mark.parametrize("stop_after", [3, 5])  # right after a save, and between saves (a crash)
def test_resume_ends_with_the_same_adapter(split_files, tmp_path, stop_after):
    # Dropout on, so the resumed run must also reproduce the random masks.
    full = train(tiny_cfg(split_files, tmp_path / "full", dropout=0.1), progress=False)
    cfg = tiny_cfg(split_files, tmp_path / "resumed", dropout=0.1)
    train(cfg, stop_after=stop_after, progress=False)
    assert not (tmp_path / "resumed" / "adapter").exists()
    train(cfg, resume=True, progress=False)
    assert_same_run(full, tmp_path / "resumed", f"resume after step {stop_after}")


@pytest.mark.parametrize("grad_accum,bucket", [(1, False), (2, True)])
def test_every_epoch_trains_in_its_own_order(split_files, tmp_path, monkeypatch, grad_accum, bucket):
    """Epoch e trains on batches(..., epoch=e) of the global batch, each cut into grad_accum
    micro-batches by rank_share: the examples of every micro-batch, in order."""
    cfg = tiny_cfg(split_files, tmp_path / "run", epochs=2, max_steps=0, grad_accum=grad_accum, bucket=bucket,
                   eval_interval=100, save_interval=100)
    seen = record_training_batches(monkeypatch, cfg.train_file)
    train(cfg, progress=False)
    features, _ = encode_dataset(load_tokenizer(), read_squad(cfg.train_file)[0], cfg.max_length, cfg.loss_on)
    per_epoch = [[[features[i].id for i in micro]
                  for b in batches(features, cfg.batch_size * grad_accum, cfg.seed, e, bucket=bucket)
                  for micro in rank_share(b, 1, 0, grad_accum) if micro]
                 for e in range(cfg.epochs)]
    assert per_epoch[0] != per_epoch[1], "both epochs in one order: the test could not see the bug"
    n = len(per_epoch[0])
    print(f"\n{len(seen)} micro-batches trained; epoch 2 starts with {seen[n][:3]}..., "
          f"batches(epoch=1) with {per_epoch[1][0][:3]}..., batches(epoch=0) with {per_epoch[0][0][:3]}...")
    assert seen[:n] == per_epoch[0]
    assert seen[n:] == per_epoch[1]


def test_resume_in_a_later_epoch_equals_the_uninterrupted_run(split_files, tmp_path):
    """Stopped inside epoch 2, between two saves, with gradient accumulation and length buckets."""
    # 36 questions / global batch 8 = 5 optimizer steps per epoch (one of them, anywhere in the
    # bucketed order, has 4 questions in two micro-batches of 2): epoch 2 is steps 6-10; saves
    # at 4, 8, 12 and 15.
    kw = dict(epochs=3, max_steps=0, grad_accum=2, bucket=True, save_interval=4, eval_interval=5, dropout=0.1)
    full = train(tiny_cfg(split_files, tmp_path / "full", **kw), progress=False)
    cfg = tiny_cfg(split_files, tmp_path / "resumed", **kw)
    train(cfg, stop_after=9, progress=False)
    state = json.loads((tmp_path / "resumed" / "checkpoint-000008" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches"]) == (1, 3), state  # the restart point lies inside epoch 2
    train(cfg, resume=True, progress=False)
    assert_same_run(full, tmp_path / "resumed", "resume inside epoch 2 (after step 9, from step 8)")


def test_resume_refuses_other_settings_and_fresh_run_refuses_old_checkpoints(split_files, tmp_path):
    cfg = tiny_cfg(split_files, tmp_path / "run", max_steps=3)
    train(cfg, progress=False)
    # `--output-dir DIR --resume` alone continues with the run's saved settings
    resumed, resume = parse_args(["--output-dir", str(tmp_path / "run"), "--resume"])
    assert resume and resumed == cfg
    assert parse_args(["--output-dir", str(tmp_path / "run"), "--resume", "--max-steps", "5"])[0].max_steps == 5
    with pytest.raises(UsageError, match=r"--resume with different settings \(lr: 0.003 -> 0.01\)"):
        train(replace(cfg, lr=0.01), resume=True, progress=False)
    with pytest.raises(UsageError, match="already holds checkpoints: pass --resume"):
        train(cfg, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(split_files, tmp_path):
    cfg = tiny_cfg(split_files, tmp_path / "run", lr=1e9, clip=0.0, warmup_steps=0, max_steps=30,
                   save_interval=1, epochs=10)
    with pytest.raises(SystemExit, match=r"loss is (nan|inf) at step (\d+).*The last good checkpoint is .*checkpoint-") as e:
        train(cfg, progress=False)
    print(f"\n{e.value}")
    ckpts = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert ckpts and all((c / "adapter_model.safetensors").is_file() for c in ckpts)


def test_grad_accumulation_keeps_adamw_bias_correction(split_files, tmp_path):
    """Jittor counts backward() calls as optimizer steps; with 2 micro-batches per step the
    first AdamW update must still be lr * g / (|g| + eps) ~ lr per element (B starts at 0)."""
    cfg = tiny_cfg(split_files, tmp_path / "run", grad_accum=2, batch_size=2, max_steps=1, warmup_steps=0,
                   schedule="constant", lr=1e-3, eval_interval=1, save_interval=1)
    out = train(cfg, progress=False)
    b = [v for k, v in adapter_tensors(out).items() if "c_fc.lora_B" in k][0]
    moved = np.abs(b[np.abs(b) > 0])
    print(f"\nfirst step with grad_accum=2: |delta B| median {np.median(moved):.6f} (lr 1e-3)")
    assert abs(np.median(moved) - 1e-3) < 1e-5


def test_gradient_clipping_sums_the_norm_accurately():
    """The clipping coefficient over GPT-2 124M's 1.2 million LoRA gradients (r=8), against
    float64: ours as close as torch's clip_grad_norm_; Jittor's Optimizer.clip_grad_norm (one
    float32 running sum) is ~1e-3 off, which made AdamW's later steps drift from PyTorch's."""
    import torch
    from backend.jittor_env import jt
    rng = np.random.default_rng(0)
    shapes = [(8, 768), (2304, 8), (8, 768), (768, 8), (8, 768), (3072, 8), (8, 3072), (768, 8)] * 12
    grads = [(rng.normal(0, 1, s) * 10 ** rng.uniform(-5, -3)).astype(np.float32) for s in shapes]
    norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    exact = 0.01 / (norm + 1e-6)

    def coefficient(clip):
        params = [jt.zeros(g.shape, "float32") for g in grads]
        opt = jt.optim.AdamW(params, lr=1e-3)
        opt.backward(sum((p * jt.array(g)).sum() for p, g in zip(params, grads)))
        clip(opt)
        return np.concatenate([(c.numpy() / g).ravel() for c, g in zip(opt.param_groups[0]["grads"], grads)])

    ours = coefficient(lambda opt: train_default_lora.clip_grad_norm(opt, 0.01))
    jittors = coefficient(lambda opt: opt.clip_grad_norm(0.01))
    tensors = [torch.zeros(g.shape, requires_grad=True) for g in grads]
    for t, g in zip(tensors, grads):
        t.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_norm_(tensors, 0.01)
    torchs = np.concatenate([(t.grad.numpy() / g).ravel() for t, g in zip(tensors, grads)])
    # the coefficient seen through each gradient element (c / g), its RMS relative error:
    # one element's division rounding would decide a max
    err = {name: float(np.sqrt(np.mean((c / exact - 1) ** 2))) for name, c in
           (("ours", ours), ("torch", torchs), ("Jittor's", jittors))}
    print(f"\nclip coefficient over {sum(g.size for g in grads)} gradients vs float64 (RMS relative error): "
          + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
    assert err["ours"] <= max(2 * err["torch"], 2e-7)


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine")
    lrs = [learning_rate(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.01
    lin = TrainConfig(lr=1.0, warmup_steps=0, schedule="linear")
    assert learning_rate(5, lin, 10) == 0.5
    assert learning_rate(7, TrainConfig(lr=2.0, schedule="constant"), 10) == 2.0


# Values given on the command line, per option type: the first of each is one that 0 == False
# made the old parser drop; SAVED: what a --resume'd run's config.json holds (bools: the opposite).
CLI_VALUES = {int: (0, 7), float: (0.0, 0.25), str: ("", "x"), bool: (False, True)}
SAVED = {int: 3, float: 0.5, str: "saved"}


def command_line(name, value):
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + flag[2:]]
    return [flag, str(value)]


@pytest.mark.parametrize("name", [f.name for f in fields(TrainConfig)])
def test_every_option_given_arrives_unchanged(name, tmp_path, monkeypatch):
    """Each TrainConfig field on the command line, zero / false / empty values included, with
    and without --resume and --demo. The others come from the run's saved config.json
    (--resume), else from --demo's settings, else the defaults."""
    monkeypatch.chdir(tmp_path)
    kind = {f.name: f.type for f in fields(TrainConfig)}[name]
    lines = 0
    for value in CLI_VALUES[kind]:
        saved = {f.name: True if f.type is bool else SAVED[f.type] for f in fields(TrainConfig)}
        saved[name] = (not value) if kind is bool else SAVED[kind]
        folders = [TrainConfig.output_dir, DEMO_OVERRIDES["output_dir"]] + ([value] if name == "output_dir" else [])
        for folder in folders:
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / "config.json").write_text(json.dumps(saved))
        for resume in (False, True):
            for demo in (False, True) if name != "demo" else (False,):
                argv = command_line(name, value) + ["--resume"] * resume + ["--demo"] * demo
                cfg, resumed = parse_args(argv)
                assert getattr(cfg, name) == value and type(getattr(cfg, name)) is kind, (argv, getattr(cfg, name))
                demo_on = demo or (name == "demo" and value)
                base = saved if resume else {**asdict(TrainConfig()), **(DEMO_OVERRIDES if demo_on else {})}
                assert asdict(cfg) == {**base, **({"demo": True} if demo else {}), name: value}, argv
                assert resumed == resume
                lines += 1
    print(f"--{name.replace('_', '-')} {' / '.join(map(repr, CLI_VALUES[kind]))}: {lines} command lines, "
          f"all arrive unchanged")


@pytest.mark.parametrize("name", AT_LEAST_ONE)
def test_zero_is_refused_where_it_has_no_meaning(split_files, tmp_path, name):
    """Since 0 reaches train(), --eval-interval 0 etc. must stop with a message, not a ZeroDivisionError."""
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be at least 1, not 0"):
        train(tiny_cfg(split_files, tmp_path / "run", **{name: 0}), progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_help_and_bad_train_file(tmp_path):
    r = subprocess.run([sys.executable, "train_default_lora.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--grad-accum" in r.stdout and "--resume" in r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = subprocess.run([sys.executable, "train_default_lora.py", "--random-base", TINY, "--train-file", str(bad),
                        "--eval-file", str(bad), "--output-dir", str(tmp_path / "o"), "--max-length", "192"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    print("\n" + r.stderr.strip().splitlines()[-1])
    assert r.returncode != 0 and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_cli_trains_end_to_end(split_files, tmp_path):
    train_file, eval_file = split_files
    r = subprocess.run([sys.executable, "train_default_lora.py", "--random-base", TINY, "--train-file", str(train_file),
                        "--eval-file", str(eval_file), "--output-dir", str(tmp_path / "o"), "--max-steps", "3",
                        "--eval-interval", "2", "--eval-examples", "4", "--gen-eval-examples", "2",
                        "--max-length", "192", "--qv-only"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RANDOM-initialised" in r.stderr and "heldout SQuAD EM" in r.stderr
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()
