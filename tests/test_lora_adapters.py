"""Which modules get LoRA, modules_to_save, and several adapters in one model, against PEFT
0.21 on transformers' GPT-2 (PyTorch CPU). Each test prints the measured difference.
"""
import io
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from helpers import make_hf_model, measured, norm_err
from test_lora_peft import answer_batch, hf_labels, peft_logits
from backend.jittor_env import jt
from GPT2_jittor import GPT
from LoRA import LoRAConfig
from lora_models import LoRAGPT
from test_generation import load_model
from training.train_config import TrainConfig, UsageError, check, lora_targets, parse_args

NAME = "tiny"  # 3 blocks, n_embd 64


def peft_model(adapters, init=False):
    """GPT-2 "tiny" with PEFT adapters {name: LoraConfig kwargs}, the first one active; random A and B."""
    (first, kw), *rest = adapters.items()
    pm = get_peft_model(make_hf_model(NAME), LoraConfig(fan_in_fan_out=True, init_lora_weights=init, **kw),
                        adapter_name=first)
    for name, kw in rest:
        pm.add_adapter(name, LoraConfig(fan_in_fan_out=True, init_lora_weights=init, **kw))
    with torch.no_grad():  # a saved module's copy different from the original, so a mix-up shows
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.3 * torch.randn_like(p))
    return pm.eval()


def peft_targets(pm, adapter):
    """{PEFT module name: (r, scaling)} of the layers that hold `adapter`."""
    return {n[len("base_model.model."):]: (m.r[adapter], m.scaling[adapter]) for n, m in pm.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def our_targets(ours, adapter):
    ours.set_adapter(adapter)
    return {"transformer." + n: (m.r, m.scaling) for n, m in ours.lora_modules.items()}


def logits(model, ids, mask):
    return model(jt.array(ids), attention_mask=jt.array(mask)).numpy()


def max_diff(a, b, mask):
    return float(np.abs(a - b)[mask > 0].max())


# --- which modules: the same selection as PEFT's -------------------------------------

SELECTIONS = {
    "regex": dict(target_modules=r".*\.h\.[02]\.(attn\.c_attn|mlp\.c_proj)"),
    "list+exclude": dict(target_modules=["c_attn", "c_proj"], exclude_modules=["h.1.attn.c_proj", "mlp.c_proj"]),
    "exclude-regex": dict(target_modules=["c_fc", "c_proj"], exclude_modules=r".*\.h\.0\..*"),
    "layers+pattern": dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[0, 2], layers_pattern="h"),
    "one-layer": dict(target_modules=["c_proj"], layers_to_transform=1),
    # a whole name is taken before the layer filter (PEFT's order of checks)
    "full-name+layers": dict(target_modules=["transformer.h.0.attn.c_attn", "c_fc"], layers_to_transform=[2]),
    "patterns": dict(target_modules=["c_attn", "c_proj", "c_fc"], rank_pattern={r"transformer\.h\.1\..*": 2, "c_fc": 6},
                     alpha_pattern={"h.2.attn.c_attn": 3, "mlp.c_proj": 20}),
    "modules_to_save": dict(target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f", "h.1.mlp.c_fc"]),
}


@pytest.mark.parametrize("case", list(SELECTIONS))
def test_selected_modules_equal_peft(hf_checkpoints, case):
    kw = {"r": 4, "lora_alpha": 8, **SELECTIONS[case]}
    pm = peft_model({"default": kw})
    ours_cfg = LoRAConfig(r=4, alpha=8, **{k: v for k, v in SELECTIONS[case].items()})
    ours = LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), ours_cfg)
    theirs, mine = peft_targets(pm, "default"), our_targets(ours, "default")
    saved_theirs = sorted(n[len("base_model.model."):-len(".modules_to_save.default.weight")]
                          for n, _ in pm.named_parameters() if n.endswith(".modules_to_save.default.weight"))
    saved_mine = sorted("transformer." + n for n in ours._saved["default"])
    print(f"\n[{case}] {len(mine)} LoRA modules, ranks {sorted({r for r, _ in mine.values()})}; saved {saved_mine}; "
          f"same as PEFT: {mine.keys() == theirs.keys()}")
    assert mine.keys() == theirs.keys()
    assert all(mine[k][0] == theirs[k][0] and abs(mine[k][1] - theirs[k][1]) < 1e-12 for k in mine)
    assert saved_mine == saved_theirs
    buf = io.StringIO()
    with redirect_stdout(buf):
        pm.print_trainable_parameters()
        line = ours.print_trainable_parameters()
    assert buf.getvalue().splitlines() == [line, line]  # PEFT's count (a saved module's copy included)


@pytest.mark.parametrize("kw,message", [
    (dict(target_modules=r".*ln_f"), r"selects transformer.ln_f, LayerNorm; LoRA here adapts GPT-2's Conv1D"),
    (dict(target_modules=r"lm_head"), r"selects lm_head, the LM head \(tied to wte\)"),
    (dict(target_modules=["c_attn"], modules_to_save=["wte"]), r"modules_to_save 'wte' selects transformer.wte"),
    (dict(target_modules=r".*c_attn", layers_to_transform=[0]), r"layers_to_transform / layers_pattern need a list"),
    (dict(target_modules=["c_attn"], layers_pattern="h"), r"layers_pattern 'h' needs layers_to_transform"),
    (dict(target_modules=["c_attn"], modules_to_save=["_attn"]), r"selects transformer.h.0.attn.c_attn, which is"),
    (dict(target_modules=r"nothing\.here"), r"matches no module of GPT-2"),
    (dict(target_modules=["c_attn"], modules_to_save=["ln_f("]), r"is not a valid regular expression here"),
])
def test_selections_we_cannot_run_are_refused(hf_checkpoints, kw, message):
    with pytest.raises(ValueError, match=message) as e:
        LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(r=4, alpha=8, **kw))
    print(f"\n{e.value}")


# --- adapters with these selections move both ways ------------------------------------

MIXED = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], exclude_modules=r".*\.h\.1\.mlp\..*",
             rank_pattern={"attn.c_proj": 2}, alpha_pattern={r"transformer\.h\.2\.attn\.c_attn": 12},
             modules_to_save=["ln_f"])


def test_selection_adapter_both_ways(hf_checkpoints, impl, tmp_path):
    """A PEFT adapter with exclude_modules, rank/alpha patterns and a saved ln_f -> ours, and
    ours (after 2 AdamW steps that train ln_f too) -> PEFT: the logits of both sides."""
    pm = peft_model({"default": MIXED})
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = impl(LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path / "peft", dropout=0.0))
    ids, mask, targets = answer_batch(0)
    d_in = max_diff(logits(ours, ids, mask), peft_logits(pm, ids, mask), mask)
    ln_f = ours.model.ln_f.weight.numpy().copy()
    opt = jt.optim.AdamW(ours.trainable_parameters(), lr=1e-2)
    for step in range(2):
        ids2, mask2, t2 = answer_batch(40 + step)
        opt.step(ours(jt.array(ids2), jt.array(t2), attention_mask=jt.array(mask2))[1])
    assert not np.array_equal(ours.model.ln_f.weight.numpy(), ln_f)  # the saved ln_f trained
    ours.save_lora_weights(tmp_path / "ours")
    back = PeftModel.from_pretrained(make_hf_model(NAME), str(tmp_path / "ours")).eval()
    d_out = max_diff(logits(ours, ids, mask), peft_logits(back, ids, mask), mask)
    print(f"\nexclude + patterns + modules_to_save: PEFT -> ours max |logits diff| {d_in:.2e}; "
          f"ours (2 steps) -> PEFT {d_out:.2e}")
    measured(f"LoRA selection (exclude, patterns, modules_to_save ln_f): logits vs PEFT {max(d_in, d_out):.1e}")
    assert d_in <= 1e-4 and d_out <= 1e-4


def test_modules_to_save_gradients_match_peft(hf_checkpoints, tmp_path):
    """Gradients of the LoRA tensors and of the trained copy of ln_f, and the original ln_f frozen."""
    pm = peft_model({"default": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f"])})
    pm.save_pretrained(str(tmp_path))
    ours = LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path, dropout=0.0).eval()
    ids, mask, targets = answer_batch(1)
    names = list(ours.lora_state_dict())
    _, loss = ours(jt.array(ids), jt.array(targets), attention_mask=jt.array(mask))
    grads = dict(zip(names, (g.numpy() for g in jt.grad(loss, ours.trainable_parameters()))))
    out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(hf_labels(ids, targets)))
    out.loss.backward()
    ref = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}

    def peft_key(name):
        if name.startswith("modules_to_save."):
            module, param = name[len("modules_to_save."):].rsplit(".", 1)
            return f"base_model.model.transformer.{module}.modules_to_save.default.{param}"
        return f"base_model.model.transformer.{name}.default.weight"
    assert sorted(map(peft_key, names)) == sorted(ref)
    rel = norm_err({n: grads[n] for n in names}, {n: ref[peft_key(n)] for n in names})
    rel_ln = norm_err(grads["modules_to_save.ln_f.weight"], ref[peft_key("modules_to_save.ln_f.weight")])
    print(f"\nmodules_to_save ln_f: loss {loss.item():.6f} vs PEFT {out.loss.item():.6f}; gradients relative error "
          f"{rel:.2e} over {len(names)} tensors (ln_f.weight alone {rel_ln:.2e})")
    measured(f"modules_to_save gradients vs PEFT: relative {max(rel, rel_ln):.1e}")
    assert rel <= 1e-4 and rel_ln <= 1e-4
    assert ours._originals["ln_f"]["weight"].is_stop_grad() and not ours.model.ln_f.weight.is_stop_grad()


# --- several adapters ------------------------------------------------------------------

TWO = {"default": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], modules_to_save=["ln_f"]),
       "second": dict(r=2, lora_alpha=6, target_modules=r".*\.h\.[01]\.mlp\.c_fc", use_rslora=True)}


def test_multi_adapter_folder_both_ways(hf_checkpoints, impl, tmp_path):
    """PEFT's folder of two adapters (default at the root, second/ below it) -> ours, each
    adapter and the disabled model against PEFT's; ours saved -> PEFT, each adapter again;
    then delete_adapter and merging one of them."""
    pm = peft_model(TWO)
    pm.save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "second" / "adapter_config.json").is_file()
    ours = impl(LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path / "peft", dropout=0.0))
    ours.load_adapter(tmp_path / "peft" / "second", "second")
    ids, mask, _ = answer_batch(2)
    diffs = {}
    for adapter in ("default", "second", "default"):  # back again: switching leaves nothing behind
        ours.set_adapter(adapter)
        pm.set_adapter(adapter)
        diffs[f"PEFT->ours {adapter}"] = max_diff(logits(ours, ids, mask), peft_logits(pm, ids, mask), mask)
    with ours.disable_adapter(), pm.disable_adapter():
        diffs["disabled"] = max_diff(logits(ours, ids, mask), peft_logits(pm, ids, mask), mask)
    base = make_hf_model(NAME)
    with ours.disable_adapter():
        diffs["disabled vs GPT-2"] = max_diff(logits(ours, ids, mask), peft_logits(base, ids, mask), mask)
    # test_generation --adapter FOLDER --adapter-name second: that one adapter of the folder
    chosen, _ = load_model(hf_checkpoints(NAME), tmp_path / "peft", device="cpu", adapter_name="second")
    pm.set_adapter("second")
    diffs["test_generation second"] = max_diff(logits(chosen, ids, mask), peft_logits(pm, ids, mask), mask)
    ours.save_lora_weights(tmp_path / "ours")
    back = PeftModel.from_pretrained(make_hf_model(NAME), str(tmp_path / "ours")).eval()
    back.load_adapter(str(tmp_path / "ours" / "second"), "second")
    for adapter in ("default", "second"):
        ours.set_adapter(adapter)
        back.set_adapter(adapter)
        diffs[f"ours->PEFT {adapter}"] = max_diff(logits(ours, ids, mask), peft_logits(back, ids, mask), mask)
    # delete the active one: the first remaining becomes active (PEFT's rule)
    ours.set_adapter("default")
    ours.delete_adapter("default")
    pm.set_adapter("second")
    assert ours.active_adapter == "second" and list(ours.peft_config) == ["second"]
    diffs["after delete"] = max_diff(logits(ours, ids, mask), peft_logits(pm, ids, mask), mask)
    ours.merge()
    merged = pm.merge_and_unload(adapter_names=["second"]).eval()
    diffs["merged second"] = max_diff(logits(ours, ids, mask), peft_logits(merged, ids, mask), mask)
    print("\n" + "; ".join(f"{k}: {v:.2e}" for k, v in diffs.items()))
    measured(f"several adapters (set/disable/delete/merge, folder both ways): logits vs PEFT {max(diffs.values()):.1e}")
    assert max(diffs.values()) <= 1e-4


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_add_weighted_adapter_equals_peft(hf_checkpoints, tmp_path, combination):
    adapters = {"a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
                "b": dict(r=4 if combination == "linear" else 2, lora_alpha=3, target_modules=["c_attn", "mlp.c_proj"])}
    weights = [0.7, -0.4]
    pm = peft_model(adapters)
    pm.save_pretrained(str(tmp_path))
    pm.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination)
    ours = LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path, adapter_name="a")  # PEFT wrote a/ and b/
    ours.load_adapter(tmp_path / "b", "b")
    ours.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination)
    theirs = {n[len("base_model.model."):]: (m.lora_A["mix"].weight.detach().numpy(), m.lora_B["mix"].weight.detach().numpy())
              for n, m in pm.named_modules() if isinstance(m, LoraLayer) and "mix" in m.lora_A}
    ours.set_adapter("mix")
    mine = {"transformer." + n: (m.lora_A.numpy(), m.lora_B.numpy()) for n, m in ours.lora_modules.items()}
    assert mine.keys() == theirs.keys()
    err = norm_err({f"{k}{i}": mine[k][i] for k in mine for i in (0, 1)}, {f"{k}{i}": theirs[k][i] for k in mine for i in (0, 1)})
    pm.set_adapter("mix")
    ids, mask, _ = answer_batch(3)
    d = max_diff(logits(ours, ids, mask), peft_logits(pm, ids, mask), mask)
    cfg = pm.peft_config["mix"]
    print(f"\nadd_weighted_adapter {combination}: rank {ours.lora_config.r} (PEFT {cfg.r}), {len(mine)} modules; "
          f"A/B relative error {err:.2e}; logits max |diff| {d:.2e}")
    measured(f"add_weighted_adapter {combination}: A/B vs PEFT relative {err:.1e}, logits {d:.1e}")
    assert ours.lora_config.r == cfg.r and err <= 1e-6 and d <= 1e-4


def test_adapter_management_errors(hf_checkpoints, tmp_path):
    ours = LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(r=2, alpha=4))
    with pytest.raises(ValueError, match=r"combination_type 'svd' is not supported here"):
        ours.add_weighted_adapter(["default"], [1.0], "mix", combination_type="svd")
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; this model has \['default'\]"):
        ours.set_adapter("nope")
    with pytest.raises(ValueError, match=r"an adapter named 'default' exists already"):
        ours.add_adapter("default", LoRAConfig())
    with pytest.raises(ValueError, match=r"adapter name 'a/b'"):
        ours.add_adapter("a/b", LoRAConfig())
    ours.save_lora_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"second/adapter_config.json: missing; the adapters in .* are \['default'\]"):
        LoRAGPT.from_pretrained(hf_checkpoints(NAME), tmp_path, adapter_name="second")


# --- the command line of both training scripts ----------------------------------------

@pytest.mark.parametrize("argv", [
    ["--target-modules", r"transformer\.h\.[01]\.(attn\.c_attn|mlp\.c_fc)", "--modules-to-save", "ln_f,ln_2"],
    ["--targets", "c_attn,c_fc", "--exclude-modules", "h.0.mlp.c_fc", "--layers-to-transform", "0,1",
     "--layers-pattern", "h"],
    ["--targets", "c_proj", "--exclude-modules", r".*\.attn\..*"],
])
def test_cli_options_select_what_peft_selects(hf_checkpoints, argv):
    cfg = parse_args(argv)[0]
    check(cfg)
    kw = lora_targets(cfg)  # what both scripts pass: ours to LoRAConfig, train_pytorch_lora.py to PEFT's LoraConfig
    pm = peft_model({"default": dict(r=2, lora_alpha=4, **kw)})
    ours = LoRAGPT(GPT.from_pretrained(hf_checkpoints(NAME)), LoRAConfig(r=2, alpha=4, **kw))
    mine, theirs = our_targets(ours, "default"), peft_targets(pm, "default")
    print(f"\n{' '.join(argv)}: {sorted(mine)} saved {sorted(ours._saved['default'])}")
    assert mine.keys() == theirs.keys()
    assert sorted(ours._saved["default"]) == sorted(n[len("base_model.model.transformer."):-len(".modules_to_save.default.weight")]
                                                   for n, _ in pm.named_parameters() if n.endswith(".modules_to_save.default.weight"))


def test_cli_refuses_layers_with_a_regex():
    with pytest.raises(UsageError, match="--layers-to-transform / --layers-pattern need comma-separated --targets"):
        check(parse_args(["--target-modules", ".*c_attn", "--layers-to-transform", "0"])[0])
    with pytest.raises(UsageError, match="--layers-to-transform must be comma-separated block indices"):
        check(parse_args(["--layers-to-transform", "first"])[0])


def test_both_training_scripts_train_the_selection(tmp_path):
    """train_default_lora.py with --target-modules/--exclude-modules/--modules-to-save for 2 steps:
    PEFT loads the adapter it writes with our logits, and train_pytorch_lora.py builds the same
    LoRA layers and the same saved module from the same options."""
    import train_default_lora
    import train_pytorch_lora
    from helpers import write_sample_split
    from transformers import GPT2LMHeadModel
    train_file, eval_file = write_sample_split(tmp_path)
    out = tmp_path / "run"
    cfg = TrainConfig(random_base="n_layer=2,n_head=2,n_embd=32,n_positions=256,initializer_range=0.1",
                      train_file=str(train_file), eval_file=str(eval_file), output_dir=str(out), max_length=160,
                      batch_size=4, max_steps=2, eval_interval=50, save_interval=50, eval_examples=4,
                      gen_eval_examples=0, lr=1e-2, dropout=0.0, r=4, alpha=8, targets="c_attn,c_fc",
                      exclude_modules="h.1.mlp.c_fc", modules_to_save="ln_f")
    train_default_lora.train(cfg, progress=False)
    saved = set(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    base = out / "base_model"
    pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(base)), str(out / "adapter")).eval()
    ours, _ = load_model(base, out / "adapter", device="cpu")
    ids, mask, _ = answer_batch(5)
    d = max_diff(logits(ours, ids, mask), peft_logits(pm, ids, mask), mask)
    ref, _ = train_pytorch_lora.build_model(train_pytorch_lora.reference_config(cfg), out)
    ref_layers = {n[len("base_model.model.transformer."):] for n, m in ref.named_modules() if isinstance(m, LoraLayer)}
    our_layers = {k[len("base_model.model.transformer."):-len(".lora_A.weight")] for k in saved if k.endswith(".lora_A.weight")}
    print(f"\ntrain_default_lora.py, 2 steps: adapter {sorted(our_layers)} + {sorted(k for k in saved if 'ln_f' in k)}; "
          f"PEFT loads it: max |logits diff| {d:.2e}; train_pytorch_lora.py builds the same layers: {ref_layers == our_layers}")
    assert our_layers == {"h.0.attn.c_attn", "h.1.attn.c_attn", "h.0.mlp.c_fc"} == ref_layers
    assert "base_model.model.transformer.ln_f.weight" in saved and "ln_f.modules_to_save" in str(dict(ref.named_modules()).keys())
    assert d <= 1e-4
