"""cpu_kernels against plain Jittor: the same formulas, forward and backward.

The model-level references (transformers, PEFT) are in test_gpt2_parity.py and
test_lora_peft.py; here each fused kernel meets the straightforward Jittor expression it
replaces, including the cases the model tests reach only indirectly: several query
blocks (T > 64), fully masked rows, dropout (with the mask rebuilt from the same seed),
packed rows with partial queries. Each test prints the largest difference.
"""
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

from backend.jittor_env import jt
from backend import cpu_kernels as K, token_dropout
from GPT2_jittor import causal_attention
from helpers import hash32, keyed_attention_keep, measured, norm_err

pytestmark = pytest.mark.skipif(not K.available(), reason="needs Jittor on CPU with oneDNN")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def kept_scale(shape, seed, p, keys=None):
    """The dropout kernel's keep mask / (1 - p) for counters 0.. in row-major order of shape,
    or with keys (one per row of the last dimension): keyed by row (token_keys)."""
    ones = jt.ones(shape, "float32").reshape(-1, shape[-1])
    keyed = keys is not None
    return K._code(ones.shape, "float32", [ones, seed, keys if keyed else jt.zeros((1,), "int32")], "common.h",
                   K._DROPOUT_SRC, {"p": float(p), "keyed": float(keyed)}).reshape(shape)


def plain_attention(qkv, mask, H, keep=None):
    """The model's plain-Jittor attention on packed qkv (B, T, 3C); keep: dropout scale mask."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.reshape(B, T, H, C // H).transpose(0, 2, 1, 3) for t in qkv.split(C, dim=2))
    drop = (lambda p: p * keep) if keep is not None else (lambda p: p)
    return causal_attention(q, k, v, mask, drop).transpose(0, 2, 1, 3).reshape(B, T, C)


def masks(B, T):
    right, left = np.ones((B, T), np.int32), np.ones((B, T), np.int32)
    right[1, T - 38:] = 0
    right[2, 5:] = 0
    left[1, :80] = 0
    left[2, :T - 5] = 0  # rows 0..T-6 fully masked: uniform weights, across several query blocks
    return {"none": None, "right": right, "left": left}


@pytest.mark.parametrize("side", ["none", "right", "left"])
def test_padded_attention_equals_plain_jittor(side):
    rng = np.random.default_rng(0)
    B, T, H, D = 3, 150, 4, 16  # T > 64: several query blocks
    x = jt.array(rng.normal(size=(B, T, 3 * H * D)).astype(np.float32))
    w = jt.array(rng.normal(size=(B, T, H * D)).astype(np.float32))
    m = masks(B, T)[side]
    km = None if m is None else jt.array(m)
    ours, ref = K.padded_causal_attention(x, km, H), plain_attention(x, km, H)
    d_fwd = rel_err(ours.numpy(), ref.numpy())
    d_bwd = rel_err(jt.grad((ours * w).sum(), x).numpy(), jt.grad((ref * w).sum(), x).numpy())
    print(f"\npadded attention ({side} padding): relative diff forward {d_fwd:.1e}, d qkv {d_bwd:.1e}")
    assert d_fwd < 1e-6 and d_bwd < 1e-5


def test_attention_dropout_equals_plain_jittor_with_the_same_mask():
    rng = np.random.default_rng(1)
    B, T, H, D, p = 2, 100, 3, 8, 0.3
    x = jt.array(rng.normal(size=(B, T, 3 * H * D)).astype(np.float32))
    w = jt.array(rng.normal(size=(B, T, H * D)).astype(np.float32))
    m = jt.array(masks(3, T)["right"][:B])
    seed = jt.array(np.array([12345, 678], np.int32))
    ours = K._PaddedAttention()(x, m, seed, H, p)
    ref = plain_attention(x, m, H, keep=kept_scale((B, H, T, T), seed, p))
    d_fwd = rel_err(ours.numpy(), ref.numpy())
    d_bwd = rel_err(jt.grad((ours * w).sum(), x).numpy(), jt.grad((ref * w).sum(), x).numpy())
    print(f"\nattention with dropout p={p}: relative diff forward {d_fwd:.1e}, d qkv {d_bwd:.1e}")
    assert d_fwd < 1e-6 and d_bwd < 1e-5


def test_packed_rows_equal_the_padded_batch_on_real_tokens():
    rng = np.random.default_rng(2)
    B, T, H, D = 3, 140, 4, 16
    mask = masks(B, T)["right"]
    x = jt.array(rng.normal(size=(B, T, 3 * H * D)).astype(np.float32))
    padded = K.padded_causal_attention(x, jt.array(mask), H).numpy().reshape(B * T, -1)
    rows = np.flatnonzero(mask.reshape(-1))
    xr = x.reshape(B * T, -1)[jt.array(rows.astype(np.int32))]
    layout = K.PackedRows(mask.sum(1))
    full = K.packed_causal_attention(xr, layout, H)
    d_full = rel_err(full.numpy(), padded[rows])
    # the last layer of a training step: only each row's last few tokens are queries
    part_layout = layout.with_queries(np.minimum([3, 0, 2], mask.sum(1)))
    part = K.packed_causal_attention(xr, part_layout, H)
    picked = part_layout.query_rows()
    d_part = rel_err(part.numpy(), full.numpy()[picked])
    w = rng.normal(size=(len(picked), H * D)).astype(np.float32)
    w_full = np.zeros((layout.n_rows, H * D), np.float32)
    w_full[picked] = w
    d_grad = rel_err(jt.grad((part * jt.array(w)).sum(), xr).numpy(),
                     jt.grad((full * jt.array(w_full)).sum(), xr).numpy())
    print(f"\npacked rows vs padded batch: {d_full:.1e}; partial queries: forward {d_part:.1e}, d qkv {d_grad:.1e}")
    assert d_full < 1e-6 and d_part < 1e-6 and d_grad < 1e-5


@pytest.mark.parametrize("lora,p,keyed", [(False, 0.0, False), (True, 0.0, False), (True, 0.25, False),
                                          (True, 0.25, True)])
def test_linear_equals_plain_jittor(lora, p, keyed):
    rng = np.random.default_rng(3)
    n, n_in, n_out, r, s = 150, 48, 72, 4, 2.0
    x, W, b, A, B, w = (jt.array(rng.normal(size=shape).astype(np.float32))
                        for shape in [(n, n_in), (n_in, n_out), (n_out,), (r, n_in), (n_out, r), (n, n_out)])
    seed = jt.array(np.array([4242, 77], np.int32))
    keys = None
    if lora:
        # keyed: the 150 rows are the real tokens of 3 examples of 60, 50 and 40 tokens
        with token_dropout.token_keys([4, 0, 9], np.arange(60)[None, :] < np.array([[60], [50], [40]]), 0) if keyed \
                else nullcontext():
            ours = K._LoRALinear()(x, W, b, A, B, seed, s, p)
            keys = token_dropout.row_keys(n)[0] if keyed else None
        xd = x * kept_scale((n, n_in), seed, p, keys) if p else x
        ref = jt.matmul(x, W) + b + jt.matmul(jt.matmul(xd, A.transpose(1, 0)), B.transpose(1, 0)) * s
        params = [x, W, b, A, B]
    else:
        ours, ref, params = K.linear(x, W, b), jt.matmul(x, W) + b, [x, W, b]
    d_fwd = rel_err(ours.numpy(), ref.numpy())
    d_bwd = [rel_err(g.numpy(), h.numpy()) for g, h in
             zip(jt.grad((ours * w).sum(), params), jt.grad((ref * w).sum(), params))]
    print(f"\nlinear (lora={lora}, dropout {p}{', keyed by token' if keyed else ''}): relative diff forward {d_fwd:.1e}, "
          f"gradients (x, W, b{', A, B' if lora else ''}) {', '.join(f'{d:.1e}' for d in d_bwd)}")
    assert d_fwd < 1e-6 and max(d_bwd) < 1e-5


def plain_and_fused_modules():
    """One module of each class runtime.FUSED swaps, with random parameters (name -> module, input)."""
    from GPT2_jittor import Conv1D, LayerNorm, NewGELU
    from LoRA import LoRALinear
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(2, 35, 48)) * 3 + 5).astype(np.float32)  # |mean| > std: LayerNorm's hard case
    conv = Conv1D(48, 72)
    lora = LoRALinear(Conv1D(48, 72), r=4, alpha=8)
    lora.lora_B.update(jt.array(rng.normal(size=(72, 4)).astype(np.float32)))
    norm = LayerNorm(48, 1e-5)
    for m in (conv, lora, norm):
        for v in (m.weight, m.bias):
            v.update(jt.array(rng.normal(size=v.shape).astype(np.float32)))
    return {"Conv1D": (conv, x), "LoRALinear": (lora, x), "LayerNorm": (norm, x), "NewGELU": (NewGELU(), x)}


@pytest.mark.parametrize("name", ["Conv1D", "LoRALinear", "LayerNorm", "NewGELU"])
def test_fused_modules_equal_the_plain_modules(name):
    """Each module runtime.prepare swaps, against its own plain execute() on the same parameters,
    forward and backward (input and parameter gradients, through a random weighting)."""
    from backend import runtime
    module, x = plain_and_fused_modules()[name]
    x = jt.array(x)
    params = [x] + [v for v in module.parameters()]
    w = jt.array(np.random.default_rng(5).normal(size=module(x).shape).astype(np.float32))

    def run():
        y = module(x)
        return y.numpy(), [g.numpy() for g in jt.grad((y * w).sum(), params)]
    plain = run()
    runtime.prepare(module)
    assert type(module) is runtime.FUSED[type(module).__mro__[1]]  # swapped to the fused subclass
    fused = run()
    d_fwd = rel_err(fused[0], plain[0])
    d_bwd = max(rel_err(g, h) for g, h in zip(fused[1], plain[1]))
    print(f"\n{name}: fused vs plain module: forward {d_fwd:.1e}, gradients ({len(params)} tensors) {d_bwd:.1e}")
    assert d_fwd < 1e-6 and d_bwd < 1e-5
    runtime.prepare(module, fused=False)
    assert np.array_equal(run()[0], plain[0])  # switched back: the plain formula again, bit for bit


def test_dropout_kernel_rate_scale_gradient_and_seeding():
    x = jt.ones((1000, 300), "float32")
    jt.set_seed(7)
    a = K.dropout(x, 0.1)
    g = jt.grad((a * 3).sum(), x).numpy()
    jt.set_seed(7)
    b = K.dropout(x, 0.1).numpy()
    c = K.dropout(x, 0.1).numpy()
    a = a.numpy()
    kept = (a > 0).mean()
    print(f"\ndropout p=0.1: kept {kept:.4f}; same seed equal: {np.array_equal(a, b)}; next call differs: "
          f"{not np.array_equal(b, c)}")
    assert abs(kept - 0.9) < 0.003 and np.allclose(a[a > 0], 1 / 0.9)
    assert np.array_equal(g, 3 * a)  # the backward pass regenerates the forward mask
    assert np.array_equal(a, b) and not np.array_equal(b, c)


def test_token_keyed_dropout_written_out():
    """Inside token_keys, the packed real tokens' dropout (a row per token) is, exactly, row r
    hashing its columns under the seed mixed with its token's key (example << 12) + position."""
    mask = np.arange(300)[None, :] < np.array([[300], [120], [7]])
    ids = [3, 70000, 11]
    x = jt.ones((int(mask.sum()), 96), "float32")
    op = K._Dropout()
    with token_dropout.token_keys(ids, mask, 5):
        y = op(x, 0.1).numpy()
    s0, s1 = np.uint32(op.seed.numpy()[0]), np.uint32(int(op.seed.numpy()[1]) * 0x01000193 & 0xFFFFFFFF)
    b, pos = np.nonzero(mask)
    token = (np.asarray(ids, np.uint32)[b] << np.uint32(12)) + pos.astype(np.uint32)
    kept = hash32(hash32(s0, s1, token)[:, None], s1, np.arange(96, dtype=np.uint32)) >= np.uint32(0.1 * 2 ** 32)
    print(f"\nkeyed dropout p=0.1 on {x.shape[0]} tokens: kept {kept.mean():.4f}; "
          f"elements unlike the written-out mask: {int(((y > 0) != kept).sum())}")
    assert np.array_equal(y > 0, kept) and np.allclose(y[kept], 1 / 0.9)
    assert abs(kept.mean() - 0.9) < 0.005


def test_token_keyed_attention_dropout_is_the_same_padded_and_packed():
    """Inside token_keys, attention's dropout follows (example, head, query position, key
    position), exactly as keyed_attention_keep writes it out: the padded batch and its packed
    real tokens drop the same probabilities."""
    rng = np.random.default_rng(9)
    B, T, H, D, p = 3, 90, 2, 8, 0.3
    mask = masks(B, T)["right"]
    x = jt.array(rng.normal(size=(B, T, 3 * H * D)).astype(np.float32))
    seed = jt.array(np.array([321, 54], np.int32))
    ref = plain_attention(x, jt.array(mask), H, keep=jt.array(keyed_attention_keep([321, 54], p, [5, 9, 2], B, H, T)))
    ref = ref.numpy().reshape(B * T, -1)
    rows = np.flatnonzero(mask.reshape(-1))
    w = jt.array(rng.normal(size=(len(rows), H * D)).astype(np.float32))
    w_padded = jt.array(np.zeros((B * T, H * D), np.float32))
    w_padded[jt.array(rows.astype(np.int32))] = w
    xr = x.reshape(B * T, -1)[jt.array(rows.astype(np.int32))]
    with token_dropout.token_keys([5, 9, 2], mask, 0):  # the seed words are given to the kernels here
        padded = K._PaddedAttention()(x, jt.array(mask), seed, H, p).reshape(B * T, -1)
        packed = K._PackedAttention()(xr, K.PackedRows(mask.sum(1)), seed, H, p)
    flat = K._PackedAttention()(xr, K.PackedRows(mask.sum(1)), seed, H, p).numpy()
    d = rel_err(packed.numpy(), padded.numpy()[rows])
    g_padded = jt.grad((padded * w_padded).sum(), x).numpy().reshape(B * T, -1)[rows]
    d_grad = rel_err(jt.grad((packed * w).sum(), xr).numpy(), g_padded)
    d_flat = rel_err(flat, padded.numpy()[rows])
    d_ref = rel_err(padded.numpy()[rows], ref[rows])
    print(f"\nkeyed attention dropout p={p}: padded vs the mask written out {d_ref:.1e}; packed vs padded: "
          f"forward {d:.1e}, d qkv {d_grad:.1e}; unkeyed packed differs by {d_flat:.1e}")
    assert d_ref < 1e-6 and d < 1e-6 and d_grad < 1e-5 and d_flat > 1e-2


def test_kv_cache_attend_equals_tuple_cache():
    rng = np.random.default_rng(5)
    B, T, H, D = 2, 70, 4, 8
    C = H * D
    mask = np.ones((B, T + 3), np.int32)
    mask[1, :20] = 0  # left padding
    qkv = jt.array(rng.normal(size=(B, T + 3, 3 * C)).astype(np.float32))
    cache = K.KVCache(B, H, D, T + 3)
    prompt_last = cache.attend(qkv[:, :T], jt.array(mask[:, :T]), queries=1)  # a prompt pass's last block
    steps = [cache.attend(qkv[:, T + i:T + i + 1], jt.array(mask[:, :T + i + 1])) for i in range(3)]
    ref = K.padded_causal_attention(qkv, jt.array(mask), H).numpy()
    d = max([rel_err(prompt_last.numpy()[:, 0], ref[:, T - 1])] +
            [rel_err(s.numpy()[:, 0], ref[:, T + i]) for i, s in enumerate(steps)])
    print(f"\nKV cache (prompt, then 3 steps) vs full attention: relative diff {d:.1e}")
    assert d < 1e-6


@pytest.mark.parametrize("M", [1, 3, 16, 17])
def test_few_row_products_equal_float64(M):
    """A generation step's products (gemm_few: M <= 16 rows, B streamed once) and, at M = 17,
    the sgemm path: x W, x W^T (the LM head's layout) and the LoRA linear with its bias and
    adapter, against float64. Sizes that are no multiple of the vector width (16 floats)
    or of the 4 rows taken per pass test every tail."""
    rng = np.random.default_rng(6)
    n_in, n_out, r, s = 770, 1030, 8, 2.0  # n_in x n_out is large enough for two threads
    x, W, Wt, b, A, B = (rng.normal(size=shape).astype(np.float32)
                         for shape in [(M, n_in), (n_in, n_out), (n_out, n_in), (n_out,), (r, n_in), (n_out, r)])
    x64 = x.astype(np.float64)
    got = {"x W": K.matmul(jt.array(x), jt.array(W)).numpy(),
           "x W^T": K.matmul(jt.array(x), jt.array(Wt), trans_b=True).numpy(),
           "LoRA linear": K.linear(jt.array(x), jt.array(W), jt.array(b), jt.array(A), jt.array(B), s).numpy()}
    ref = {"x W": x64 @ W, "x W^T": x64 @ Wt.T, "LoRA linear": x64 @ W + b + (x64 @ A.T) @ B.T * s}
    d = {k: rel_err(got[k], ref[k]) for k in got}
    print(f"\n{M} rows: relative diff to float64: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
    assert max(d.values()) < 2e-6


def test_lm_head_backward_with_few_rows_sums_like_sgemm():
    """dh = dlogits @ wte, the LM head's backward: a micro-batch with few supervised tokens
    takes gemm_few (M <= 16) with K = 50,257. Its error against float64 must stay at sgemm's
    (M = 17); one running float32 sum over K was 4x further and showed as drift between
    Jittor and PyTorch training."""
    rng = np.random.default_rng(3)
    V, C = 50257, 768
    wte = rng.normal(0, 0.02, (V, C)).astype(np.float32)
    errs = {}
    for M in (8, 17):
        p = rng.dirichlet(np.full(V, 0.5), size=M)  # softmax-like rows, minus the one-hot target
        p[np.arange(M), rng.integers(0, V, M)] -= 1
        d = (p / M).astype(np.float32)
        exact = d.astype(np.float64) @ wte.astype(np.float64)
        errs[M] = norm_err(K.matmul(jt.array(d), jt.array(wte)).numpy(), exact)
    print(f"\ndlogits @ wte (K = {V}) vs float64: ||error|| / ||dh||: 8 rows (gemm_few) {errs[8]:.1e}, "
          f"17 rows (sgemm) {errs[17]:.1e}")
    assert errs[8] <= 2 * errs[17] and errs[8] < 2e-6


def test_decode_steps_equal_the_full_forward_at_a_wide_model():
    """At a width where the KV-cache decode steps run through gemm_few (c_attn 384 x 1152,
    the LM head), their logits equal the no-cache forward pass's (prefill products: sgemm)."""
    from backend import runtime
    from GPT2_jittor import GPT, GPTConfig
    jt.set_global_seed(7)
    model = runtime.prepare(GPT(GPTConfig(n_layer=2, n_head=6, n_embd=384, n_positions=64, vocab_size=5000)))
    ids = np.random.default_rng(7).integers(0, 5000, (3, 20))
    mask = np.ones((3, 20), np.int32)
    mask[1, :6] = 0  # left padding
    last_hidden = model._decoder(3, 20)  # the in-place KV cache generate() uses
    with jt.no_grad():
        steps = [model.lm_head(last_hidden(jt.array(ids[:, :16]), jt.array(mask[:, :16]))).numpy()]
        for t in range(16, 20):
            steps.append(model.lm_head(last_hidden(jt.array(ids[:, t:t + 1]), jt.array(mask[:, :t + 1]))).numpy())
        full = model(jt.array(ids), attention_mask=jt.array(mask)).numpy()
    d = max(rel_err(s, full[:, t]) for s, t in zip(steps, range(15, 20)))
    print(f"\ndecode steps (KV cache, few-row products) vs full forward: relative diff of logits {d:.1e}")
    assert d < 1e-5


def test_greedy_head_picks_the_full_heads_argmax_even_among_near_ties():
    """GreedyHead (bfloat16 prefilter + exact recheck) against argmax of the full float32 head,
    on a table built to defeat the prefilter: groups of rows that differ by less than
    bfloat16 can resolve, and exact duplicates (the first index must win, as in numpy)."""
    rng = np.random.default_rng(8)
    V, C, M = 3000, 96, 8
    E = rng.normal(size=(V, C)).astype(np.float32) * 0.05
    base, other = rng.normal(size=(2, C)).astype(np.float32)
    E[100:400] = base + rng.normal(size=(300, C)).astype(np.float32) * 1e-4  # closer than bf16 resolves
    E[2000] = E[2500] = other                                               # exact duplicates
    h = rng.normal(size=(M, C)).astype(np.float32)
    h[:4] = base * rng.uniform(0.5, 2, size=(4, 1)) + rng.normal(size=(4, C)) * 0.01  # the near ties win
    h[4:7] = other * rng.uniform(0.5, 2, size=(3, 1)) + rng.normal(size=(3, C)) * 0.01  # the duplicates win
    head = K.GreedyHead.build(jt.array(E))
    if head is None:
        pytest.skip("GreedyHead cannot run here (no AVX-512)")
    Ej = head.weight
    ours = head.next_tokens(jt.array(h))
    full = K.matmul(jt.array(h), Ej, trans_b=True).numpy()
    print(f"\ngreedy head: tokens {ours.tolist()}; recomputed exactly per row {head.counts.tolist()}")
    assert np.array_equal(ours, full.argmax(-1))
    assert ((100 <= ours[:4]) & (ours[:4] < 400)).all() and head.counts[:4].min() > 100  # many candidates
    assert (ours[4:7] == 2000).all()  # of two equal logits the first index, as numpy's argmax
    assert head.next_tokens(jt.array(np.concatenate([h, h[:1]]))) is None  # 9 rows: the full head is faster
    nan_h = h.copy()
    nan_h[3, 5] = np.nan
    assert head.next_tokens(jt.array(nan_h)) is None  # no bound holds: the caller uses the full head
    Ej.assign(Ej * 2)
    with pytest.raises(RuntimeError, match="weight changed"):
        head.next_tokens(jt.array(h))
    bad = E.copy()
    bad[7, 3] = np.inf
    assert K.GreedyHead.build(jt.array(bad)) is None
    assert K.GreedyHead.build(jt.array(E[:, :90])) is None  # width not a multiple of 16


def test_generate_rebuilds_the_greedy_head_when_the_embedding_changes():
    from backend import runtime
    from GPT2_jittor import GPT, GPTConfig
    jt.set_global_seed(9)
    # initializer_range 0.2: with GPT-2's 0.02 a 1-layer random model repeats its last input
    # token whatever the embedding is, and the tokens could not tell a stale head from a new one
    model = runtime.prepare(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=300,
                                          initializer_range=0.2)))
    if K.GreedyHead.build(model.wte.weight) is None:
        pytest.skip("GreedyHead cannot be built on this CPU (its kernels need AVX-512): "
                    "generate always uses the full LM head, so there is nothing to rebuild")
    ids = np.random.default_rng(9).integers(0, 300, (2, 5))
    first = model.generate(ids, 6)
    # read generate's cache directly: calling model._greedy_head() here would rebuild it itself
    head_wte_id, head = model._greedy
    assert head is not None and head_wte_id == head.weight_id == model.wte.weight.id
    assert head.counts is not None, "generate did not use the GreedyHead"
    model.wte.weight.assign(jt.array(np.random.default_rng(10).normal(0, 0.2, size=(300, 32)).astype(np.float32)))
    second = model.generate(ids, 6)
    rebuilt_wte_id, rebuilt = model._greedy
    assert rebuilt is not head and rebuilt is not None
    assert rebuilt_wte_id == rebuilt.weight_id == model.wte.weight.id != head_wte_id
    assert rebuilt.counts is not None, "generate did not use the rebuilt GreedyHead"
    model._greedy = (model.wte.weight.id, None)  # the full head for comparison
    full = model.generate(ids, 6)
    n_diff = int((second != full).sum())
    print(f"\ngreedy head rebuilt after wte changed; tokens {second[:, 5:].tolist()} (before the change "
          f"{first[:, 5:].tolist()}); {n_diff} differ from the full head's")
    assert (first[:, 5:] != second[:, 5:]).any()  # a stale head would show in the tokens
    assert n_diff == 0


def test_few_row_products_inside_a_parallel_region():
    """Called from inside a parallel region, gemm_few gets a team of one thread (nested
    regions are off): each caller must still sum over all of K."""
    rng = np.random.default_rng(11)
    x, W = rng.normal(size=(2, 4, 640)).astype(np.float32), rng.normal(size=(640, 800)).astype(np.float32)
    y = K._code((2, 4, 800), "float32", [jt.array(x), jt.array(W)], "matmul.h", r"""
    #pragma omp parallel for num_threads(2)
    for (int i = 0; i < 2; i++)
        gpt2cpu::gemm('N', 'N', 4, 800, 640, (const float*)in0_p + i * 4 * 640, (const float*)in1_p, out0_p + i * 4 * 800);
""").numpy()
    d = rel_err(y, x.astype(np.float64) @ W)
    print(f"\nfew-row products in a parallel region: relative diff to float64 {d:.1e}")
    assert d < 2e-6


@pytest.mark.parametrize("arch", ["-march=native", "default", "-march=skylake-avx512"])
def test_each_header_compiles_alone_without_warnings(arch):
    """Each csrc/ header compiles on its own (it includes what it needs) as C++14, the
    standard Jittor compiles jt.code with, under -Wall -Wextra: no error and no warning,
    for this CPU (Jittor passes -march=native: the AVX-512 paths where it has them), for
    g++'s default target (the paths without AVX-512), and for an AVX-512 target, so that
    the AVX-512 paths are compiled even on a CPU that cannot run them."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++")
    headers = sorted(K._CSRC.glob("*.h"))
    report = {}
    for h in headers:
        out = subprocess.run([gxx, "-std=c++14", "-fopenmp", "-O2", "-Wall", "-Wextra", "-fsyntax-only"] +
                             ([arch] if arch != "default" else []) + ["-x", "c++", str(h)], capture_output=True, text=True)
        report[h.name] = out.returncode, out.stderr
    print(f"\n{arch}: " + ", ".join(f"{n} {'ok' if rc == 0 and not err else 'FAILED'}" for n, (rc, err) in report.items()))
    assert all(rc == 0 and not err for rc, err in report.values()), \
        "\n".join(f"{n}: exit {rc}\n{err}" for n, (rc, err) in report.items() if rc or err)


def test_headers_handed_to_jittor_hold_their_includes_in_order():
    text = K._HEADERS["greedy_head.h"]  # includes matmul.h, which includes common.h
    ends = [text.find(f"#endif  // GPT2CPU_{g}_H") for g in ("COMMON", "MATMUL", "GREEDY_HEAD")]
    print(f"\ngreedy_head.h as handed to jt.code: {len(text.splitlines())} lines; "
          f"common.h, matmul.h, greedy_head.h end at characters {ends}")
    assert '#include "' not in text and 0 <= ends[0] < ends[1] < ends[2]


def test_kernels_refuse_to_run_without_onednn(monkeypatch):
    monkeypatch.setattr(K, "available", lambda: False)
    x = jt.ones((2, 3), "float32")
    with pytest.raises(RuntimeError, match="need Jittor on CPU with oneDNN; check cpu_kernels.available"):
        K.matmul(x, x, trans_b=True)


def test_the_portable_paths_run_and_equal_the_plain_code():
    """The kernels as a CPU without AVX-512 compiles them (many AMD and laptop CPUs): this
    file's tests again, in a process with CPU_KERNELS_NO_AVX512=1. (jt.code puts Jittor's
    definitions after the source's last #include; when that one sat inside
    `#ifdef __AVX512F__`, no kernel compiled on such a CPU.)"""
    here = Path(__file__)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k",
                        "not portable_paths and not compiles_alone"],
                       cwd=here.parents[1], env={**os.environ, "CPU_KERNELS_NO_AVX512": "1"},
                       capture_output=True, text=True, timeout=900)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    print(f"\nwithout AVX-512: {summary}")
    measured(f"cpu_kernels' tests on the paths without AVX-512: {summary}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in summary and " failed" not in summary
