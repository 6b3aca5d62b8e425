"""runtime.py: the one place that chooses the implementation.

The numbers of both implementations are compared with transformers and PEFT in
test_gpt2_parity.py / test_lora_peft.py (the `impl` fixture) and module by module in
test_cpu_kernels.py; here: what prepare() switches, and that it switches all of it.
"""
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
