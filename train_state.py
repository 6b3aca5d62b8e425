"""Training state on disk: checkpoints that resume a run bit-exactly, and the step logs.

A checkpoint-<step>/ folder holds the adapter in PEFT's format (adapter_model.safetensors +
adapter_config.json) and what else a resumed run needs:
    trainer_state.safetensors   param/<name>, exp_avg/<name>, exp_avg_sq/<name>: the LoRA
                                weights and AdamW's two moments, for every adapter tensor
    trainer_state.json          {"step": optimizer steps done, "epoch": the epoch the next
                                step is in (0-based), "micro": micro-batches of it done,
                                and in fp16 "loss_scaler": the LossScaler's state_dict}
It is written into a temporary folder and renamed into place, so a crash never leaves a half
checkpoint. The logs are append-only lines (step<TAB>loss, or JSON with a "step"); a resumed
run cuts them back to its checkpoint's step before it goes on.
"""
import json
import os
import shutil

from jittor_env import jt
from model_utils import atomic_save_safetensors, atomic_write_json, load_safetensors


# ----------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(out, model, opt, state, scaler=None):
    final = out / f"checkpoint-{state['step']:06d}"
    tmp = out / f".tmp-checkpoint-{state['step']:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_lora_weights(tmp)
    tensors = {}
    for (name, p), m, v in zip(model.lora_state_dict().items(), opt.param_groups[0]["m"], opt.param_groups[0]["values"]):
        tensors[f"param/{name}"], tensors[f"exp_avg/{name}"], tensors[f"exp_avg_sq/{name}"] = p.numpy(), m.numpy(), v.numpy()
    atomic_save_safetensors(tmp / "trainer_state.safetensors", tensors)
    if scaler is not None:
        state = {**state, "loss_scaler": scaler.state_dict()}
    atomic_write_json(tmp / "trainer_state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(out):
    done = sorted(p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path, model, opt, scaler=None):
    """Put the checkpoint's weights and AdamW moments into model and opt (and the loss scale
    into scaler); returns its state dict."""
    tensors = load_safetensors(path / "trainer_state.safetensors")
    for (name, p), m, v in zip(model.lora_state_dict().items(), opt.param_groups[0]["m"], opt.param_groups[0]["values"]):
        for key, var in ((f"param/{name}", p), (f"exp_avg/{name}", m), (f"exp_avg_sq/{name}", v)):
            if key not in tensors or tuple(tensors[key].shape) != tuple(var.shape):
                raise ValueError(f"{path}: trainer state does not match this model ({key})")
            var.update(jt.array(tensors[key]))
    state = json.loads((path / "trainer_state.json").read_text())
    if scaler is not None:
        if "loss_scaler" not in state:
            raise ValueError(f"{path}: no loss-scaler state in trainer_state.json (not an fp16 run's checkpoint)")
        scaler.load_state_dict(state["loss_scaler"])
    return state


def prune_checkpoints(out, keep):
    if keep > 0:
        for old in sorted(out.glob("checkpoint-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------
# Logs

def append_line(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")


def truncate_log(path, last_step, is_json=False):
    """Drop log records after `last_step` (a resumed run re-does those steps)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            keep.append(line)
            continue
        step = json.loads(line)["step"] if is_json else int(line.split()[0])
        if step <= last_step:
            keep.append(line)
    path.write_text("".join(l + "\n" for l in keep))
