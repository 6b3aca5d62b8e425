"""train_default_lora.py in bf16 and fp16 on the CPU: the loss scaler in optimizer_step (a step
with non-finite gradients is skipped, AdamW counts only the steps taken), resume with the
scaler's state, and the device / precision options."""
import functools
import json
from pathlib import Path

import numpy as np
import pytest

import train_default_lora
from backend.jittor_env import jt
from backend.mixed_precision import LossScaler
from training.train_config import TrainConfig, UsageError
from train_default_lora import train

SAMPLE = str(Path(__file__).resolve().parents[1] / "data" / "squad_sample.json")
SHAPE = "n_layer=2,n_head=2,n_embd=32,n_positions=192,initializer_range=0.1"


def config(out, **kw):
    """A tiny run on the sample file (its own held-out file too: only the loss path matters here)."""
    return TrainConfig(**{**dict(random_base=SHAPE, train_file=SAMPLE, eval_file=SAMPLE, output_dir=str(out),
                                 max_length=160, batch_size=4, max_steps=6, eval_interval=100, save_interval=100,
                                 eval_examples=4, gen_eval_examples=0, lr=3e-3, keep_checkpoints=0,
                                 device="cpu"), **kw})


def state(run):
    """Copies of the LoRA tensors and AdamW's moments."""
    pg = run.opt.param_groups[0]
    return [v.numpy().copy() for v in [*run.model.trainable_parameters(), *pg["m"], *pg["values"]]]


def test_fp16_step_with_non_finite_gradients_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()  # train() makes it, with its lock; here the phases run one by one
    run = train_default_lora.prepare(config(tmp_path / "run", precision="fp16", max_steps=3), resume=False)
    assert run.scaler.scale == 2.0 ** 16 and run.scaler.growth_interval == 2000
    backward, n_steps, trace = run.opt.backward, [], []

    def backward_overflowing_at_step_2(loss):
        backward(loss)
        if run.step == 1:  # as an fp16 overflow would: one gradient entry becomes inf
            g = run.opt.param_groups[0]["grads"][0]
            g.update(g + jt.array(np.where(np.arange(g.numel()) == 3, np.inf, 0).reshape(g.shape).astype("float32")))
    run.opt.backward = backward_overflowing_at_step_2
    step = run.opt.step
    run.opt.step = lambda: (n_steps.append(run.opt.n_step), step())[1]
    real_optimizer_step = train_default_lora.optimizer_step

    def recording_optimizer_step(run_, group):
        before = state(run_)
        out = real_optimizer_step(run_, group)
        trace.append((run_.step + 1, run_.scaler.scale, run_.scaler.skipped_steps,
                      max(np.abs(a - b).max() for a, b in zip(state(run_), before))))
        return out
    monkeypatch.setattr(train_default_lora, "optimizer_step", recording_optimizer_step)
    train_default_lora.train_loop(run, progress=False)
    for step_, scale, skipped, change in trace:
        print(f"step {step_}: loss scale after it {scale:g}, skipped so far {skipped}, "
              f"max |change| of LoRA weights and AdamW moments {change:.2e}")
    assert [t[1] for t in trace] == [2.0 ** 16, 2.0 ** 15, 2.0 ** 15]
    assert [t[2] for t in trace] == [0, 1, 1]
    assert trace[1][3] == 0 and min(t[3] for t in trace if t[0] != 2) > 0  # step 2 changed nothing
    assert n_steps == [1, 2]  # AdamW's bias correction counts the 2 steps taken, as torch's does
    assert len((tmp_path / "run" / "train_loss.txt").read_text().splitlines()) == 3


def test_fp16_resume_with_the_loss_scaler_is_bit_exact(tmp_path, monkeypatch):
    """growth_interval 1: the scale doubles after every good step until fp16 gradients overflow
    for real, so the scale goes both ways and steps are skipped within the run."""
    monkeypatch.setattr(train_default_lora, "LossScaler", functools.partial(LossScaler, growth_interval=1))
    scales = []
    update = LossScaler.update
    monkeypatch.setattr(LossScaler, "update", lambda self: (update(self), scales.append(self.scale)))
    kw = dict(precision="fp16", max_steps=5, save_interval=2)
    full = train(config(tmp_path / "full", **kw), progress=False)
    print(f"\nloss scale after each step: {[f'{s:g}' for s in scales]}")
    assert any(b < a for a, b in zip(scales, scales[1:])) and any(b > a for a, b in zip(scales, scales[1:]))
    saved = json.loads((full / "checkpoint-000004" / "trainer_state.json").read_text())["loss_scaler"]
    print(f"checkpoint-000004's loss_scaler: {saved}")
    assert saved["scale"] == scales[3] and saved["growth_interval"] == 1 and saved["skipped_steps"] > 0
    part = config(tmp_path / "resumed", **kw)
    train(part, stop_after=3, progress=False)  # the last checkpoint is step 2: steps 3 on are re-done
    train(part, resume=True, progress=False)
    for name in ("adapter/adapter_model.safetensors", "train_loss.txt", "checkpoint-000005/trainer_state.json"):
        same = (full / name).read_bytes() == (Path(part.output_dir) / name).read_bytes()
        print(f"{name}: {'identical' if same else 'DIFFERENT'} to the uninterrupted run's")
        assert same


def test_bf16_run_keeps_lora_fp32_and_refuses_a_scaler_state(tmp_path):
    out = train(config(tmp_path / "run", precision="bf16", max_steps=2, save_interval=2, gen_eval_examples=2,
                       max_new_tokens=4), progress=False)
    losses = [float(l.split()[1]) for l in (out / "train_loss.txt").read_text().splitlines()]
    state_json = json.loads((out / "checkpoint-000002" / "trainer_state.json").read_text())
    print(f"\nbf16 losses {losses}; trainer_state.json {state_json}")
    assert len(losses) == 2 and all(np.isfinite(losses)) and "loss_scaler" not in state_json
    assert (out / "predictions.json").is_file()
    from safetensors.numpy import load_file
    assert {str(t.dtype) for t in load_file(str(out / "adapter" / "adapter_model.safetensors")).values()} == {"float32"}
    run = train_default_lora.prepare(config(out, precision="bf16", max_steps=2, save_interval=2), resume=True)
    with pytest.raises(ValueError, match="checkpoint-000002: no loss-scaler state in trainer_state.json .not an "
                                         "fp16 run's checkpoint"):
        train_default_lora.restore_checkpoint(out, run.model, run.opt, print, LossScaler())


def test_device_and_precision_are_usage_errors_before_anything_is_written(tmp_path):
    bad = {"tf32": dict(precision="tf32"), "gpu": dict(device="gpu"), "fp8": dict(precision="fp8")}
    if not jt.has_cuda:
        bad["cuda"] = dict(device="cuda")
    messages = {}
    for name, kw in bad.items():
        with pytest.raises(UsageError) as e:
            train(config(tmp_path / name, **kw), progress=False)
        messages[name] = str(e.value)
        assert not (tmp_path / name).exists()
    print("\n" + "\n".join(messages.values()))
    assert messages["tf32"] == "--precision tf32 is a CUDA tensor-core mode; on the CPU use fp32"
    assert messages["gpu"] == "--device must be auto or cpu or cuda, not 'gpu'"
    assert messages["fp8"] == "--precision must be auto or fp32 or tf32 or bf16 or fp16, not 'fp8'"
    assert messages.get("cuda", "--device cuda: no usable CUDA GPU").startswith("--device cuda: no usable CUDA GPU")
