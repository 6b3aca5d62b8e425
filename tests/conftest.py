"""Shared fixtures: random-initialised GPT-2 checkpoints written by transformers itself.

No pretrained weights can be downloaded on these machines, so the reference is a
transformers GPT2LMHeadModel with random weights, saved with save_pretrained (the real
file format). Biases and LayerNorm parameters are randomised too (transformers
initialises them to 0 / 1), so a loading mistake in any tensor shows in the logits.
"""
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad"

# name -> transformers GPT2Config kwargs. "tiny" is deliberately not GPT-2's shape.
CONFIGS = {
    # initializer_range 0.2 (GPT-2 uses 0.02): a random model with small weights repeats
    # one token forever, which would make the generation tests trivially pass.
    "tiny": dict(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.2),
    # the same with GPT-2's own initializer_range: logits of GPT-2-like size (|logit| ~ 1)
    "tiny-gpt2init": dict(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=50257),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
}


def make_hf_model(name="tiny", seed=0, **overrides):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(**{**CONFIGS[name], **overrides})
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias") or ".ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, path, safe=True):
    """safe=False writes the legacy pytorch_model.bin (transformers 5 only writes safetensors)."""
    import torch
    path = Path(path)
    model.save_pretrained(str(path))
    if not safe:
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Lazily built {(config name, "safetensors"|"bin"): folder} of HF-written checkpoints."""
    cache = {}

    def get(name="tiny", fmt="safetensors"):
        key = (name, fmt)
        if key not in cache:
            model = make_hf_model(name)
            cache[key] = save_hf_model(model, tmp_path_factory.mktemp(f"{name}_{fmt}"), safe=fmt == "safetensors")
        return cache[key]
    return get


def batch_with_padding(rng, B, T, vocab, side):
    """Random token ids (B, T) and a mask with rows of different lengths, padded on `side`."""
    lengths = np.linspace(T, max(2, T // 3), B).astype(int)
    ids = rng.integers(0, vocab, size=(B, T)).astype(np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n:] = 1
    ids = np.where(mask > 0, ids, 50256)
    return ids, mask


@pytest.fixture(params=["plain", "fused"])
def impl(request):
    """Runs a test on each implementation: the plain Jittor formulas of the model files and
    the fused CPU kernels (runtime.prepare). Returns a function that switches a model to it."""
    import runtime
    fused = request.param == "fused"
    if fused and not runtime.fused_kernels_available():
        pytest.skip("the fused kernels need Jittor on the CPU with oneDNN")
    return lambda model: runtime.prepare(model, fused=fused)
