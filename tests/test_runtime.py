"""runtime.py: the one place that chooses the implementation.

The numbers of both implementations are compared with transformers and PEFT in
test_gpt2_parity.py / test_lora_peft.py (the `impl` fixture) and module by module in
test_cpu_kernels.py; here: what prepare() switches, and that it switches all of it.
"""
import os

import pytest

from backend.jittor_env import jt  # noqa: F401 (Jittor set up before the modules below)
from backend import cpu_kernels, runtime
from GPT2_jittor import GPT, GPTConfig, CausalSelfAttention
from LoRA import LoRAConfig
from lora_models import LoRAGPT

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=100)


def kinds(model):
    """{class name: count} of the model's modules, and the `fused` flags it holds."""
    names = {}
    for m in model.modules():
        names[type(m).__name__] = names.get(type(m).__name__, 0) + 1
    flags = {m.fused for m in model.modules() if isinstance(m, (GPT, CausalSelfAttention))}
    return names, flags


def test_a_new_model_runs_the_plain_formulas():
    names, flags = kinds(LoRAGPT(GPT(SMALL), LoRAConfig(r=2)))
    print(f"\nnew model: {names}")
    assert flags == {False} and not any(n.startswith("Fused") for n in names)


@pytest.mark.skipif(not runtime.fused_kernels_available(), reason="needs Jittor on the CPU with oneDNN")
def test_prepare_switches_every_module_and_back():
    model = LoRAGPT(GPT(SMALL), LoRAConfig(r=2, target_modules=("c_attn", "c_fc")))
    new, _ = kinds(model)
    plain, _ = kinds(runtime.prepare(model, fused=False))  # every nn.Dropout keyed by token, on both paths
    assert plain["KeyedDropout"] == new["Dropout"] > 0 and "Dropout" not in plain
    fused, flags = kinds(runtime.prepare(model))
    print(f"\nplain: {plain}\nfused: {fused}")
    # every module of a class in the table is swapped; nothing else is
    for cls, sub in runtime.FUSED.items():
        assert fused.get(cls.__name__, 0) == 0 and fused.get(sub.__name__, 0) == plain.get(cls.__name__, 0) > 0
    assert flags == {True} and runtime.is_fused(model)
    assert sum(fused.values()) == sum(plain.values())
    back, flags = kinds(runtime.prepare(model, fused=False))
    assert back == plain and flags == {False} and not runtime.is_fused(model)


@pytest.mark.skipif(not runtime.fused_kernels_available(), reason="needs Jittor on the CPU with oneDNN")
def test_lora_layers_added_to_a_fused_model_are_fused_too():
    model = LoRAGPT(runtime.prepare(GPT(SMALL)), LoRAConfig(r=2))
    names, flags = kinds(model)
    assert names.get("LoRALinear", 0) == 0 and names["FusedLoRALinear"] == 4 * SMALL.n_layer and flags == {True}


def test_fused_kernels_refused_where_they_cannot_run(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    model = GPT(SMALL)
    assert runtime.prepare(model) is model and not runtime.is_fused(model)  # auto: the plain code
    with pytest.raises(RuntimeError, match="fused CPU kernels need Jittor on the CPU with oneDNN"):
        runtime.prepare(model, fused=True)



def test_jittor_starts_without_pytorch_and_pytorch_imported_after_it_works(tmp_path):
    """jittor_env turns off Jittor's import of PyTorch at start on the CPU (FIX_TORCH_ERROR=0):
    a script that uses Jittor alone loads no PyTorch, and one that imports PyTorch after Jittor
    (transformers next to our model, as in a notebook) still gets the same logits from both."""
    import subprocess
    import sys
    from pathlib import Path
    code = f"""
import sys, time
t = time.time()
import numpy as np
from backend.jittor_env import jt
from GPT2_jittor import GPT
print("jittor", round(time.time() - t, 2), "s; PyTorch loaded:", "torch" in sys.modules)
ids = np.array([[5, 17, 3, 99, 42, 7]])
ours = GPT.from_pretrained({str(tmp_path)!r})
a = ours(jt.array(ids))[0].numpy()
import torch, transformers
hf = transformers.GPT2LMHeadModel.from_pretrained({str(tmp_path)!r}).eval()
b = hf(torch.tensor(ids)).logits.detach().numpy()
c = ours(jt.array(ids))[0].numpy()  # Jittor again, with PyTorch loaded
print("max abs diff", float(np.abs(a - b).max()), float(np.abs(c - b).max()))
"""
    from helpers import make_hf_model, save_hf_model
    save_hf_model(make_hf_model("tiny"), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "FIX_TORCH_ERROR"}
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    print("\n" + r.stdout.strip())
    first, second = r.stdout.strip().splitlines()
    assert first.endswith("PyTorch loaded: False")
    diffs = [float(x) for x in second.split()[-2:]]
    assert max(diffs) < 1e-4, diffs
