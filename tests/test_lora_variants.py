"""PEFT's LoRA variants against PEFT itself (transformers' GPT-2, PyTorch CPU): DoRA
(use_dora), PiSSA / OLoRA (init_lora_weights "pissa", "pissa_niter_N", "olora", saved as
PEFT's conversion to a plain LoRA) and LoRA+ (create_loraplus_optimizer's groups).

Each test prints the measured difference; figures also go to the suite's "measured" section.
"""
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer

from helpers import make_hf_model, measured, norm_err, save_hf_model
from backend.jittor_env import jt
from GPT2_jittor import GPT, GPTConfig
from LoRA import LoRAConfig
from lora_models import LoRAGPT
from test_lora_peft import answer_batch, hf_labels, peft_logits, train_both
from training import init_weights

NAME = "tiny"
TARGETS = ("c_attn", "c_proj", "c_fc")
PREFIX = "base_model.model.transformer."


def peft_model(hf, r=4, alpha=8, targets=TARGETS, **kw):
    """transformers' GPT-2 wrapped by PEFT (fan_in_fan_out: GPT-2's Conv1D)."""
    return get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), fan_in_fan_out=True,
                                         lora_dropout=kw.pop("lora_dropout", 0.0), task_type="CAUSAL_LM", **kw))


def randomise(pm, seed=0, scale=0.05):
    """Random B and a magnitude away from ||W||, so the adapter changes every output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def logits_diff(ours, pm, seed):
    ids, mask, _ = answer_batch(seed)
    ref = peft_logits(pm, ids, mask)
    out = ours(jt.array(ids), attention_mask=jt.array(mask)).numpy()
    return float(np.abs(out - ref)[mask > 0].max()), ref


def copy_peft_to_ours(pm, ours):
    """Our LoRA tensors (A, B, magnitude) := PEFT's, by PEFT's parameter names."""
    sd = pm.state_dict()
    for name, var in ours.lora_state_dict().items():
        var.update(jt.array(sd[f"{PREFIX}{name}.default.weight"].numpy()))


# --- DoRA -------------------------------------------------------------------------

def test_dora_adapter_both_ways_equal_logits(hf_checkpoints, impl, tmp_path):
    """A PEFT DoRA adapter (random B, magnitude off ||W||) loads here with PEFT's logits, and
    ours, saved again, loads in PeftModel.from_pretrained with the same logits."""
    pm = peft_model(make_hf_model(NAME), use_dora=True).eval()
    randomise(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = impl(LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path / "peft")).eval()
    d_in, ref = logits_diff(ours, pm, 0)
    ours.save_lora_weights(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    back = PeftModel.from_pretrained(make_hf_model(NAME), str(tmp_path / "ours")).eval()
    d_out, _ = logits_diff(ours, back, 0)
    print(f"\nDoRA: PEFT adapter -> ours max |logits diff| {d_in:.2e} (|logits| up to {np.abs(ref).max():.1f}); "
          f"ours -> PeftModel.from_pretrained {d_out:.2e}")
    measured(f"DoRA logits vs PEFT ({'fused' if ours.model.fused else 'plain'}): PEFT->ours {d_in:.1e}, ours->PEFT {d_out:.1e}")
    assert saved["use_dora"] is True
    from safetensors.numpy import load_file
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(keys) == sorted(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert d_in <= 1e-4 and d_out <= 1e-4


def test_dora_gradients_match_peft(hf_checkpoints, impl, tmp_path):
    """Gradients of A, B and the magnitude (the weight norm detached, as PEFT does)."""
    pm = peft_model(make_hf_model(NAME), use_dora=True, init_lora_weights=False)
    randomise(pm)
    pm.save_pretrained(str(tmp_path))
    ours = impl(LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path, dropout=0.0)).eval()
    ids, mask, targets = answer_batch(1)
    _, loss = ours(jt.array(ids), jt.array(targets), attention_mask=jt.array(mask))
    names = list(ours.lora_state_dict())
    grads = dict(zip(names, jt.grad(loss, ours.trainable_parameters())))
    pm.eval()
    out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(hf_labels(ids, targets)))
    out.loss.backward()
    ref = {n.replace(PREFIX, "").replace(".default.weight", ""): p.grad.numpy()
           for n, p in pm.named_parameters() if p.requires_grad}
    assert sorted(ref) == sorted(names)
    rel = {kind: max(norm_err(grads[n].numpy(), ref[n]) for n in names if n.endswith(kind))
           for kind in ("lora_A", "lora_B", "lora_magnitude_vector")}
    print(f"\nDoRA gradients: loss {loss.item():.6f} vs PEFT {out.loss.item():.6f}; worst relative error per kind "
          + ", ".join(f"{k} {v:.2e}" for k, v in rel.items()))
    measured(f"DoRA gradients vs PEFT ({'fused' if ours.model.fused else 'plain'}): worst relative {max(rel.values()):.1e}")
    assert max(rel.values()) <= 1e-4


class FixedMask(torch.nn.Module):
    """A dropout stand-in with a known mask over the features (the same on both sides)."""

    def __init__(self, keep):
        super().__init__()
        self.keep = torch.tensor(keep)

    def forward(self, x):
        return x * self.keep


class FixedMaskJittor(jt.nn.Module):
    def __init__(self, keep, p):
        self.keep, self.p, self.is_train = keep, p, True

    def execute(self, x):
        return x * jt.array(self.keep)


def test_dora_dropout_is_peft_formula(tmp_path, impl):
    """With dropout on in training, PEFT's DoRA takes the base output on the undropped input
    and the correction (m/n - 1) x'W + (m/n) s x'A^T B^T on the dropped x'. The same known
    mask on both sides (GPT-2's own dropouts off) shows ours computes that formula."""
    hf = make_hf_model(NAME, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = save_hf_model(hf, tmp_path / "base")
    pm = peft_model(make_hf_model(NAME, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), use_dora=True,
                    init_lora_weights=False, lora_dropout=0.5)
    randomise(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ours = impl(LoRAGPT.from_pretrained(base, tmp_path / "adapter"))
    rng = np.random.default_rng(0)
    masks = {n: (rng.random(n) > 0.5).astype(np.float32) * 2 for n in (64, 256)}
    for name, module in pm.named_modules():
        if hasattr(module, "lora_dropout") and "default" in getattr(module, "lora_dropout", {}):
            module.lora_dropout["default"] = FixedMask(masks[module.in_features])
    for m in ours.lora_modules.values():
        m.lora_dropout = FixedMaskJittor(masks[m.weight.shape[0]], 0.5)
    pm.train()
    ours.train()
    ids, mask, _ = answer_batch(2)
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = ours(jt.array(ids), attention_mask=jt.array(mask)).numpy()
    pm.eval()
    no_drop = peft_logits(pm, ids, mask)
    diff, effect = np.abs(out - ref)[mask > 0].max(), np.abs(no_drop - ref)[mask > 0].max()
    print(f"\nDoRA with a fixed dropout mask, training mode: max |ours - PEFT| = {diff:.2e} "
          f"(the mask itself moves the logits by {effect:.2e})")
    assert diff <= 1e-4 and effect > 100 * diff


def test_dora_merge_unmerge_and_export_equal_peft_merged(hf_checkpoints, impl, tmp_path):
    from transformers import GPT2LMHeadModel
    pm = peft_model(make_hf_model("tiny-gpt2init"), use_dora=True).eval()
    randomise(pm, scale=0.2)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ours = impl(LoRAGPT.from_pretrained(hf_checkpoints("tiny-gpt2init"), tmp_path / "adapter")).eval()
    ids, mask, _ = answer_batch(3)
    logits = lambda: ours(jt.array(ids), attention_mask=jt.array(mask)).numpy()  # noqa: E731
    before, base = logits(), {k: v.numpy().copy() for k, v in ours.model.hf_state_dict().items()}
    ours.merge()
    merged = logits()
    ours.merge()  # idempotent
    twice = logits()
    ours.unmerge()
    d_restore = max(norm_err(v.numpy(), base[k]) for k, v in ours.model.hf_state_dict().items())
    d_merge = np.abs(merged - before)[mask > 0].max()
    ours.export_merged(tmp_path / "merged")
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
    peft_merged = pm.merge_and_unload().eval()
    sd_ours, sd_peft = hf.state_dict(), peft_merged.state_dict()
    d_weights = max(norm_err(sd_ours[k].numpy(), sd_peft[k].numpy()) for k in sd_peft)
    d_export = np.abs(peft_logits(hf, ids, mask) - peft_logits(peft_merged, ids, mask))[mask > 0].max()
    print(f"\nDoRA merge: |merged - unmerged logits| {d_merge:.2e}, merge twice {np.abs(twice - merged).max():.1e}, "
          f"unmerge vs base weights (relative) {d_restore:.1e}; export_merged vs PEFT merge_and_unload: weights "
          f"(worst relative) {d_weights:.1e}, logits {d_export:.2e}")
    measured(f"DoRA merged export vs PEFT merge_and_unload: weights {d_weights:.1e}, logits {d_export:.1e}")
    assert d_merge <= 1e-5 and np.array_equal(twice, merged) and d_restore <= 1e-6
    assert d_weights <= 1e-6 and d_export <= 1e-5


# --- 30 AdamW steps against PEFT, per variant ----------------------------------------

CURVES = {
    "dora": dict(ours=dict(use_dora=True), peft=dict(use_dora=True)),
    "pissa": dict(ours=dict(init="pissa"), peft=dict(init_lora_weights="pissa")),
    "loraplus-dora": dict(ours=dict(use_dora=True), peft=dict(use_dora=True), ratio=16),
}


@pytest.mark.parametrize("variant", list(CURVES))
def test_training_curve_matches_peft(hf_checkpoints, impl, variant, request):
    """30 AdamW steps (weight decay, clipping) from the same start: PiSSA from each side's own
    SVD (singular vectors may differ in sign, which changes no step), DoRA and LoRA+ from
    PEFT's A copied into ours."""
    if variant != "dora" and request.node.callspec.params["impl"] == "plain":
        pytest.skip("PiSSA and LoRA+ add no layer code of their own (DoRA's runs on both paths): "
                    "their curves on the fused path, the CPU default, only")
    spec = CURVES[variant]
    ours = impl(LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(r=4, alpha=8, dropout=0.0, **spec["ours"])))
    pm = peft_model(make_hf_model(NAME), **spec["peft"])
    if variant != "pissa":
        copy_peft_to_ours(pm, ours)
    lr, hp = 3e-3, dict(betas=(0.9, 0.999), eps=1e-8)
    ratio = spec.get("ratio")
    if ratio:
        opt = jt.optim.AdamW(ours.loraplus_param_groups(lr, ratio, 0.01), lr=lr, **hp)
        topt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                         loraplus_weight_decay=0.01, **hp)
    else:
        opt = jt.optim.AdamW(ours.trainable_parameters(), lr=lr, weight_decay=0.01, **hp)
        topt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.01, **hp)
    worst, losses = train_both(ours, opt, pm, topt)
    impl_name = "fused" if ours.model.fused else "plain"
    print(f"\n{variant}: 30 AdamW steps, loss {losses[0][0]:.5f} -> {losses[-1][0]:.5f} (PEFT {losses[0][1]:.5f} -> "
          f"{losses[-1][1]:.5f}); worst per-step relative loss difference {worst:.2e}")
    measured(f"{variant} 30-step AdamW curve vs PEFT ({impl_name}): worst relative {worst:.1e}")
    assert losses[-1][0] < losses[0][0] - 0.1
    assert worst <= 1e-4


# --- PiSSA / OLoRA: residual base, saved as PEFT's conversion ------------------------

def test_pissa_residual_and_conversion_equal_peft(hf_checkpoints, tmp_path):
    """Our PiSSA start equals PEFT's (residual base, B0 A0), the model still computes the base
    model, and after training our saved adapter is what PEFT's
    path_initial_model_for_weight_conversion writes: a plain rank-2r LoRA that gives the
    trained model's logits on the ORIGINAL GPT-2, in PEFT and here."""
    ours = LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(r=4, alpha=8, dropout=0.0, init="pissa"))
    pm = peft_model(make_hf_model(NAME), init_lora_weights="pissa")
    sd = pm.state_dict()
    res = max(norm_err(m.weight.numpy(), sd[f"{PREFIX}{n}.base_layer.weight"].numpy()) for n, m in ours.lora_modules.items())
    prod = max(norm_err(m.lora_B.numpy() @ m.lora_A.numpy(), (sd[f"{PREFIX}{n}.lora_B.default.weight"]
                        @ sd[f"{PREFIX}{n}.lora_A.default.weight"]).numpy()) for n, m in ours.lora_modules.items())
    plain = make_hf_model(NAME).eval()
    d_start, _ = logits_diff(ours, plain, 4)
    # train a few steps, then save (ours) and convert (PEFT's recipe) from the same trained tensors
    opt = jt.optim.AdamW(ours.trainable_parameters(), lr=1e-2)
    for step in range(3):
        ids, mask, targets = answer_batch(10 + step)
        _, loss = ours(jt.array(ids), jt.array(targets), attention_mask=jt.array(mask))
        opt.step(loss)
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(tmp_path / "initial"))
    with torch.no_grad():  # PEFT's model := ours (A, B; residuals agree, checked above)
        for name, var in ours.lora_state_dict().items():
            sd[f"{PREFIX}{name}.default.weight"].copy_(torch.tensor(var.numpy()))
    pm.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours.save_lora_weights(tmp_path / "ours")
    cfg_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cfg_peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    on_original = PeftModel.from_pretrained(make_hf_model(NAME), str(tmp_path / "ours")).eval()
    d_peft, _ = logits_diff(ours, on_original, 5)
    d_peft_conv, _ = logits_diff(ours, PeftModel.from_pretrained(make_hf_model(NAME), str(tmp_path / "peft")).eval(), 5)
    reloaded = LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path / "ours")
    d_here, _ = logits_diff(reloaded, on_original, 5)
    print(f"\nPiSSA start vs PEFT: residual base (worst relative) {res:.1e}, B0 A0 {prod:.1e}, logits vs the base "
          f"model {d_start:.1e}. Saved after 3 steps (r {cfg_ours['r']}, alpha {cfg_ours['lora_alpha']}; PEFT's "
          f"conversion r {cfg_peft['r']}, alpha {cfg_peft['lora_alpha']}): trained model vs our adapter on the "
          f"original GPT-2 in PEFT {d_peft:.1e}, vs PEFT's converted adapter {d_peft_conv:.1e}, reloaded here {d_here:.1e}")
    measured(f"PiSSA vs PEFT: residual {res:.1e}; converted adapter on the original base: logits {d_peft:.1e}")
    assert res <= 1e-5 and prod <= 1e-4 and d_start <= 1e-4
    assert (cfg_ours["r"], cfg_ours["lora_alpha"], cfg_ours["init_lora_weights"]) == \
        (cfg_peft["r"], cfg_peft["lora_alpha"], cfg_peft["init_lora_weights"]) == (8, 16, True)
    assert d_peft <= 1e-4 and d_peft_conv <= 1e-4 and d_here <= 1e-4


def test_olora_equals_peft_on_linear_and_converts(hf_checkpoints, tmp_path):
    """PEFT's olora_init skips the fan_in_fan_out transpose and fails on GPT-2's Conv1D; ours is
    what it computes on the same weight as an nn.Linear. The converted adapter applies to the
    original GPT-2 in PEFT."""
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        peft_model(make_hf_model(NAME), init_lora_weights="olora")(torch.tensor([[1, 2, 3]]))
    ours = LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(r=4, alpha=8, dropout=0.0, init="olora"))
    hf = make_hf_model(NAME)
    worst = 0.0
    for name, m in list(ours.lora_modules.items())[:4]:
        conv = hf.transformer.get_submodule(name)
        lin = torch.nn.Sequential(torch.nn.Linear(*conv.weight.shape))
        with torch.no_grad():
            lin[0].weight.copy_(conv.weight.T)
        pl = get_peft_model(lin, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="olora"))
        layer = pl.base_model.model[0]
        ref = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight,
               "W_res": layer.base_layer.weight.T}
        got = {"A": m.lora_A.numpy(), "B": m.lora_B.numpy(), "W_res": m.weight.numpy()}
        worst = max(worst, max(norm_err(got[k], ref[k].detach().numpy()) for k in ref))
    d_start, _ = logits_diff(ours, make_hf_model(NAME).eval(), 4)
    opt = jt.optim.AdamW(ours.trainable_parameters(), lr=1e-2)
    for step in range(3):
        ids, mask, targets = answer_batch(10 + step)
        _, loss = ours(jt.array(ids), jt.array(targets), attention_mask=jt.array(mask))
        opt.step(loss)
    ours.save_lora_weights(tmp_path)
    d_peft, _ = logits_diff(ours, PeftModel.from_pretrained(make_hf_model(NAME), str(tmp_path)).eval(), 5)
    print(f"\nOLoRA vs PEFT's olora_init on nn.Linear: A0, B0, residual worst relative {worst:.1e}; start vs base "
          f"{d_start:.1e}; after 3 steps, converted adapter on the original GPT-2 in PEFT {d_peft:.1e}")
    measured(f"OLoRA vs PEFT (nn.Linear): init {worst:.1e}; converted adapter in PEFT: logits {d_peft:.1e}")
    assert worst <= 1e-5 and d_start <= 1e-4 and d_peft <= 1e-4


def test_pissa_niter_is_torch_svd_lowrank():
    """pissa_niter_N: our randomised SVD is torch.svd_lowrank's algorithm (the sketch drawn from
    NumPy): given the same sketch it gives torch's singular values, and with the same niter it
    captures as much of W as PEFT's torch draw does; W = W_res + s B0 A0 holds exactly."""
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((64, 192)) * 0.2).astype(np.float32)  # a Conv1D weight (in, out)
    exact = np.linalg.svd(W.T, compute_uv=False)[:4]
    A0, B0, res = init_weights.residual_init(W, 4, 2.0, "pissa_niter_2", seed=0, name="h.0.attn.c_attn")
    recon = norm_err(res + 2.0 * (B0 @ A0).T, W)
    torch.manual_seed(0)
    _, S_torch, _ = torch.svd_lowrank(torch.tensor(W.T), 4, niter=2)
    captured = np.linalg.norm(B0 @ A0) * 2.0 / np.linalg.norm(exact)
    torch_captured = float(np.linalg.norm(S_torch.numpy()) / np.linalg.norm(exact))
    print(f"\npissa_niter_2 on a 192x64 weight: reconstruction {recon:.1e}; ||s B0 A0|| / top-4 singular values: "
          f"ours {captured:.4f}, torch.svd_lowrank {torch_captured:.4f}")
    assert recon <= 1e-6 and abs(captured - torch_captured) < 0.05 and 0.85 < captured <= 1 + 1e-6
    # a weight whose top-4 part stands out: two iterations find exact PiSSA's B0 A0
    low = W + 3 * rng.standard_normal((64, 4)).astype(np.float32) @ rng.standard_normal((4, 192)).astype(np.float32)
    A2, B2, _ = init_weights.residual_init(low, 4, 2.0, "pissa_niter_2")
    A_exact, B_exact, _ = init_weights.residual_init(low, 4, 2.0, "pissa")
    assert norm_err(B2 @ A2, B_exact @ A_exact) < 1e-3


# --- LoRA+ ---------------------------------------------------------------------------

def test_loraplus_groups_equal_peft():
    """The same tensors in the same groups with the same lr and weight decay as PEFT's
    create_loraplus_optimizer (A at lr; B and DoRA's 1-D magnitude at lr x ratio)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    ours = LoRAGPT(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, n_positions=64)), LoRAConfig(r=4, alpha=8, use_dora=True))
    pm = peft_model(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64)), use_dora=True)
    topt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01)
    names = {id(p): n.replace(PREFIX, "").replace(".default.weight", "") for n, p in pm.named_parameters()}
    peft_groups = sorted((g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
                         for g in topt.param_groups if g["params"])
    ids = {id(v): k for k, v in ours.lora_state_dict().items()}
    our_groups = sorted((g["lr"], g["weight_decay"], sorted(ids[id(p)] for p in g["params"]))
                        for g in ours.loraplus_param_groups(1e-3, 16, 0.01))
    print(f"\nLoRA+ groups: " + "; ".join(f"lr {lr:g}, wd {wd:g}: {len(ps)} tensors" for lr, wd, ps in our_groups))
    assert our_groups == peft_groups


# --- what stays refused ----------------------------------------------------------------

@pytest.mark.parametrize("init,words", [("loftq", "init_lora_weights='loftq' is not supported"),
                                        ("eva", "init_lora_weights='eva' is not supported"),
                                        ("corda", "init_lora_weights='corda' is not supported"),
                                        ("pissa_niter_4", "init_lora_weights='pissa_niter_4' is not supported")])
def test_unsupported_inits_are_refused_by_name(hf_checkpoints, tmp_path, init, words):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["c_attn"], "init_lora_weights": init}))
    with pytest.raises(ValueError, match=words) as e:
        LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path)
    print(f"\n{e.value}")


def test_bad_variant_combinations_are_refused():
    with pytest.raises(ValueError, match="with use_dora: PEFT cannot save this pair"):
        LoRAConfig(init="pissa", use_dora=True)
    with pytest.raises(ValueError, match="has no q/v-only form"):
        LoRAConfig(init="olora", qkv=(True, False, True))
    with pytest.raises(ValueError, match="pissa_niter_<N> or olora, not 'pissa_niter_x'"):
        LoRAConfig(init="pissa_niter_x")


# --- both training scripts: the alignment run per variant ------------------------------

def products(tensors):
    """{module: B A} (and DoRA's magnitudes) of an adapter file: what the adapter adds, the
    same for singular vectors of either sign (PiSSA's SVD in NumPy vs torch)."""
    out = {k: v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
    for k, A in tensors.items():
        if k.endswith("lora_A.weight"):
            out[k] = tensors[k.replace("lora_A", "lora_B")].astype(np.float64) @ A
    return out


@pytest.mark.parametrize("options", [dict(use_dora=True, loraplus_lr_ratio=4.0), dict(init="pissa"),
                                     dict(init="olora")], ids=["dora+loraplus", "pissa", "olora"])
def test_training_scripts_align_per_variant(tmp_path, options):
    """train_default_lora.py and train_pytorch_lora.py with the variant's options (test_align's
    tiny run, shorter): the same logged losses, and the same saved adapters (PiSSA / OLoRA:
    both converted to a plain LoRA for the original base, which test_generation --adapter
    then loads like any adapter)."""
    import train_default_lora
    import train_pytorch_lora
    from safetensors.numpy import load_file
    from gpt2_lora_dataset import SHARED_SQUAD
    from test_align import max_relative_difference, tiny_cfg
    from test_generation import load_model
    if not (SHARED_SQUAD / "dev-v1.1-train-split.json").is_file():
        pytest.skip(f"real SQuAD splits not found in {SHARED_SQUAD}")
    kw = dict(gen_eval_examples=0, max_train_examples=16, epochs=1, adapter_steps="", **options)
    jittor = train_default_lora.train(tiny_cfg(tmp_path / "jittor", **kw), progress=False)
    pytorch = train_pytorch_lora.train(tiny_cfg(tmp_path / "pytorch", **kw), progress=False)
    _, diff = max_relative_difference(jittor / "train_loss.txt", pytorch / "train_loss.txt")
    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (jittor, pytorch))
    assert sorted(a) == sorted(b)
    rel = norm_err(products(a), products(b))
    cfg_a, cfg_b = (json.loads((run / "adapter" / "adapter_config.json").read_text()) for run in (jittor, pytorch))
    # test_generation --adapter: each run's final adapter on the original base
    ids = jt.array(np.random.default_rng(0).integers(0, 50257, (1, 8)))
    logits = {run: load_model(jittor / "base_model", run / "adapter")[0](ids).numpy() for run in (jittor, pytorch)}
    moved = np.abs(logits[pytorch] - load_model(jittor / "base_model")[0](ids).numpy()).max()
    d_logits = np.abs(logits[jittor] - logits[pytorch]).max()
    name = "+".join(f"{k}={v}" for k, v in options.items())
    print(f"\n{name}: training losses max relative difference Jittor vs PyTorch {diff:.2e}; final adapters "
          f"B A products ||ours - PEFT|| / ||PEFT|| {rel:.2e} (r {cfg_a['r']} / {cfg_b['r']}); loaded by "
          f"test_generation.load_model: logits ours vs PEFT's {d_logits:.2e} (the adapter moves them by {moved:.2e})")
    measured(f"alignment run {name}: losses {diff:.1e}, adapters {rel:.1e}, logits {d_logits:.1e}")
    assert (cfg_a["r"], cfg_a["lora_alpha"], cfg_a["use_dora"]) == (cfg_b["r"], cfg_b["lora_alpha"], cfg_b["use_dora"])
    assert diff <= 1e-4 and d_logits <= 1e-4 and moved > 100 * d_logits
    # PiSSA's converted B A = B A - B0 A0 is a small difference of large terms, and numpy's and
    # torch's SVDs differ by float32 rounding in B0 A0: compared through the logits above
    assert rel <= (1e-3 if options.get("init") == "pissa" else 1e-4)


def test_resume_with_variants_equals_the_uninterrupted_run(tmp_path):
    """DoRA + LoRA+ (two AdamW param groups, the magnitude in B's) and PiSSA (the residual base
    recomputed on resume) checkpoint and resume to exactly the uninterrupted run."""
    from helpers import write_sample_split
    from test_train import assert_same_run, tiny_cfg
    from train_default_lora import train
    split = write_sample_split(tmp_path)
    for name, options in (("dora-loraplus", dict(use_dora=True, loraplus_lr_ratio=8.0)), ("pissa", dict(init="pissa"))):
        full = train(tiny_cfg(split, tmp_path / f"{name}-full", dropout=0.1, **options), progress=False)
        cfg = tiny_cfg(split, tmp_path / f"{name}-resumed", dropout=0.1, **options)
        train(cfg, stop_after=3, progress=False)
        train(cfg, resume=True, progress=False)
        assert_same_run(full, tmp_path / f"{name}-resumed", f"{name}: resume after step 3")
