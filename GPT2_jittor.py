"""GPT-2 in Jittor, numerically equal to Hugging Face transformers' GPT2LMHeadModel.

Module names follow the Hugging Face checkpoint keys (wte, wpe, h.N.ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f), and the projections keep Hugging Face's
Conv1D layout (weight is (in, out), y = x @ W + b), so a checkpoint loads as a straight
copy with no transposes, and LoRA adapters in PEFT's format apply unchanged.

    model = GPT.from_pretrained("gpt2")          # folder: config.json + model.safetensors
    logits = model(idx)                          # (B, T, vocab)
    logits, loss = model(idx, targets)           # targets[b, t] follows idx[b, t]; -100 = ignored
    out = model.generate(idx, 20, attention_mask=mask)   # greedy, KV cache, left padding

The code here is the plain formula of every part, and the reference the fast paths are
tested against. It runs in any precision runtime.prepare() chooses: with the frozen weights
stored in bfloat16/float16, matmul inputs are cast to the weight's dtype, while the
residual stream, LayerNorm, the attention softmax and the loss stay float32 (as_dtype; a
no-op in float32). runtime.prepare(model) is the one place that chooses what runs: on CPU
with oneDNN it swaps in modules whose execute() runs the same formula as a fused kernel
(cpu_kernels.py) and sets `fused` on the attention layers and the GPT, which then take
the fused attention, packed training on the real tokens only (execute_packed) and an
in-place KV cache for generation (execute_cached).

Model code only: no argument parsing, logging or plotting here.
"""
import json
import math
from pathlib import Path

import numpy as np

from backend.jittor_env import jt
from jittor import nn
from backend import cpu_kernels
from gpt2_config import ACTIVATION_FUNCTIONS, GPTConfig  # GPTConfig: also imported from here
from model_utils import (HF_IGNORED_SUFFIXES, is_hub_id, resolve_model, IGNORE_INDEX, atomic_save_safetensors, atomic_write_json, check_sizes,
                         pick_next_token, read_hf_weights, strip_transformer_prefix)


# ----------------------------------------------------------------------------
# Building blocks: the plain formulas. runtime.py may swap Conv1D, LayerNorm, NewGELU and
# Dropout for subclasses that compute the same formula with cpu_kernels.

def as_dtype(x, dtype):
    """x in `dtype`: a cast where mixed precision meets two dtypes, no new op where it does not."""
    return x if x.dtype == dtype else x.cast(dtype)


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 'Conv1D': a linear layer whose weight is stored (in, out)."""

    def __init__(self, nx, nf, std=0.02):
        self.weight = jt.init.gauss((nx, nf), "float32", std=std)
        self.bias = jt.zeros((nf,), "float32")

    def execute(self, x):
        # (..., in) @ (in, out): one 2-D matmul in Jittor, in the (possibly half) weight's dtype
        return as_dtype(x, self.weight.dtype) @ self.weight + self.bias


class LayerNorm(nn.Module):
    """LayerNorm with the centred variance E[(x - mean)^2], as PyTorch computes it.

    (jittor.nn.LayerNorm uses E[x^2] - E[x]^2, which loses digits when |mean| >> std.)
    """

    def __init__(self, n, eps):
        self.eps = eps
        self.weight = jt.ones((n,), "float32")
        self.bias = jt.zeros((n,), "float32")

    def execute(self, x):
        x = as_dtype(x, "float32")  # statistics in float32 whatever the activations' dtype
        xc = x - x.mean(-1, keepdims=True)
        var = (xc * xc).mean(-1, keepdims=True)
        return xc / jt.sqrt(var + self.eps) * self.weight + self.bias


class NewGELU(nn.Module):
    """GPT-2's tanh approximation of GELU (transformers' NewGELUActivation).

    x*x*x, not x**3: Jittor's pow is a slow generic kernel. The clamp changes no float32
    value (tanh(15) rounds to 1) but keeps Jittor's tanh gradient finite: it returns NaN
    for inputs below about -90, which a large negative pre-activation reaches in training.
    """

    def execute(self, x):
        # in float32 (in half, x*x*x overflows float16 from |x| = 41), returned in x's dtype
        dtype, x = x.dtype, as_dtype(x, "float32")
        u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))
        return as_dtype(0.5 * x * (1.0 + jt.tanh(u.clamp(-15.0, 15.0))), dtype)


class GELU(nn.Module):
    """The exact GELU, x Phi(x) (transformers' "gelu")."""

    def execute(self, x):
        dtype, x = x.dtype, as_dtype(x, "float32")
        return as_dtype(0.5 * x * (1.0 + jt.erf(x / math.sqrt(2.0))), dtype)


ACTIVATIONS = {"gelu_new": NewGELU, "gelu_pytorch_tanh": NewGELU, "gelu": GELU, "relu": nn.ReLU}
assert tuple(ACTIVATIONS) == ACTIVATION_FUNCTIONS  # the names GPTConfig accepts


# The score given to masked keys. transformers fills with finfo(float32).min; on a fully
# masked row (the query of a left pad) every softmax must then give uniform weights, but
# Jittor's CUDA softmax (jt.nn.softmax, not used here: see softmax()) starts its running
# maximum at -1e30, so such a row becomes exp(-3.4e38 + 1e30) = 0 everywhere and 0/0 = NaN.
# -1e9 lies far above that floor (a fully masked row is uniform in every softmax) and far
# below any real score (exp(-1e9 - s) is exactly 0, as with transformers' fill). It is a
# float32 value: the scores are masked in float32.
MASK_FILL = -1e9


def softmax(x):
    """Softmax over the last axis, in plain operations: the formula jittor.nn.softmax computes on
    the CPU (so the same bits there), on every device. On CUDA jt.nn.softmax is instead a cub
    kernel (jittor/other/code_softmax.py) that does not compile with CUDA 13's cub (cub::Max is
    gone) without tools/jittor_cuda_fix.py; these ops compile with any CUDA. The row maximum is
    a real score or MASK_FILL, so no row divides 0 by 0."""
    e = (x - x.max(-1, keepdims=True)).exp()
    return e / e.sum(-1, keepdims=True)


def causal_attention(q, k, v, key_mask, attn_drop):
    """softmax(q k^T / sqrt(d) + mask) v with a causal mask and a key padding mask.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) where the last Tq keys are the queries' own
    positions (Tk = cached + new). key_mask: (B, Tk) with 1 for real tokens, or None.
    The scores, mask and softmax are float32 whatever the dtype of q, k, v.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    att = as_dtype(q @ k.transpose(0, 1, 3, 2), "float32") * (1.0 / math.sqrt(D))  # (B, H, Tq, Tk)
    # query i (absolute position Tk - Tq + i) may look at keys j <= Tk - Tq + i
    allowed = (jt.arange(Tk).reshape(1, Tk) <= jt.arange(Tq).reshape(Tq, 1) + (Tk - Tq))
    allowed = allowed.reshape(1, 1, Tq, Tk)
    if key_mask is not None:
        allowed = allowed & (key_mask.reshape(B, 1, 1, Tk) > 0)
    # Replace (not add), as transformers does: a fully masked row gets uniform weights.
    att = jt.where(allowed, att, jt.float32(MASK_FILL))
    att = attn_drop(softmax(att))
    return as_dtype(att, v.dtype) @ v  # (B, H, Tq, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        self.n_head = config.n_head
        std = config.initializer_range
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd, std)  # q, k, v fused, in this order
        self.c_proj = Conv1D(config.n_embd, config.n_embd, std)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.fused = False  # set by runtime.py: cpu_kernels computes causal_attention's formula

    def execute(self, x, key_mask=None, past=None):
        """x (B, T, C) -> (output (B, T, C), this layer's (k, v) for a cache).

        past: the (k, v) of earlier positions, each (B, H, T_past, D); key_mask (B, T_past + T).
        """
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        # (B, H, T, D); Jittor is lazy: when nothing reads k and v (training), they are never built
        q, k, v = (t.reshape(B, T, self.n_head, C // self.n_head).transpose(0, 2, 1, 3) for t in qkv.split(C, dim=2))
        if past is not None:
            k, v = jt.concat([past[0], k], dim=2), jt.concat([past[1], v], dim=2)
        if self.fused and past is None:  # one C++ routine per (sequence, head), q, k, v read in place
            p_drop = self.attn_dropout.p if self.attn_dropout.is_train else 0.0
            y = cpu_kernels.padded_causal_attention(qkv, key_mask, self.n_head, p_drop)
        else:
            y = causal_attention(q, k, v, key_mask, self.attn_dropout).transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)

    def execute_packed(self, x, rows):
        """Packed training: x (rows.n_rows, C) holds the real tokens of a batch, row after row
        (a cpu_kernels.PackedRows); returns the output of the rows that are queries, (rows.n_out, C)."""
        p_drop = self.attn_dropout.p if self.attn_dropout.is_train else 0.0
        y = cpu_kernels.packed_causal_attention(self.c_attn(x), rows, self.n_head, p_drop)
        return self.resid_dropout(self.c_proj(y))

    def execute_cached(self, x, cache, key_mask, queries=None):
        """Generation: the keys and values of x (B, T, C) join `cache` (a cpu_kernels.KVCache)
        in place; returns the output of the last `queries` positions (default all), no dropout."""
        return self.c_proj(cache.attend(self.c_attn(x), key_mask, queries))


class MLP(nn.Module):
    def __init__(self, config):
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd, config.initializer_range)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd, config.initializer_range)
        self.act = ACTIVATIONS[config.activation_function]()
        self.dropout = nn.Dropout(config.resid_pdrop)

    def execute(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def execute(self, x, key_mask=None, past=None):
        a, present = self.attn(self.ln_1(x), key_mask, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present

    def execute_packed(self, x, rows):
        a = self.attn.execute_packed(self.ln_1(x), rows)
        if rows.n_out < rows.n_rows:
            x = x[jt.array(rows.query_rows())]  # only the rows attention answered go on
        x = x + a
        return x + self.mlp(self.ln_2(x))

    def execute_cached(self, x, cache, key_mask, queries=None):
        a = self.attn.execute_cached(self.ln_1(x), cache, key_mask, queries)
        if queries is not None:
            x = x[:, -queries:]
        x = x + a
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    def __init__(self, config):
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.wte.weight.assign(jt.init.gauss(self.wte.weight.shape, "float32", std=config.initializer_range))
        self.wpe.weight.assign(jt.init.gauss(self.wpe.weight.shape, "float32", std=0.01))
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        # set by runtime.py: packed training, in-place KV cache, LM head and greedy head from cpu_kernels
        self.fused = False
        self.eval()  # like transformers' from_pretrained: inference mode until train() is called

    # Jittor's Module.train()/eval() also flip stop_grad on every parameter and later
    # re-enable gradients on weights that were trainable when eval() first saw them, which
    # silently unfreezes a frozen base model. Here they only switch dropout on and off;
    # which parameters train is decided once, by whoever freezes them (see lora_models.py).
    def train(self, mode=True):
        for m in self.modules():
            m.is_train = mode
        return self

    def eval(self):
        return self.train(False)

    # --- forward ---------------------------------------------------------------

    def execute(self, idx, targets=None, attention_mask=None):
        """Logits (B, T, vocab); with targets, (logits, loss).

        targets[b, t] is the token that follows idx[b, t]; IGNORE_INDEX (-100) positions
        do not count; the loss is the mean cross-entropy over the others. With targets,
        the returned logits cover only the supervised positions, (N, vocab) in row-major
        (b, t) order: the vocab projection is the largest matmul of the model and
        answer-only training supervises a few tokens per row, so we skip the rest.
        """
        if targets is None:
            return self.lm_head(self.transformer(idx, attention_mask)[0])
        supervised = self.supervised_hidden_packed(idx, targets, attention_mask) if self.fused else None
        h, t = supervised or self.supervised_hidden(idx, targets, attention_mask)
        logits = self.lm_head(h)
        return logits, cross_entropy(logits, t)

    def transformer(self, idx, attention_mask=None, past_key_values=None):
        """Final hidden states (B, T, C) after ln_f, and the per-layer (k, v) cache.

        attention_mask: (B, T_past + T), 1 = real token, 0 = padding (left or right).
        With a mask, positions count real tokens only: position = cumsum(mask) - 1, as
        Hugging Face generation does, so a left-padded row starts at position 0.
        """
        T_past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        x = self.embed(idx, attention_mask, T_past)
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, attention_mask, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.ln_f(x), presents

    def embed(self, idx, attention_mask, T_past=0):
        """Token + position embeddings (B, T, C) of idx, which follows T_past earlier positions."""
        B, T = idx.shape
        self._check_length(T_past + T)
        if attention_mask is None:
            pos = jt.arange(T_past, T_past + T).reshape(1, T)
        else:
            if tuple(attention_mask.shape) != (B, T_past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected {(B, T_past + T)} (past + new tokens)")
            mask = attention_mask.int32()
            pos = jt.where(mask > 0, jt.cumsum(mask, dim=1) - 1, jt.int32(1))[:, T_past:]  # pads: any valid index
        # the residual stream is float32 (the tables may be stored in half)
        return self.drop(as_dtype(self.wte(idx), "float32") + as_dtype(self.wpe(pos), "float32"))

    def _check_length(self, n_tokens):
        if n_tokens > self.config.n_positions:
            raise ValueError(f"sequence of {n_tokens} tokens is longer than the model's "
                             f"n_positions={self.config.n_positions}")

    def lm_head(self, h):
        """Float32 logits from hidden states: the head is tied to the token embedding (wte)."""
        flat = h.reshape(-1, h.shape[-1])
        if self.fused:  # h @ wte^T without a transposed copy of the (vocab, C) table (154 MB for GPT-2)
            return cpu_kernels.matmul(flat, self.wte.weight, trans_b=True).reshape(*h.shape[:-1], -1)
        w = self.wte.weight
        if jt.flags.use_cuda:  # Jittor's matmul tuner sends this broadcast-multiply-sum to cuBLAS
            logits = nn.matmul_transpose(as_dtype(flat, w.dtype), w)  # with b transposed: no copy of wte^T
        else:  # (on the CPU the same form would run as Jittor's generic loops)
            logits = as_dtype(flat, w.dtype) @ w.t()
        return as_dtype(logits, "float32").reshape(*h.shape[:-1], -1)

    def supervised_hidden(self, idx, targets, attention_mask):
        """(final hidden states, targets) at the supervised positions, in row-major (b, t) order."""
        h, _ = self.transformer(idx, attention_mask)
        # the supervised positions on the host (the targets are input data, no compute to wait
        # for): jt.where(cond) would be cub's DeviceSelect on CUDA (which CUDA 13's cub cannot
        # compile without tools/jittor_cuda_fix.py) and a device-to-host copy every step
        flat_targets = targets.numpy().reshape(-1)
        keep = jt.array(np.flatnonzero(flat_targets != IGNORE_INDEX).astype(np.int32))
        return h.reshape(-1, h.shape[-1])[keep], targets.reshape(-1)[keep]

    def supervised_hidden_packed(self, idx, targets, attention_mask):
        """supervised_hidden() computed on the real tokens only (cpu_kernels.PackedRows), or
        None where that cannot give the same result (a target on a pad, or no target at all).

        Padding is often a third of a batch of SQuAD examples, and the loss needs no pad:
        real tokens never attend to pads. So the real tokens are packed into one (rows, C)
        matrix, with each row of the batch a causal sequence of its own. Positions are the
        same as in transformer(): cumsum(mask) - 1. The last block only computes the
        positions from each row's first supervised token on: nothing after it reads the others.
        """
        B, T = idx.shape
        self._check_length(T)
        tgt = targets.numpy().reshape(B, T)  # host copies (input data; no compute to wait for)
        mask = np.ones((B, T), bool) if attention_mask is None else attention_mask.numpy().reshape(B, T) > 0
        supervised = (tgt != IGNORE_INDEX) & mask
        if not supervised.any() or (tgt[~mask] != IGNORE_INDEX).any():
            return None
        rows = np.flatnonzero(mask)  # the real tokens, row-major
        pos = np.cumsum(mask, 1) - 1  # of each real token in its row
        x = self.drop(self.wte(idx.reshape(-1)[jt.array(rows.astype(np.int32))]) +
                      self.wpe(jt.array(pos.reshape(-1)[rows].astype(np.int32))))  # (rows, C)
        lengths = mask.sum(1)
        layout = cpu_kernels.PackedRows(lengths)
        # the last block: each row's queries run from its first supervised token to its end
        queries = np.zeros(B, np.int64)
        for b in np.flatnonzero(supervised.any(1)):
            queries[b] = lengths[b] - pos[b, np.argmax(supervised[b])]
        last = layout.with_queries(queries)
        for i, block in enumerate(self.h):
            x = block.execute_packed(x, layout if i < len(self.h) - 1 else last)
        out_rows = last.query_rows()  # packed row of each row of x now
        keep = np.flatnonzero(supervised.reshape(-1)[rows][out_rows])
        packed_targets = tgt.reshape(-1)[rows][out_rows][keep]
        return self.ln_f(x[jt.array(keep.astype(np.int32))]), jt.array(packed_targets)

    # --- generation ------------------------------------------------------------

    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                 eos_token_id=None, attention_mask=None, seed=None, on_token=None):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens.

        Greedy when temperature == 0, otherwise sampling (optionally top-k / nucleus top-p).
        Prompts of different lengths are LEFT-padded with attention_mask marking real
        tokens. Keys and values are cached, so each new token costs one position. A row
        that produced eos_token_id is finished and padded with eos_token_id from then on;
        generation stops when every row is finished. on_token(next ids (B,)) is called after
        each new token, for streaming (like transformers' streamer); returning True stops.
        Returns (B, T + n_new) as numpy.
        """
        idx = jt.array(idx) if not isinstance(idx, jt.Var) else idx
        B, T = idx.shape
        mask = None
        if attention_mask is not None:
            mask = jt.array(attention_mask) if not isinstance(attention_mask, jt.Var) else attention_mask
            if (mask[:, -1] == 0).any().item():
                raise ValueError("generate() needs LEFT-padded prompts: the last column of "
                                 "attention_mask must be 1 for every row")
        last_hidden = self._decoder(B, T + max_new_tokens)
        # greedy: GreedyHead where it pays (None: the full head); built once per wte version
        head = self._greedy_head() if self.fused and temperature == 0.0 and B <= cpu_kernels.GreedyHead.MAX_ROWS else None
        rng = np.random.default_rng(seed)
        out, done, step_in = [idx.numpy()], np.zeros(B, dtype=bool), idx
        with jt.no_grad():
            for _ in range(max_new_tokens):
                h = last_hidden(step_in, mask)  # (B, C)
                nxt = head.next_tokens(h) if head is not None else None
                if nxt is None and temperature == 0.0:  # greedy: argmax on the device, B token ids to the host
                    nxt = self.lm_head(h).argmax(-1)[0].numpy().astype(np.int64)
                elif nxt is None:  # sampling: the (B, vocab) logits to the host
                    logits = self.lm_head(h).numpy().astype(np.float64)
                    nxt = pick_next_token(logits, temperature, top_k, top_p, rng)
                if eos_token_id is not None:
                    nxt = np.where(done, eos_token_id, nxt)
                    done |= nxt == eos_token_id
                out.append(nxt[:, None])
                if done.all() or (on_token is not None and on_token(nxt)):
                    break
                step_in = jt.array(nxt[:, None].astype(np.int32))
                if mask is not None:
                    mask = jt.concat([mask, jt.ones((B, 1), mask.dtype)], dim=1)
        return np.concatenate(out, axis=1)

    def _decoder(self, batch, capacity):
        """A function (new tokens (B, T), mask of past + new) -> last position's hidden state
        (B, C) that keeps the keys and values of every position it has seen."""
        if self.fused and not self.is_train:  # in-place KV cache (it applies no attention dropout)
            c = self.config
            caches = [cpu_kernels.KVCache(batch, c.n_head, c.n_embd // c.n_head, capacity) for _ in self.h]

            def step(idx, mask):
                x = self.embed(idx, mask, caches[0].length)
                for i, block in enumerate(self.h):  # the last block: only the last position
                    x = block.execute_cached(x, caches[i], mask, 1 if i == len(self.h) - 1 else None)
                return self.ln_f(x)[:, -1]
            return step
        past = None

        def step(idx, mask):
            nonlocal past
            h, past = self.transformer(idx, mask, past)
            return h[:, -1]
        return step

    def _greedy_head(self):
        """cpu_kernels.GreedyHead for wte (the same greedy tokens from half the bytes per step),
        or None where it cannot run. Kept while wte's weight is unchanged: Jittor gives a Var
        a new id whenever it is assigned or updated, and the head is rebuilt then."""
        w = self.wte.weight
        cached = getattr(self, "_greedy", None)  # "_": not a parameter for Jittor
        if cached is None or cached[0] != w.id:
            self._greedy = (w.id, cpu_kernels.GreedyHead.build(w))
        return self._greedy[1]

    # --- checkpoints -----------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, revision=None, **overrides):
        """Load a Hugging Face GPT-2: a folder with config.json + model.safetensors (or
        pytorch_model.bin), or a hub id such as "gpt2-medium" (model_utils.resolve_model:
        huggingface_hub's cache, at `revision`). `overrides` replace config.json values, as in
        transformers (e.g. resid_pdrop=0.0), and are checked like them.

        Accepts GPT2Model keys (h.0...) and GPT2LMHeadModel keys (transformer.h.0...). The
        key set and every shape are checked; anything missing, unexpected or mis-shaped
        raises an error that names it.
        """
        path = resolve_model(path, revision) if is_hub_id(path) else Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such model folder (expected config.json + model.safetensors)")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: missing; a GPT-2 folder needs config.json")
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
            raise ValueError(f"{config_file}: not valid JSON ({type(e).__name__}: {e})") from None
        if isinstance(raw, dict):
            raw.update(overrides)
        config = GPTConfig.from_hf_config(raw, source=config_file)
        state, source = read_hf_weights(path)
        state = strip_transformer_prefix(state)
        check_sizes(config, state, source, config_file)  # before anything is built
        model = cls(config)
        model.load_hf_state_dict(state, source)
        return model

    def load_hf_state_dict(self, state, source="state dict"):
        """Copy Hugging Face GPT-2 tensors {name: np.ndarray} into the model, strictly."""
        state = strip_transformer_prefix(state)
        state = {k: v for k, v in state.items() if not k.endswith(HF_IGNORED_SUFFIXES)}
        own = self.hf_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{source}: does not match a GPT-2 with n_layer={self.config.n_layer}: "
                             f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                             f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        for name, param in own.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(param.shape)} from config.json")
        for name, param in own.items():
            param.assign(jt.array(np.ascontiguousarray(state[name], dtype=np.float32)))

    def hf_state_dict(self):
        """{Hugging Face GPT2Model key: parameter} for the base GPT-2 weights."""
        return {k: v for k, v in self.state_dict().items() if "lora_" not in k}

    def save_pretrained(self, path):
        """Write config.json + model.safetensors that transformers' GPT2LMHeadModel loads."""
        path = Path(path)
        tensors = {"transformer." + k: v.numpy() for k, v in self.hf_state_dict().items()}
        atomic_save_safetensors(path / "model.safetensors", tensors, metadata={"format": "pt"})
        atomic_write_json(path / "config.json", self.config.to_hf_config())


def cross_entropy(logits, targets):
    """Mean cross-entropy of logits (N, V) against class indices (N,), with a stable log-sum-exp,
    in float32, as accurate as torch's. Two details make it so (the PyTorch alignment run found
    them: without them every gradient was ~5x further from a float64 reference than torch's):
    the max is a constant (its gradient, 1 - sum(softmax), is 0, but through a float32 sum of
    50,257 terms it comes out ~1e-5), and the sum over the vocabulary is taken in float64 (a
    float32 running sum is off by ~1e-6 relative, and every gradient inherits that)."""
    logits = as_dtype(logits, "float32")
    m = logits.max(1, keepdims=True).stop_grad()
    lse = as_dtype(as_dtype((logits - m).exp(), "float64").sum(1).log(), "float32") + m.reshape(-1)
    picked = logits.reindex([logits.shape[0]], ["i0", "@e0(i0)"], extras=[targets])
    return (lse - picked).mean()
