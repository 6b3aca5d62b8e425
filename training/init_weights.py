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


# ----------------------------------------------------------------------------
# Initialisations that move part of the base weight into the adapter (PEFT's
# init_lora_weights="pissa" / "pissa_niter_N" / "olora"). Each returns (A0, B0, W_res) with
# W = W_res + scaling * (B0 A0)^T exactly as PEFT computes it: in float32, on the weight in
# nn.Linear's (out, in) layout (PEFT transposes GPT-2's Conv1D first, fan_in_fan_out).

RESIDUAL_INITS = ("pissa", "olora")  # and "pissa_niter_<N>"


def is_residual_init(init):
    return init in RESIDUAL_INITS or init.startswith("pissa_niter_")


def pissa_niter(init):
    """N of "pissa_niter_N" (None for exact "pissa"); ValueError for anything else."""
    if init == "pissa":
        return None
    n = init[len("pissa_niter_"):] if init.startswith("pissa_niter_") else ""
    if not n.isdigit():
        raise ValueError(f"LoRA init must be kaiming, gaussian, pissa, pissa_niter_<N> or olora, not {init!r}")
    return int(n)


def svd_lowrank(W, q, niter, rng):
    """torch.svd_lowrank(W, q, niter) (Halko et al. 2009, Algorithm 5.1, as torch/_lowrank.py
    runs it: a tall matrix, a Gaussian sketch, niter QR-orthonormalised subspace iterations),
    with the sketch drawn from `rng`. Returns (U, S, V), W ~ U diag(S) V^T."""
    tall = W.shape[0] >= W.shape[1]
    A = W if tall else W.T
    Q = np.linalg.qr(A @ rng.standard_normal((A.shape[1], q), dtype=np.float32))[0]
    for _ in range(niter):
        Q = np.linalg.qr(A.T @ Q)[0]
        Q = np.linalg.qr(A @ Q)[0]
    U, S, Vh = np.linalg.svd(Q.T @ A, full_matrices=False)
    U, V = Q @ U, Vh.T
    return (U, S, V) if tall else (V, S, U)


def residual_init(weight, r, scaling, init, seed=0, name=""):
    """(A0 (r, in), B0 (out, r), W_res (in, out)) for a Conv1D weight (in, out), float32.

    pissa (Meng et al. 2024; PEFT's pissa_init): the top-r singular triplets of W^T,
    B0 = V_r sqrt(S_r / s), A0 = sqrt(S_r / s) U_r^T; pissa_niter_N the same from the
    randomised SVD (the sketch from NumPy by (seed, name), so our two scripts agree).
    olora (Büyükakyüz 2024; PEFT's olora_init on nn.Linear): W^T = QR, B0 = Q[:, :r],
    A0 = R[:r]. PEFT's olora_init skips the fan_in_fan_out transpose and fails on GPT-2's
    Conv1D (a shape error, or a wrong residual for square ones); this is what it computes on
    the same weight held as an nn.Linear.
    """
    W = np.ascontiguousarray(np.asarray(weight, np.float32).T)  # (out, in)
    if init == "olora":
        Q, R = np.linalg.qr(W)
        B0, A0 = Q[:, :r], R[:r]
    else:
        niter = pissa_niter(init)
        if niter is None:
            V, S, Uh = np.linalg.svd(W, full_matrices=False)
            V, S, Uh = V[:, :r], S[:r], Uh[:r]
        else:
            V, S, U = svd_lowrank(W, r, niter, generator(seed, name + ".pissa"))
            Uh = U.T
        S = np.sqrt(S / np.float32(scaling))
        A0, B0 = S[:, None] * Uh, V * S[None, :]
    A0, B0 = np.ascontiguousarray(A0, np.float32), np.ascontiguousarray(B0, np.float32)
    W_res = (W - np.float32(scaling) * (B0 @ A0)).T
    return A0, B0, np.ascontiguousarray(W_res, np.float32)
