"""Fused CPU kernels for GPT-2 + LoRA in Jittor: attention, LoRA linear, LayerNorm, GELU,
dropout, and the few-row products and greedy LM head of a generation step.

Why fused: Jittor sends only 2-D matmuls to oneDNN on CPU. Attention's batched (B, H, T, T)
matmuls run as generated broadcast-multiply-reduce loops, Jittor's own elementwise kernels
(LayerNorm, GELU, bias and LoRA sums) run on one core, dropout draws its random numbers one
by one, and jt.matmul's gradient copies every frozen weight transposed. Here each piece is
one C++ routine (jt.code), with the matmuls in oneDNN's dnnl_sgemm, and split over the
cores in blocks handed out dynamically (another process may keep a core busy).

Layouts:
- Attention reads q, k, v in place from c_attn's (rows, 3C) output through strides and
  writes y into (rows, C): no transposes. Per (sequence, head) it runs
      S = scale Q K^T -> causal + key-padding mask -> softmax -> dropout -> Y = P V
  on the (Tq, Tk) block while it sits in cache, in query blocks that skip the keys
  causality hides. Three layouts: a padded (B, T) batch with a key mask
  (padded_causal_attention), packed rows, the real tokens of each sequence one after the
  other (PackedRows, packed_causal_attention), and a KV cache grown in place (KVCache).
- linear(): x W + b + LoRA's s (dropout(x) A^T) B^T as one kernel (bias and both products
  accumulate into y), with gradients that skip what nothing reads (frozen W and b).
- Dropout hashes a seed and each element's index: the backward pass regenerates the mask
  instead of storing it. Seeds come from Jittor's generator, so jt.set_seed still makes
  runs repeatable. Inside token_keys() the index is replaced by (the token's example and
  position, column), so a token's masks do not depend on the batch it is in.
- A generation step (a few rows times every weight) is bound by reading the weights:
  few-row products stream each weight once per thread, and GreedyHead picks greedy tokens
  from a bfloat16 copy of the LM head's table with a proven error bound, recomputing in
  float32 the tokens the bound cannot rule out (the same tokens as the full head).

Numbers: each kernel computes the float32 formula of the plain Jittor code it replaces
(named in its docstring); masked scores are replaced, so a fully masked query row gets
uniform weights, as in transformers. tests/test_cpu_kernels.py compares every kernel with
that plain code, forward and backward.

The C++ lives in csrc/ (one header per concern; each jt.code call gets the header it needs
with its local #includes inlined, so Jittor's compile cache, keyed by source text, sees
every change). Measurements behind the design and its thresholds: docs/cpu_kernels.md.
The AVX-512 paths compile where the CPU has it (Jittor passes -march=native); every kernel
also has a portable path, which CPU_KERNELS_NO_AVX512=1 selects on any CPU (for testing it).
Only for Jittor on CPU with oneDNN ("mkl" in Jittor); `available()` says whether they run, and
runtime.prepare(model) is what switches a model to them.
"""
import os
import re
from pathlib import Path

import numpy as np

from backend.jittor_env import jt
from backend import token_dropout  # the token-keyed dropout masks the kernels draw

_CSRC = Path(__file__).resolve().parent / "csrc"


def _inline_includes(name):
    """csrc/<name> with each `#include "x.h"` line replaced by csrc/x.h's text, inlined the
    same way: what jt.code compiles. (Include guards make a file that comes twice count once.)"""
    text = ""
    for line in (_CSRC / name).read_text().splitlines(keepends=True):
        m = re.match(r'#include "(.+)"', line)
        text += _inline_includes(m[1]) if m else line
    return text


# header name -> the C++ text handed to jt.code (read once, at import)
_HEADERS = {p.name: _inline_includes(p.name) for p in sorted(_CSRC.glob("*.h"))}
if os.environ.get("CPU_KERNELS_NO_AVX512") == "1":  # the paths a CPU without AVX-512 runs
    _HEADERS = {name: "#undef __AVX512F__\n" + text for name, text in _HEADERS.items()}


def available():
    """True when the kernels can run: Jittor on CPU with oneDNN loaded."""
    from jittor import compile_extern
    return not jt.flags.use_cuda and getattr(compile_extern, "mkl_ops", None) is not None


def _code(shapes, dtypes, inputs, header, src, data=None):
    """jt.code running src (C++) with csrc/<header> as its header; data: numbers that src
    reads as data["key"] at run time (they are not part of the compiled source)."""
    if not available():
        raise RuntimeError("cpu_kernels need Jittor on CPU with oneDNN; check cpu_kernels.available() first")
    return jt.code(shapes, dtypes, inputs, cpu_header=_HEADERS[header], cpu_src=src, data=data or {})


def _seed():
    """Two 24-bit seed words for one dropout call: 2 x 24 random bits from Jittor's generator
    (so jt.set_seed makes dropout repeatable); inside token_dropout.token_keys(), from its
    seed and the call's number in the block instead (see there)."""
    words = token_dropout.call_seed()
    return jt.randint(0, 1 << 24, (2,), "int32") if words is None else jt.array(words)


def _no_seed():
    return jt.zeros((2,), "int32")


# ----------------------------------------------------------------------------
# Dropout

_DROPOUT_SRC = r"""gpt2cpu::dropout(in0->num, in0_p, gpt2cpu::Drop(data["p"], in1_p, data["keyed"] > 0 ? in2_p : nullptr,
                                                   in0_shape1), out0_p);"""


class _Dropout(jt.Function):
    def execute(self, x, p):
        x = x.reshape(-1, x.shape[-1])  # a row per token
        self.seed, (self.keys, keyed) = _seed(), token_dropout.row_keys(x.shape[0])
        self.data = {"p": float(p), "keyed": keyed}
        return _code(x.shape, "float32", [x, self.seed, self.keys], "common.h", _DROPOUT_SRC, self.data)

    def grad(self, dy):  # the same mask and scale, regenerated from the seed
        return _code(dy.shape, "float32", [dy, self.seed, self.keys], "common.h", _DROPOUT_SRC, self.data), None


def dropout(x, p):
    """Inverted dropout of a float32 Var in training: 0 with probability p, else x / (1 - p).

    The same distribution as jittor.nn.Dropout(p) in training, from a different random
    stream: element i is kept when a hash of (seed, i) clears a threshold (inside
    token_keys(): a hash of (seed, its token, its column)).
    """
    return _Dropout()(x, p).reshape(x.shape)


# ----------------------------------------------------------------------------
# Matmul

_GEMM_SRC = r"""gpt2cpu::gemm(data["ta"] > 0 ? 'T' : 'N', data["tb"] > 0 ? 'T' : 'N', out0_shape0, out0_shape1,
                               data["ta"] > 0 ? in0_shape0 : in0_shape1, in0_p, in1_p, out0_p);"""


def _gemm(a, b, trans_a, trans_b):
    """op(a) @ op(b) for 2-D float32 a, b (gpt2cpu::gemm in csrc/matmul.h)."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    return _code((m, n), "float32", [a, b], "matmul.h", _GEMM_SRC, {"ta": float(trans_a), "tb": float(trans_b)})


class _MatMul(jt.Function):
    def execute(self, a, b, trans_b):
        self.a, self.b, self.trans_b = a, b, trans_b
        return _gemm(a, b, False, trans_b)

    def grad(self, dc):
        a, b = self.a, self.b
        # Jittor is lazy: a gradient nobody reads (a frozen weight's) is never computed.
        if self.trans_b:   # c = a b^T: da = dc b, db = dc^T a
            return _gemm(dc, b, False, False), _gemm(dc, a, True, False), None
        return _gemm(dc, b, False, True), _gemm(a, dc, True, False), None  # c = a b


def matmul(a, b, trans_b=False):
    """2-D a @ b, or a @ b^T with trans_b, with transpose-free gradients; needs available().

    Equals jt.matmul(a, b) (with trans_b: jt.matmul(a, b.transpose(1, 0)), the tied LM head
    of GPT2_jittor.GPT.lm_head). Up to 16 rows of a (a generation step) it streams b once
    per thread instead of calling sgemm.
    """
    return _MatMul()(a, b, trans_b)


# ----------------------------------------------------------------------------
# Linear layer with LoRA

class _LoRALinear(jt.Function):
    """x W + b + s (dropout(x) A^T) B^T; r = 0: x W + b (A and B are then placeholders)."""

    def execute(self, x, weight, bias, lora_A, B_full, seed, scaling, p_drop):
        n, n_out, r = x.shape[0], weight.shape[1], lora_A.shape[0] if scaling else 0
        keys, keyed = token_dropout.row_keys(n) if p_drop > 0 else (jt.zeros((1,), "int32"), 0.0)
        self.data = {"r": r, "s": float(scaling), "p": float(p_drop), "keyed": keyed}
        y, a = _code([(n, n_out), (n, max(r, 1))], ["float32", "float32"],
                     [x, weight, bias, lora_A, B_full, seed, keys], "linear.h", r"""
    gpt2cpu::lora_forward(in0_shape0, in1_shape0, in1_shape1, (int64_t)data["r"], in0_p, in1_p, in2_p, in3_p, in4_p,
                          (float)data["s"], gpt2cpu::Drop(data["p"], in5_p, data["keyed"] > 0 ? in6_p : nullptr,
                                                          in0_shape1), out0_p, out1_p);""", self.data)
        self.saved = (x, weight, lora_A, B_full, seed, keys, a)
        return y

    def grad(self, dy):
        x, weight, lora_A, B_full, seed, keys, a = self.saved
        r, (n_in, n_out) = self.data["r"], weight.shape
        # Jittor is lazy: of these, only what something reads is computed (no dW for a frozen W).
        dW, db = _gemm(x, dy, True, False), dy.sum(0)
        if not r:
            return _gemm(dy, weight, False, True), dW, db, None, None, None, None, None
        g = _gemm(dy, B_full, False, False) * self.data["s"]  # (n, r), shared by both kernels below
        dx = _code(x.shape, "float32", [dy, weight, lora_A, g, seed, keys], "linear.h", r"""
    gpt2cpu::lora_input_grad(in0_shape0, in1_shape0, in1_shape1, in2_shape0, in0_p, in1_p, in2_p, in3_p,
                             gpt2cpu::Drop(data["p"], in4_p, data["keyed"] > 0 ? in5_p : nullptr, in1_shape0),
                             out0_p);""", self.data)
        dA, dB = _code([(r, n_in), (n_out, r)], ["float32", "float32"], [dy, x, a, g, seed, keys], "linear.h", r"""
    gpt2cpu::lora_weight_grads(in0_shape0, in1_shape1, in0_shape1, in3_shape1, in0_p, in1_p, in2_p, in3_p,
                               (float)data["s"], gpt2cpu::Drop(data["p"], in4_p, data["keyed"] > 0 ? in5_p : nullptr,
                                                               in1_shape1), out0_p, out1_p);""", self.data)
        return dx, dW, db, dA, dB, None, None, None


def linear(x, weight, bias, lora_A=None, B_full=None, scaling=0.0, p_drop=0.0):
    """x (n, in) @ weight (in, out) + bias, plus LoRA's scaling * (dropout(x) lora_A^T) B_full^T,
    as one kernel; needs available().

    Equals LoRA.LoRALinear.execute's one-line LoRA formula (dropout: the hashed kernel of
    dropout() above), and without lora_A GPT2_jittor.Conv1D's x @ W + b. Gradients skip
    what nothing reads (a frozen weight's and bias's).
    """
    if lora_A is None:
        lora_A = B_full = jt.zeros((1, 1), "float32")
        scaling = 0.0
    seed = _seed() if p_drop > 0 else _no_seed()
    return _LoRALinear()(x, weight, bias, lora_A, B_full, seed, scaling, p_drop)


# ----------------------------------------------------------------------------
# LayerNorm and GELU

class _LayerNorm(jt.Function):
    def execute(self, x, weight, bias, eps):
        n, C = x.shape
        y, mean, rstd = _code([(n, C), (n,), (n,)], ["float32"] * 3, [x, weight, bias], "layer_norm.h", r"""
    gpt2cpu::layer_norm(in0_shape0, in0_shape1, in0_p, in1_p, in2_p, (float)data["eps"], out0_p, out1_p, out2_p);""",
                              {"eps": float(eps)})
        self.saved = (x, weight, mean, rstd)
        return y

    def grad(self, dy):
        x, weight, mean, rstd = self.saved
        dx = _code(x.shape, "float32", [x, weight, mean, rstd, dy], "layer_norm.h", r"""
    gpt2cpu::layer_norm_backward(in0_shape0, in0_shape1, in0_p, in1_p, in2_p, in3_p, in4_p, out0_p);""")
        # weight / bias gradients (lazy: only computed when they train)
        xhat = (x - mean.unsqueeze(1)) * rstd.unsqueeze(1)
        return dx, (dy * xhat).sum(0), dy.sum(0), None


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dimension of a float32 x, one pass each way, rows split over
    the cores. Equals GPT2_jittor.LayerNorm.execute's plain formula (centred variance)."""
    shape = x.shape
    return _LayerNorm()(x.reshape(-1, shape[-1]), weight, bias, eps).reshape(shape)


class _GeluTanh(jt.Function):
    def execute(self, x):
        self.x = x
        return _code(x.shape, "float32", [x], "gelu.h", "gpt2cpu::gelu_tanh(in0->num, in0_p, nullptr, out0_p);")

    def grad(self, dy):
        return _code(dy.shape, "float32", [self.x, dy], "gelu.h", "gpt2cpu::gelu_tanh(in0->num, in0_p, in1_p, out0_p);")


def gelu_tanh(x):
    """GPT-2's tanh-approximated GELU of a float32 x (transformers' NewGELUActivation), one
    pass each way. Equals GPT2_jittor.gelu_new's plain formula (with its clamp)."""
    return _GeluTanh()(x)


# ----------------------------------------------------------------------------
# Attention

class _PaddedAttention(jt.Function):
    def execute(self, qkv, mask, seed, n_head, p_drop):
        B, T, C3 = qkv.shape
        keys, keyed = token_dropout.row_keys(B * T) if p_drop > 0 else (jt.zeros((1,), "int32"), 0.0)
        self.saved = (qkv, mask, seed, keys)
        self.data = {"H": n_head, "p": float(p_drop), "has_mask": float(mask.ndim == 2), "keyed": keyed}
        y, self.probs = _code([(B, T, C3 // 3), (B, n_head, T, T)], ["float32", "float32"], [qkv, mask, seed, keys],
                              "attention.h", r"""
    gpt2cpu::padded_attention(in0_shape0, in0_shape1, in0_shape2 / 3, (int)data["H"], data["has_mask"] > 0 ? in1_p : nullptr,
                              gpt2cpu::Drop(data["p"], in2_p, data["keyed"] > 0 ? in3_p : nullptr), in0_p, out0_p, out1_p);""",
                              self.data)
        return y

    def grad(self, dy):
        qkv, mask, seed, keys = self.saved
        return _code(qkv.shape, "float32", [qkv, mask, seed, keys, self.probs, dy], "attention.h", r"""
    gpt2cpu::padded_attention(in0_shape0, in0_shape1, in0_shape2 / 3, (int)data["H"], data["has_mask"] > 0 ? in1_p : nullptr,
                              gpt2cpu::Drop(data["p"], in2_p, data["keyed"] > 0 ? in3_p : nullptr), in0_p, nullptr, in4_p,
                              in5_p, out0_p);""", self.data), None, None, None, None


def padded_causal_attention(qkv, key_mask, n_head, p_drop=0.0):
    """Causal self-attention of a padded batch from c_attn's output qkv (B, T, 3C) -> (B, T, C).

    key_mask: (B, T), 1 = real token, or None; p_drop: dropout on the probabilities.
    Equals GPT2_jittor.causal_attention on the heads of q, k, v split from qkv (its output
    transposed back to (B, T, C)); dropout: the hashed kernel of dropout().
    """
    mask = key_mask.int32() if key_mask is not None else jt.zeros((1,), "int32")
    return _PaddedAttention()(qkv, mask, _seed() if p_drop > 0 else _no_seed(), n_head, p_drop)


class PackedRows:
    """The real tokens of a padded batch, row after row, with no padding between them.

    lengths[b] real tokens of row b; queries[b]: how many of its LAST tokens need an output
    (all of them, except in the last layer when only supervised positions are needed).
    Its attention treats each row's tokens as one causal sequence, which is exactly what
    the padded batch computes for its real tokens: causal attention never looks past a
    token, and padded keys are masked, so dropping the pads changes no real output.
    """

    def __init__(self, lengths, queries=None):
        lengths = np.asarray(lengths, dtype=np.int64)
        queries = lengths if queries is None else np.asarray(queries, dtype=np.int64)
        self.lengths, self.queries = lengths, queries
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.n_rows, self.n_out = int(lengths.sum()), int(queries.sum())
        keep = lengths > 0
        # per sequence (first row, rows, queries): csrc/attention.h's packed_heads
        self.seg = jt.array(np.stack([self.starts, lengths, queries], 1)[keep].astype(np.int32))
        self.n_probs = int((lengths * queries).sum())
        if token_dropout.active() and self.n_out < self.n_rows:  # inside token_keys(): the query rows' keys
            token_dropout.register(self.n_out, token_dropout.row_keys(self.n_rows)[0].numpy()[self.query_rows()])

    def query_rows(self):
        """Indices of the rows that get an output, in output order."""
        return np.concatenate([np.arange(s + n - q, s + n) for s, n, q in
                               zip(self.starts, self.lengths, self.queries)]).astype(np.int32)

    def with_queries(self, queries):
        return PackedRows(self.lengths, queries)


class _PackedAttention(jt.Function):
    def execute(self, qkv, layout, seed, n_head, p_drop):
        keys, keyed = token_dropout.row_keys(qkv.shape[0]) if p_drop > 0 else (jt.zeros((1,), "int32"), 0.0)
        self.saved = (qkv, layout, seed, keys)
        self.data = {"H": n_head, "p": float(p_drop), "keyed": keyed}
        y, self.probs = _code([(layout.n_out, qkv.shape[1] // 3), (n_head * layout.n_probs,)], ["float32", "float32"],
                              [qkv, layout.seg, seed, keys], "attention.h", r"""
    gpt2cpu::packed_attention(in1_shape0, in1_p, in0_shape0, in0_shape1 / 3, (int)data["H"],
                              gpt2cpu::Drop(data["p"], in2_p, data["keyed"] > 0 ? in3_p : nullptr), in0_p, out0_p, out1_p);""",
                              self.data)
        return y

    def grad(self, dy):
        qkv, layout, seed, keys = self.saved
        return _code(qkv.shape, "float32", [qkv, layout.seg, seed, keys, self.probs, dy], "attention.h", r"""
    gpt2cpu::packed_attention(in1_shape0, in1_p, in0_shape0, in0_shape1 / 3, (int)data["H"],
                              gpt2cpu::Drop(data["p"], in2_p, data["keyed"] > 0 ? in3_p : nullptr), in0_p, nullptr, in4_p,
                              in5_p, out0_p);""", self.data), None, None, None, None


def packed_causal_attention(qkv, layout, n_head, p_drop=0.0):
    """Causal self-attention over packed rows: qkv (rows, 3C) -> (layout.n_out, C).

    Equals padded_causal_attention's outputs at the real tokens of the padded batch that
    layout (a PackedRows) was made from, at its query rows.
    """
    return _PackedAttention()(qkv, layout, _seed() if p_drop > 0 else _no_seed(), n_head, p_drop)


class KVCache:
    """One layer's keys and values during generation, in buffers of a fixed capacity.

    attend() writes the new tokens' keys and values into the buffers in place and attends
    over everything cached so far; a (k, v) tuple cache would be concatenated, copying the
    whole cache at every step. Writing into a Jittor Var in place is outside Jittor's
    dataflow model, so every attend() also takes the previous one's output as an input:
    that orders the steps even if the caller does not sync between them.
    """

    def __init__(self, batch, n_head, head_dim, capacity):
        # uninitialised: attention only reads the positions written so far
        self.k = jt.empty((batch, n_head, capacity, head_dim), "float32")
        self.v = jt.empty((batch, n_head, capacity, head_dim), "float32")
        self.length, self.capacity, self.n_head = 0, capacity, n_head
        self.last = jt.zeros((1,), "int32")
        jt.sync([self.k, self.v, self.last])  # real buffers from here on

    def attend(self, qkv, key_mask, queries=None):
        """Attention output (B, queries, C) of the last `queries` (default all) new tokens of
        qkv (B, Tq, 3C), whose keys and values all join the cache; key_mask (B, length + Tq)
        or None. Equals GPT2_jittor.causal_attention over the cached and new keys."""
        B, Tq, C3 = qkv.shape
        if self.length + Tq > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {Tq} tokens > capacity {self.capacity}")
        mask = key_mask.int32() if key_mask is not None else jt.ones((B, self.length + Tq), "int32")
        y, self.last = _code([(B, queries or Tq, C3 // 3), (1,)], ["float32", "int32"],
                             [qkv, self.k, self.v, mask, self.last], "attention.h", r"""
    gpt2cpu::kv_cache_attend(in0_shape0, in0_shape1, out0_shape1, in0_shape2 / 3, (int)data["H"], (int64_t)data["past"],
                             in1_shape2, in0_p, in1_p, in2_p, in3_p, out0_p);
    out1_p[0] = 0;""", {"H": self.n_head, "past": self.length})
        self.length += Tq
        return y


# ----------------------------------------------------------------------------
# Greedy LM head

class GreedyHead:
    """Greedy next tokens from the tied LM head, through a bfloat16 copy of the embedding.

    The full head streams the whole (vocab, C) float32 table at every generation step. The
    bfloat16 copy halves the bytes; the tokens its error bound cannot rule out are
    recomputed in float32 exactly as the full head computes them, so the chosen tokens
    are the full head's (proof in csrc/greedy_head.h). The copy is made from the weight
    as it is when built; a changed weight (Jittor gives it a new id) needs a new GreedyHead.
    """

    # Above 8 rows the per-token bound checks cost more than the bytes saved: docs/cpu_kernels.md
    MAX_ROWS = 8

    def __init__(self, weight):
        V, C = weight.shape
        self.weight, self.weight_id = weight, weight.id
        self.table, self.bound, ok = _code([(V, C), (V,), (1,)], ["uint16", "float32", "int32"], [weight],
                                           "greedy_head.h", r"""
    out2_p[0] = gpt2cpu::bf16_table(in0_shape0, in0_shape1, in0_p, out0_p, out1_p);""")
        self.ok = bool(ok.item())
        self.counts = None  # per row, the tokens recomputed exactly at the last step

    @classmethod
    def build(cls, weight):
        """A GreedyHead for weight (vocab, C), or None where it cannot run: no CPU kernels,
        no AVX-512, C not a multiple of 16, or a non-finite weight."""
        if not available() or weight.shape[1] % 16:
            return None
        head = cls(weight)
        return head if head.ok else None

    def next_tokens(self, h):
        """argmax over the vocabulary of h (B, C) @ weight^T per row (numpy int64): equals
        the argmax of GPT2_jittor.GPT.lm_head's logits, the first index among equals. None
        where the full head should run instead: more than MAX_ROWS rows, or a row of h that
        is not finite (no bound holds)."""
        if h.shape[0] > self.MAX_ROWS:
            return None
        if self.weight.id != self.weight_id:
            raise RuntimeError("GreedyHead: the weight changed since its bfloat16 copy was made; build a new one")
        B = h.shape[0]
        tokens, counts = _code([(B,), (B,)], ["int32", "int32"], [h, self.weight, self.table, self.bound],
                               "greedy_head.h", r"""
    gpt2cpu::greedy_head(in0_shape0, in1_shape0, in1_shape1, in0_p, in1_p, in2_p, in3_p, out0_p, out1_p);""")
        tokens, self.counts = tokens.numpy(), counts.numpy()
        return None if (tokens < 0).any() else tokens.astype(np.int64)
