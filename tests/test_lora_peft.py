"""LoRA against the reference: Hugging Face PEFT on transformers' GPT-2 (PyTorch CPU).

Each test prints the measured difference.
"""
import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model

from helpers import batch_with_padding, make_hf_model, peft_wrap
from backend.jittor_env import jt
from GPT2_jittor import GPT, GPTConfig
from LoRA import LoRAConfig
from lora_models import LoRAGPT
from model_utils import IGNORE_INDEX
from train_default_lora import clip_grad_norm

NAME = "tiny"


def answer_batch(seed, B=3, T=20):
    """Right-padded random tokens, targets only on the last few real tokens (like answers)."""
    ids, mask = batch_with_padding(np.random.default_rng(seed), B, T, 50257, "right")
    targets = np.full(ids.shape, IGNORE_INDEX)
    for b in range(B):
        n = int(mask[b].sum())
        targets[b, n - 5:n - 1] = ids[b, n - 4:n]  # targets[t] = ids[t + 1]
    return ids, mask, targets


def hf_labels(ids, targets):
    """HF labels (unshifted) carrying the same supervision as our aligned targets."""
    labels = np.full(ids.shape, IGNORE_INDEX)
    labels[:, 1:] = targets[:, :-1]
    return labels


def peft_logits(pm, ids, mask):
    with torch.no_grad():
        return pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def copy_ours_to_peft(ours, pm):
    sd = pm.state_dict()
    with torch.no_grad():
        for name, var in ours.lora_state_dict().items():
            key = f"base_model.model.transformer.{name}.default.weight"
            sd[key].copy_(torch.tensor(var.numpy()))


def train_both(ours, opt, pm, topt, steps=30):
    """`steps` AdamW steps (clipping at 1.0) of ours and of the PEFT model on the same batches,
    dropout off on both sides (eval mode: the same function). Returns (worst per-step relative
    loss difference, [(our loss, PEFT's loss), ...])."""
    ours.eval()
    pm.eval()
    worst, losses = 0.0, []
    for step in range(steps):
        ids, mask, targets = answer_batch(100 + step % 7)
        _, loss = ours(jt.array(ids), jt.array(targets), attention_mask=jt.array(mask))
        opt.backward(loss)
        clip_grad_norm(opt, 1.0)
        opt.step()
        out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(hf_labels(ids, targets)))
        topt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in pm.parameters() if p.requires_grad], 1.0)
        topt.step()
        worst = max(worst, abs(loss.item() - out.loss.item()) / abs(out.loss.item()))
        losses.append((loss.item(), out.loss.item()))
    return worst, losses


@pytest.mark.parametrize("targets,r", [(("c_attn",), 4), (("c_attn", "c_proj", "c_fc"), 8), (("mlp.c_proj", "c_fc"), 2)])
def test_peft_adapter_loads_with_equal_logits(hf_checkpoints, impl, tmp_path, targets, r):
    pm = peft_wrap(make_hf_model(NAME), r, 2 * r, targets, init=False)  # random A and B
    pm.save_pretrained(str(tmp_path))
    ours = impl(LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path))
    ids, mask, _ = answer_batch(0)
    diff = np.abs(ours(jt.array(ids), attention_mask=jt.array(mask)).numpy() - peft_logits(pm, ids, mask))[mask > 0].max()
    print(f"\nPEFT adapter {targets} r={r} -> ours: max |logits diff| = {diff:.3e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_gradients_match_peft(hf_checkpoints, impl, tmp_path, rslora):
    pm = peft_wrap(make_hf_model(NAME), 4, 8, ("c_attn", "c_proj", "c_fc"), init=False, rslora=rslora)
    pm.save_pretrained(str(tmp_path))
    # eval mode on both sides: no dropout anywhere (GPT-2's own dropouts are 0.1), and
    # gradients still flow (our eval() never touches requires-grad flags).
    ours = impl(LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path, dropout=0.0)).eval()
    ids, mask, targets = answer_batch(1)
    _, loss = ours(jt.array(ids), jt.array(targets), attention_mask=jt.array(mask))
    names = list(ours.lora_state_dict())
    grads = jt.grad(loss, ours.trainable_parameters())
    pm.eval()
    out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(hf_labels(ids, targets)))
    out.loss.backward()
    ref = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    worst = 0.0
    for name, g in zip(names, grads):
        r = ref[f"base_model.model.transformer.{name}.default.weight"]
        rel = np.linalg.norm(g.numpy() - r) / np.linalg.norm(r)
        worst = max(worst, rel)
    print(f"\ngradients (rslora={rslora}): loss {loss.item():.6f} vs PEFT {out.loss.item():.6f}; "
          f"worst relative error over {len(names)} tensors = {worst:.3e}")
    assert worst <= 1e-4


def test_trained_adapter_loads_in_peft(hf_checkpoints, impl, tmp_path):
    ours = impl(LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(r=4, alpha=8, dropout=0.1)))
    opt = jt.optim.AdamW(ours.trainable_parameters(), lr=1e-2, weight_decay=0.01)
    ours.train()
    for step in range(3):
        ids, mask, targets = answer_batch(10 + step)
        _, loss = ours(jt.array(ids), jt.array(targets), attention_mask=jt.array(mask))
        opt.step(loss)
    ours.eval()
    ours.save_lora_weights(tmp_path)
    pm = PeftModel.from_pretrained(make_hf_model(NAME), str(tmp_path)).eval()
    ids, mask, _ = answer_batch(20)
    diff = np.abs(ours(jt.array(ids), attention_mask=jt.array(mask)).numpy() - peft_logits(pm, ids, mask))[mask > 0].max()
    print(f"\nours (3 AdamW steps) -> PeftModel.from_pretrained: max |logits diff| = {diff:.3e}")
    assert diff <= 1e-4
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["fan_in_fan_out"] is True


def test_training_curve_matches_peft_adamw(hf_checkpoints, impl):
    """30 AdamW steps (weight decay, eps, clipping) from identical weights and batches."""
    ours = impl(LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(r=4, alpha=8, dropout=0.0)))
    pm = peft_wrap(make_hf_model(NAME), 4, 8, ("c_attn", "c_proj", "c_fc"))
    copy_ours_to_peft(ours, pm)  # same kaiming A, zero B
    hp = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt = jt.optim.AdamW(ours.trainable_parameters(), **hp)
    topt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], **hp)
    worst, losses = train_both(ours, opt, pm, topt)
    print(f"\n30 AdamW steps: loss {losses[0][0]:.5f} -> {losses[-1][0]:.5f} (PEFT {losses[0][1]:.5f} -> "
          f"{losses[-1][1]:.5f}); worst per-step relative loss difference = {worst:.3e}")
    assert losses[-1][0] < losses[0][0] - 0.1  # it learned something
    assert worst <= 1e-4


def test_merge_unmerge_export(hf_checkpoints, impl, tmp_path):
    """Absolute 1e-5 on logits needs logits of GPT-2's size, hence GPT-2's own init here
    (with the 0.2 init of "tiny", |logits| reach ~100 and float32 rounding alone is ~1e-5)."""
    from transformers import GPT2LMHeadModel
    pm = peft_wrap(make_hf_model("tiny-gpt2init"), 4, 8, ("c_attn", "c_proj", "c_fc"), init=False)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ours = impl(LoRAGPT.from_pretrained(hf_checkpoints("tiny-gpt2init"), tmp_path / "adapter"))
    ids, mask, _ = answer_batch(3)
    x, m = jt.array(ids), jt.array(mask)
    before = ours(x, attention_mask=m).numpy()
    base = {k: v.numpy().copy() for k, v in ours.model.hf_state_dict().items()}
    ours.merge()
    merged = ours(x, attention_mask=m).numpy()
    once = {k: v.numpy().copy() for k, v in ours.model.hf_state_dict().items()}
    ours.merge()  # idempotent
    twice = {k: v.numpy() for k, v in ours.model.hf_state_dict().items()}
    d_merge = np.abs(merged - before)[mask > 0].max()
    d_twice = max(np.abs(once[k] - twice[k]).max() for k in once)
    ours.unmerge()
    d_restore = max(np.abs(v.numpy() - base[k]).max() for k, v in ours.model.hf_state_dict().items())
    changed = sum(not np.array_equal(once[k], base[k]) for k in base)
    print(f"\nmerge (max |logit| {np.abs(before).max():.2f}): |merged - unmerged logits| = {d_merge:.3e}; merge twice vs once = {d_twice:.1e}; "
          f"unmerge vs base weights = {d_restore:.3e}; {changed} tensors changed by merge")
    assert d_merge <= 1e-5 and d_twice == 0 and d_restore <= 1e-6 and changed == 3 * 4
    ours.export_merged(tmp_path / "merged")
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
    d_export = np.abs(peft_logits(hf, ids, mask) - before)[mask > 0].max()
    print(f"export_merged -> transformers: max |logits diff| = {d_export:.3e}")
    assert d_export <= 1e-4
    assert not any(m.merged for m in ours.lora_modules.values())  # export left it unmerged


def test_qv_only_exports_as_equivalent_peft_adapter(hf_checkpoints, tmp_path):
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("c_attn",), qkv=(True, False, True))
    ours = LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), cfg)
    rng = np.random.default_rng(0)
    for m in ours.lora_modules.values():
        m.lora_B.update(jt.array(rng.normal(0, 0.1, m.lora_B.shape).astype(np.float32)))
    assert ours.lora_modules["h.0.attn.c_attn"].lora_A.shape == [8, 64]  # 2 slices x r
    assert ours.lora_modules["h.0.attn.c_attn"].lora_B.shape == [128, 4]  # q and v blocks
    ids, mask, _ = answer_batch(4)
    x, m = jt.array(ids), jt.array(mask)
    logits = ours(x, attention_mask=m).numpy()
    # the k slice gets no update: c_attn's middle third of outputs equals the base model's
    block = ours.lora_modules["h.0.attn.c_attn"]
    delta = block.delta_weight().numpy()
    assert np.abs(delta[:, 64:128]).max() == 0 and np.abs(delta[:, :64]).max() > 0
    ours.save_lora_weights(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    pm = PeftModel.from_pretrained(make_hf_model(NAME), str(tmp_path)).eval()
    diff = np.abs(peft_logits(pm, ids, mask) - logits)[mask > 0].max()
    back = LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path)
    diff_back = np.abs(back(x, attention_mask=m).numpy() - logits)[mask > 0].max()
    print(f"\nq/v-only r=4 -> PEFT rank-8 c_attn adapter (rank_pattern {saved['rank_pattern']['h.0.attn.c_attn']}): "
          f"max |logits diff| = {diff:.3e}; reloaded by us: {diff_back:.3e}")
    assert diff <= 1e-4 and diff_back <= 1e-4


@pytest.mark.parametrize("case", ["default", "qkv_rank4", "attn_only_r16"])
def test_trainable_parameter_counts_equal_peft(case):
    from transformers import GPT2Config, GPT2LMHeadModel
    if case == "default":
        hf_kw, ours_cfg, peft_kw = {}, LoRAConfig(), dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
    elif case == "qkv_rank4":
        hf_kw = dict(n_layer=3, n_head=4, n_embd=64)
        ours_cfg, peft_kw = LoRAConfig(r=4, target_modules=("c_attn", "c_fc")), dict(r=4, target_modules=["c_attn", "c_fc"])
    else:
        hf_kw = dict(n_layer=2, n_head=4, n_embd=128)
        ours_cfg, peft_kw = LoRAConfig(r=16, target_modules=("attn.c_proj", "c_attn")), dict(r=16, target_modules=["attn.c_proj", "c_attn"])
    pm = get_peft_model(GPT2LMHeadModel(GPT2Config(**hf_kw)), PeftLoraConfig(fan_in_fan_out=True, **peft_kw))
    buf = io.StringIO()
    with redirect_stdout(buf):
        pm.print_trainable_parameters()
    base_cfg = GPTConfig(**{k: v for k, v in hf_kw.items()})
    with redirect_stdout(io.StringIO()):
        line = LoRAGPT(GPT(base_cfg), ours_cfg).print_trainable_parameters()
    print(f"\n[{case}] ours: {line}\n[{case}] PEFT: {buf.getvalue().strip()}")
    assert line == buf.getvalue().strip()
    if case == "default":
        assert line == "trainable params: 1,179,648 || all params: 125,619,456 || trainable%: 0.9391"


def test_base_weights_frozen_through_train_eval_switching(hf_checkpoints, impl):
    ours = impl(LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(r=4, alpha=8)))
    before = {k: v.numpy().tobytes() for k, v in ours.model.hf_state_dict().items()}
    lora_before = {k: v.numpy().copy() for k, v in ours.lora_state_dict().items()}
    opt = jt.optim.AdamW(ours.trainable_parameters(), lr=1e-2)
    for step in range(3):
        ours.eval()  # Jittor's own eval()/train() would re-enable gradients on the base here
        ours.train()
        ids, mask, targets = answer_batch(30 + step)
        _, loss = ours(jt.array(ids), jt.array(targets), attention_mask=jt.array(mask))
        opt.step(loss)
    after = {k: v.numpy().tobytes() for k, v in ours.model.hf_state_dict().items()}
    assert before == after, "a base weight changed during LoRA training"
    assert all(not np.array_equal(v.numpy(), lora_before[k]) for k, v in ours.lora_state_dict().items())
    assert all(v.is_stop_grad() for v in ours.model.hf_state_dict().values())


def test_dropout_only_in_training_mode(hf_checkpoints, impl):
    ours = impl(LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(r=4, alpha=8, dropout=0.5)))
    for m in ours.lora_modules.values():
        m.lora_B.update(jt.ones(m.lora_B.shape) * 0.05)
    ids = jt.array(np.random.default_rng(5).integers(0, 50257, (1, 8)))
    ours.eval()
    a, b = ours(ids).numpy(), ours(ids).numpy()
    ours.train()
    c = ours(ids).numpy()
    print(f"\nLoRA dropout 0.5: eval twice max |diff| = {np.abs(a - b).max():.1e}; "
          f"eval vs train max |diff| = {np.abs(a - c).max():.2e}")
    assert np.array_equal(a, b) and not np.allclose(a, c)


# --- bad adapters: clear errors by message --------------------------------------

def _peft_adapter(tmp_path, name, **kw):
    pm = peft_wrap(make_hf_model(name), 4, 8, ("c_attn", "c_proj", "c_fc"), init=False, **kw)
    pm.save_pretrained(str(tmp_path))
    return tmp_path


def test_adapter_for_wider_base_is_rejected(hf_checkpoints, tmp_path):
    """A real PEFT adapter made on a 128-wide GPT-2 (same layers and key names) against our
    64-wide base; the same base takes the adapter made for its own width."""
    _peft_adapter(tmp_path / "own", NAME)
    own = LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path / "own")
    assert own.lora_modules["h.0.attn.c_attn"].lora_A.shape == [4, 64]
    wide = peft_wrap(make_hf_model(NAME, n_embd=128), 4, 8, ("c_attn", "c_proj", "c_fc"), init=False)
    wide.save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: h.0.attn.c_attn.lora_A has shape \(4, 128\), "
                                         r"expected \(4, 64\): the adapter was made for a different base model "
                                         r"\(n_embd=64\)") as e:
        LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path / "wide")
    print(f"\n{e.value}")


def test_missing_and_extra_adapter_keys(hf_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file
    adapter = _peft_adapter(tmp_path, "tiny")
    t = load_file(str(adapter / "adapter_model.safetensors"))
    del t["base_model.model.transformer.h.2.mlp.c_fc.lora_B.weight"]
    save_file(t, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['h.2.mlp.c_fc.lora_B'\]"):
        LoRAGPT.from_pretrained(hf_checkpoints(NAME), adapter)
    t["base_model.model.transformer.h.7.attn.c_attn.lora_A.weight"] = np.zeros((4, 64), np.float32)
    t["base_model.model.transformer.h.2.mlp.c_fc.lora_B.weight"] = np.zeros((256, 4), np.float32)
    save_file(t, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['h.7.attn.c_attn.lora_A'\]"):
        LoRAGPT.from_pretrained(hf_checkpoints(NAME), adapter)


def test_non_lora_and_missing_config(hf_checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 20}))
    with pytest.raises(ValueError, match="peft_type is 'PREFIX_TUNING'; only LoRA adapters"):
        LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["c_attn"], "init_lora_weights": "loftq"}))
    with pytest.raises(ValueError, match="init_lora_weights='loftq' is not supported"):
        LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path)


def test_unknown_target_module_is_an_error(hf_checkpoints):
    with pytest.raises(ValueError, match=r"LoRA target modules \['q_proj'\] not found"):
        LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(target_modules=("c_attn", "q_proj")))
