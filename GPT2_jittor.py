"""GPT-2 in Jittor, numerically equal to Hugging Face transformers' GPT2LMHeadModel.

Module names follow the Hugging Face checkpoint keys (wte, wpe, h.N.ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f), and the projections keep Hugging Face's
Conv1D layout (weight is (in, out), y = x @ W + b), so a checkpoint loads as a straight
copy with no transposes, and LoRA adapters in PEFT's format apply unchanged.

    model = GPT.from_pretrained("gpt2")          # folder: config.json + model.safetensors
    logits = model(idx)                          # (B, T, vocab)
    logits, loss = model(idx, targets)           # targets[b, t] follows idx[b, t]; -100 = ignored
    out = model.generate(idx, 20, attention_mask=mask)   # greedy, KV cache, left padding

On CPU with oneDNN, the heavy parts run as fused kernels from cpu_kernels.py (attention,
projections with LoRA, LayerNorm, GELU, dropout; same formulas, faster): with targets and
an attention mask, only the real tokens are computed (packed, no padding), and generate()
keeps its KV cache in place. Without those kernels the plain Jittor code below runs.

Model code only: no argument parsing, logging or plotting here.
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from jittor_env import jt
from jittor import nn
import cpu_kernels
from model_utils import atomic_save_safetensors, atomic_write_json, load_safetensors

IGNORE_INDEX = -100  # targets with this value are left out of the loss (PyTorch / HF convention)


@dataclass
class GPTConfig:
    n_layer: int = 12            # transformer blocks
    n_head: int = 12             # attention heads per block
    n_embd: int = 768            # model width; head size is n_embd // n_head
    n_positions: int = 1024      # longest sequence the position table covers
    vocab_size: int = 50257      # GPT-2's BPE vocabulary
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"   # the tanh approximation GPT-2 was trained with
    resid_pdrop: float = 0.1     # dropout after attention / MLP output projections
    embd_pdrop: float = 0.1      # dropout on token + position embeddings
    attn_pdrop: float = 0.1      # dropout on attention probabilities
    initializer_range: float = 0.02  # std of the random init (weights are usually loaded instead)
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @classmethod
    def from_hf_config(cls, cfg, source="config.json"):
        """Build from a Hugging Face GPT-2 config.json dict; errors name `source`."""
        if cfg.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{source}: model_type is {cfg.get('model_type')!r}, expected 'gpt2'")
        act = cfg.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: activation_function {act!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in cfg.items() if k in known})
        if config.n_embd % config.n_head:
            raise ValueError(f"{source}: n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        return config

    def to_hf_config(self):
        """The config.json transformers writes for a GPT2LMHeadModel."""
        cfg = {f.name: getattr(self, f.name) for f in fields(self)}
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions,
                   n_inner=None, scale_attn_weights=True,
                   tie_word_embeddings=True, use_cache=True)
        return cfg


# ----------------------------------------------------------------------------
# Building blocks

def gelu_new(x):
    # GPT-2's tanh approximation of GELU (transformers' NewGELUActivation).
    # x*x*x, not x**3: Jittor's pow is a slow generic kernel on CPU.
    # The clamp changes no float32 value (tanh(15) rounds to 1) but keeps Jittor's tanh
    # gradient finite: it returns NaN for inputs below about -90, which a large negative
    # pre-activation reaches after some training steps.
    if cpu_kernels.available() and x.dtype == "float32":
        return cpu_kernels.gelu_tanh(x)  # the same formula, multi-threaded, one pass each way
    u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))
    return 0.5 * x * (1.0 + jt.tanh(u.clamp(-15.0, 15.0)))


ACTIVATIONS = {"gelu_new": gelu_new, "gelu_pytorch_tanh": gelu_new,
               "gelu": lambda x: 0.5 * x * (1.0 + jt.erf(x / math.sqrt(2.0))),
               "relu": nn.relu}


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 'Conv1D': a linear layer whose weight is stored (in, out)."""

    def __init__(self, nx, nf, std=0.02):
        self.weight = jt.init.gauss((nx, nf), "float32", std=std)
        self.bias = jt.zeros((nf,), "float32")

    def execute(self, x):
        # Flatten to 2-D: on CPU only 2-D matmuls go to oneDNN (see cpu_kernels.linear).
        y = cpu_kernels.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.weight.shape[1])


class LayerNorm(nn.Module):
    """LayerNorm with the centred variance E[(x - mean)^2], as PyTorch computes it.

    (jittor.nn.LayerNorm uses E[x^2] - E[x]^2, which loses digits when |mean| >> std.)
    """

    def __init__(self, n, eps):
        self.eps = eps
        self.weight = jt.ones((n,), "float32")
        self.bias = jt.zeros((n,), "float32")

    def execute(self, x):
        if cpu_kernels.available() and x.dtype == "float32":
            return cpu_kernels.layer_norm(x, self.weight, self.bias, self.eps)  # same formula, one pass
        xc = x - x.mean(-1, keepdims=True)
        var = (xc * xc).mean(-1, keepdims=True)
        return xc / jt.sqrt(var + self.eps) * self.weight + self.bias


def causal_attention(q, k, v, key_mask, attn_drop):
    """softmax(q k^T / sqrt(d) + mask) v with a causal mask and a key padding mask.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) where the last Tq keys are the queries' own
    positions (Tk = cached + new). key_mask: (B, Tk) with 1 for real tokens, or None.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    att = jt.matmul(q, k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(D))  # (B, H, Tq, Tk)
    # query i (absolute position Tk - Tq + i) may look at keys j <= Tk - Tq + i
    allowed = (jt.arange(Tk).reshape(1, Tk) <= jt.arange(Tq).reshape(Tq, 1) + (Tk - Tq))
    allowed = allowed.reshape(1, 1, Tq, Tk)
    if key_mask is not None:
        allowed = allowed & (key_mask.reshape(B, 1, 1, Tk) > 0)
    # Replace (not add) with the most negative float, as transformers does: a fully masked
    # row (a left-padding query) then gets uniform weights instead of NaN.
    att = jt.where(allowed, att, jt.float32(np.finfo(np.float32).min))
    att = attn_drop(nn.softmax(att, dim=-1))
    return jt.matmul(att, v)  # (B, H, Tq, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        self.n_head = config.n_head
        std = config.initializer_range
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd, std)  # q, k, v fused, in this order
        self.c_proj = Conv1D(config.n_embd, config.n_embd, std)
        self.attn_dropout = cpu_kernels.Dropout(config.attn_pdrop)
        self.resid_dropout = cpu_kernels.Dropout(config.resid_pdrop)

    def execute(self, x, key_mask=None, past=None, queries=None):
        """x (B, T, C) -> (attention output, (k, v) cache), or x (rows, C) of packed real
        tokens with key_mask a cpu_kernels.PackedRows -> (output rows, None). With a
        cpu_kernels.KVCache as past, `queries`: only the last that many positions get an output."""
        H = self.n_head
        p_drop = self.attn_dropout.p if self.attn_dropout.is_train else 0.0
        if isinstance(key_mask, cpu_kernels.PackedRows):
            y = cpu_kernels.packed_causal_attention(self.c_attn(x), key_mask, H, p_drop)
            return self.resid_dropout(self.c_proj(y)), None
        if isinstance(past, cpu_kernels.KVCache):  # generation: the cache grows in place
            y = past.attend(self.c_attn(x), key_mask, queries)
            return self.resid_dropout(self.c_proj(y)), past
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        q, k, v = qkv.split(C, dim=2)
        # The cache is (B, H, T, D). Jittor is lazy: in training nothing reads it, so it is never built.
        q, k, v = (t.reshape(B, T, H, C // H).transpose(0, 2, 1, 3) for t in (q, k, v))
        if past is not None:
            k = jt.concat([past[0], k], dim=2)
            v = jt.concat([past[1], v], dim=2)
        # One fused C++ kernel per (batch, head), matmuls in oneDNN (see cpu_kernels.py):
        # the 4-D jt.matmul of causal_attention runs as generic loops on CPU, measured at
        # ~50% of a GPT-2 124M training step.
        if cpu_kernels.available() and past is None:
            y = cpu_kernels.padded_causal_attention(qkv, key_mask, H, p_drop)
        elif cpu_kernels.available() and p_drop == 0.0:
            y = cpu_kernels.cached_attention(qkv, k, v, key_mask, H)
        else:
            y = causal_attention(q, k, v, key_mask, self.attn_dropout)
            y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config):
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd, config.initializer_range)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd, config.initializer_range)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = cpu_kernels.Dropout(config.resid_pdrop)

    def execute(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def execute(self, x, key_mask=None, past=None, queries=None):
        a, present = self.attn(self.ln_1(x), key_mask, past, queries)
        if isinstance(key_mask, cpu_kernels.PackedRows) and key_mask.n_out < key_mask.n_rows:
            x = x[jt.array(key_mask.query_rows())]  # only the rows attention answered go on
        elif queries is not None:
            x = x[:, -queries:]
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


# ----------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    def __init__(self, config):
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.wte.weight.assign(jt.init.gauss(self.wte.weight.shape, "float32", std=config.initializer_range))
        self.wpe.weight.assign(jt.init.gauss(self.wpe.weight.shape, "float32", std=0.01))
        self.drop = cpu_kernels.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)
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

    def transformer(self, idx, attention_mask=None, past_key_values=None):
        """Final hidden states (B, T, C) after ln_f, and the per-layer (k, v) cache.

        attention_mask: (B, T_past + T), 1 = real token, 0 = padding (left or right).
        With a mask, positions count real tokens only: position = cumsum(mask) - 1, as
        Hugging Face generation does, so a left-padded row starts at position 0.
        """
        return self._hidden(idx, attention_mask, past_key_values)

    def _check_length(self, n_tokens):
        if n_tokens > self.config.n_positions:
            raise ValueError(f"sequence of {n_tokens} tokens is longer than the model's "
                             f"n_positions={self.config.n_positions}")

    def _hidden(self, idx, attention_mask=None, past_key_values=None, last_only=False):
        """transformer(); last_only (with cpu_kernels.KVCache caches): the last block computes
        the last position only (the others only add keys and values to the cache), as
        generation needs; that saves 3/4 of the last block's matmuls for a prompt."""
        B, T = idx.shape
        if past_key_values is None:
            T_past = 0
        elif isinstance(past_key_values[0], cpu_kernels.KVCache):
            T_past = past_key_values[0].length
        else:
            T_past = past_key_values[0][0].shape[2]
        self._check_length(T_past + T)
        if attention_mask is None:
            pos = jt.arange(T_past, T_past + T).reshape(1, T)
        else:
            if tuple(attention_mask.shape) != (B, T_past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected {(B, T_past + T)} (past + new tokens)")
            attention_mask = attention_mask.int32()
            pos = jt.cumsum(attention_mask, dim=1) - 1
            pos = jt.where(attention_mask > 0, pos, jt.int32(1))[:, T_past:]  # pads: any valid index
        x = self.drop(self.wte(idx) + self.wpe(pos))
        presents = []
        for i, block in enumerate(self.h):
            past = None if past_key_values is None else past_key_values[i]
            last = last_only and i == len(self.h) - 1 and isinstance(past, cpu_kernels.KVCache)
            x, present = block(x, attention_mask, past, 1 if last else None)
            presents.append(present)
        return self.ln_f(x), presents

    def lm_head(self, h):
        """Logits from hidden states: the head is tied to the token embedding (wte)."""
        flat = h.reshape(-1, h.shape[-1])
        # h @ wte^T without a transposed copy of the (vocab, C) table (154 MB for GPT-2)
        return cpu_kernels.matmul(flat, self.wte.weight, trans_b=True).reshape(*h.shape[:-1], -1)

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
        packed = self._supervised_hidden_packed(idx, targets, attention_mask) if cpu_kernels.available() else None
        if packed is not None:
            h, t = packed
        else:
            h, _ = self.transformer(idx, attention_mask)
            flat_targets = targets.reshape(-1)
            keep = jt.where(flat_targets != IGNORE_INDEX)[0]
            h, t = h.reshape(-1, h.shape[-1])[keep], flat_targets[keep]
        logits = self.lm_head(h)
        return logits, cross_entropy(logits, t)

    def _supervised_hidden_packed(self, idx, targets, attention_mask):
        """(final hidden states, targets) at the supervised positions, in row-major order,
        computed on the real tokens only; None where that cannot give the same result.

        Padding is often a third of a batch of SQuAD examples (63% real tokens at
        max_length 384), and the loss needs no pad: real tokens never attend to pads. So
        the real tokens are packed into one (rows, C) matrix, with each row of the batch a
        causal sequence of its own (cpu_kernels.PackedRows). Positions are the same as in
        transformer(): cumsum(mask) - 1. The last block only computes the positions from
        each row's first supervised token on: nothing after it reads the others.
        """
        B, T = idx.shape
        self._check_length(T)
        tgt = targets.numpy().reshape(B, T)  # host copies (input data; no compute to wait for)
        mask = np.ones((B, T), bool) if attention_mask is None else attention_mask.numpy().reshape(B, T) > 0
        supervised = (tgt != IGNORE_INDEX) & mask
        if not supervised.any() or (tgt[~mask] != IGNORE_INDEX).any():
            return None  # a target on a pad (or none at all): the padded path defines that case
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
            x, _ = block(x, layout if i < len(self.h) - 1 else last)
        out_rows = last.query_rows()  # packed row of each row of x now
        keep = np.flatnonzero(supervised.reshape(-1)[rows][out_rows])
        packed_targets = tgt.reshape(-1)[rows][out_rows][keep]
        return self.ln_f(x[jt.array(keep.astype(np.int32))]), jt.array(packed_targets)

    # --- generation ------------------------------------------------------------

    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                 eos_token_id=None, attention_mask=None, seed=None):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens.

        Greedy when temperature == 0, otherwise sampling (optionally top-k / nucleus top-p).
        Prompts of different lengths are LEFT-padded with attention_mask marking real
        tokens. Keys and values are cached, so each new token costs one position. A row
        that produced eos_token_id is finished and padded with eos_token_id from then on;
        generation stops when every row is finished. Returns (B, T + n_new) as numpy.
        """
        idx = jt.array(idx) if not isinstance(idx, jt.Var) else idx
        B, T = idx.shape
        if attention_mask is not None:
            attention_mask = jt.array(attention_mask) if not isinstance(attention_mask, jt.Var) else attention_mask
            if (attention_mask[:, -1] == 0).any().item():
                raise ValueError("generate() needs LEFT-padded prompts: the last column of "
                                 "attention_mask must be 1 for every row")
        rng = np.random.default_rng(seed)
        out = [idx.numpy()]
        done = np.zeros(B, dtype=bool)
        past, mask, step_in = None, attention_mask, idx
        if cpu_kernels.available() and not self.is_train:  # no attention dropout to apply
            c = self.config
            past = [cpu_kernels.KVCache(B, c.n_head, c.n_embd // c.n_head, T + max_new_tokens)
                    for _ in range(c.n_layer)]
        # greedy: GreedyHead where it pays (None: the full head); built once per wte version
        greedy = temperature == 0.0 and B <= cpu_kernels.GreedyHead.MAX_ROWS
        head = self._greedy_head() if greedy else None
        with jt.no_grad():
            for step in range(max_new_tokens):
                h, past = self._hidden(step_in, mask, past, last_only=True)
                nxt = head.next_tokens(h[:, -1]) if head is not None else None
                if nxt is None:
                    logits = self.lm_head(h[:, -1]).numpy().astype(np.float64)  # (B, vocab)
                    nxt = pick_next_token(logits, temperature, top_k, top_p, rng)
                if eos_token_id is not None:
                    nxt = np.where(done, eos_token_id, nxt)
                    done |= nxt == eos_token_id
                out.append(nxt[:, None])
                if done.all():
                    break
                step_in = jt.array(nxt[:, None].astype(np.int32))
                if mask is not None:
                    mask = jt.concat([mask, jt.ones((B, 1), mask.dtype)], dim=1)
        return np.concatenate(out, axis=1)

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
    def from_pretrained(cls, path):
        """Load a Hugging Face GPT-2 folder: config.json + model.safetensors (or pytorch_model.bin).

        Accepts GPT2Model keys (h.0...) and GPT2LMHeadModel keys (transformer.h.0...). The
        key set and every shape are checked; anything missing, unexpected or mis-shaped
        raises an error that names it.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such model folder (expected config.json + model.safetensors)")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: missing; a GPT-2 folder needs config.json")
        try:
            config = GPTConfig.from_hf_config(json.loads(config_file.read_text()), source=config_file)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None
        state, source = read_hf_weights(path)
        model = cls(config)
        model.load_hf_state_dict(state, source)
        return model

    def load_hf_state_dict(self, state, source="state dict"):
        """Copy Hugging Face GPT-2 tensors {name: np.ndarray} into the model, strictly."""
        state = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in state.items()}
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


# Buffers in Hugging Face checkpoints that are not weights, and the tied LM head.
HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def read_hf_weights(path):
    """{name: np.ndarray} from model.safetensors (no torch needed) or pytorch_model.bin."""
    st, bin_file = path / "model.safetensors", path / "pytorch_model.bin"
    if st.is_file():
        return load_safetensors(st), st
    if bin_file.is_file():
        try:
            import torch
        except ImportError:
            raise RuntimeError(f"{bin_file}: reading .bin weights needs PyTorch (pip install torch), "
                               f"or convert the checkpoint to model.safetensors") from None
        try:
            # weights_only=True: a .bin is a pickle; never run code from a downloaded file.
            sd = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{bin_file}: cannot be read as PyTorch weights ({e})") from None
        return {k: v.float().numpy() for k, v in sd.items()}, bin_file
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")


def cross_entropy(logits, targets):
    """Mean cross-entropy of logits (N, V) against class indices (N,), with a stable log-sum-exp."""
    m = logits.max(1, keepdims=True)
    lse = (logits - m).exp().sum(1).log() + m.reshape(-1)
    picked = logits.reindex([logits.shape[0]], ["i0", f"@e0(i0)"], extras=[targets])
    return (lse - picked).mean()


def pick_next_token(logits, temperature, top_k, top_p, rng):
    """Next token per row from float64 logits (B, V): argmax, or a sample."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p is not None:
        # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, -1)
        drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= top_p  # the first token always stays
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])
