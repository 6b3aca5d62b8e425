"""Starting weights drawn from NumPy, so that the Jittor script (train_default_lora.py) and
the PyTorch reference (train_pytorch_lora.py) start from the same numbers for one --seed.

Every tensor has its own generator, seeded by (seed, tensor name): its values depend on
the seed and its name only, not on which other tensors are drawn or in what order, and
not on an MPI rank (every rank draws the same adapters).

- random_gpt2_weights / save_random_gpt2: a random-initialised GPT-2 (for --random-base)
  with the distributions of GPT2_jittor.GPT's own init: token embeddings and projection
  weights N(0, initializer_range^2), position embeddings N(0, 0.01^2), biases 0,
  LayerNorm weights 1 and biases 0.
- lora_A: PEFT's init of an adapter's A matrix (B starts at zero).

No Jittor and no PyTorch here.
"""
import math

import numpy as np

from gpt2_config import GPTConfig, parse_shape
from model_utils import atomic_save_safetensors, atomic_write_json, resolve_model


def generator(seed, name):
    """np.random.Generator for one tensor, fixed by (seed, name)."""
    return np.random.default_rng(np.random.SeedSequence([seed, int.from_bytes(name.encode(), "little")]))


def normal(seed, name, shape, std):
    return generator(seed, name).standard_normal(shape, dtype=np.float32) * np.float32(std)


# ----------------------------------------------------------------------------
# A random GPT-2

def random_gpt2_weights(config, seed):
    """{GPT2Model key: float32 array} of a random GPT-2 of `config` (a gpt2_config.GPTConfig)."""
    C, V, P = config.n_embd, config.vocab_size, config.n_positions
    std = config.initializer_range
    w = {"wte.weight": normal(seed, "wte.weight", (V, C), std),
         "wpe.weight": normal(seed, "wpe.weight", (P, C), 0.01)}
    # (name, in, out) of the Conv1D projections of a block; weights are stored (in, out)
    projections = (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C), ("mlp.c_fc", C, 4 * C),
                   ("mlp.c_proj", 4 * C, C))
    for i in range(config.n_layer):
        for ln in ("ln_1", "ln_2"):
            w[f"h.{i}.{ln}.weight"], w[f"h.{i}.{ln}.bias"] = np.ones(C, np.float32), np.zeros(C, np.float32)
        for name, n_in, n_out in projections:
            key = f"h.{i}.{name}"
            w[f"{key}.weight"] = normal(seed, f"{key}.weight", (n_in, n_out), std)
            w[f"{key}.bias"] = np.zeros(n_out, np.float32)
    w["ln_f.weight"], w["ln_f.bias"] = np.ones(C, np.float32), np.zeros(C, np.float32)
    return w


def save_random_gpt2(path, config, seed):
    """Write a random GPT-2 as a Hugging Face checkpoint folder (config.json + model.safetensors,
    GPT2LMHeadModel keys), as GPT.save_pretrained writes one. Same seed and config, same bytes."""
    tensors = {"transformer." + k: v for k, v in random_gpt2_weights(config, seed).items()}
    atomic_save_safetensors(path / "model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(path / "config.json", config.to_hf_config())


def base_model_dir(cfg, out, log, save=save_random_gpt2):
    """The base GPT-2 folder of a run (a train_config.TrainConfig writing into `out`): --model,
    or with --random-base a random GPT-2 drawn into out/base_model by save(folder, config, seed)
    (once; kept on --resume)."""
    if not cfg.random_base:
        return resolve_model(cfg.model, cfg.revision)
    base_dir = out / "base_model"
    config = GPTConfig(**parse_shape(cfg.random_base))
    if not ((base_dir / "config.json").is_file() and (base_dir / "model.safetensors").is_file()):
        save(base_dir, config, cfg.seed)
    log(f"NOTE: the base model in {base_dir} is a RANDOM-initialised GPT-2 ({cfg.random_base}), "
        f"not pretrained GPT-2: this run shows the pipeline working end to end; it cannot "
        f"answer questions the way a pretrained GPT-2 + LoRA does.")
    return base_dir


# ----------------------------------------------------------------------------
# LoRA

def lora_A(seed, name, shape, r, init="kaiming"):
    """The initial A (rows, in) of the adapter on module `name` (e.g. "h.0.attn.c_attn"), as PEFT
    draws it: kaiming-uniform with a = sqrt(5) (bound 1/sqrt(in)), or "gaussian" N(0, (1/r)^2)."""
    rng = generator(seed, name + ".lora_A")
    if init == "kaiming":  # torch.nn.init.kaiming_uniform_(A, a=sqrt(5)): gain sqrt(2 / 6), bound gain * sqrt(3 / in)
        bound = 1.0 / math.sqrt(shape[1])
        return rng.uniform(-bound, bound, size=shape).astype(np.float32)
    if init == "gaussian":
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / r)
    raise ValueError(f"LoRA init must be 'kaiming' or 'gaussian', not {init!r}")
