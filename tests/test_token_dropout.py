"""token_dropout.py: the token-keyed dropout masks of the plain Jittor path (the GPU's path)
are the masks written out in NumPy and the fused CPU kernels' masks, bit for bit; so a
batch split into micro-batches draws the same masks on either path."""
from contextlib import nullcontext

import numpy as np
import pytest

from helpers import hash32, keyed_attention_keep
from backend.jittor_env import jt
from backend import cpu_kernels, runtime, token_dropout
from GPT2_jittor import GPT, GPTConfig
from LoRA import LoRAConfig
from lora_models import LoRAGPT

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="needs Jittor on CPU with oneDNN")


def keyed(p, shape, ids, mask, seed):
    """(KeyedDropout's output on ones of `shape` inside token_keys, the call's seed words)."""
    d = token_dropout.KeyedDropout(p)
    d.is_train = True
    with token_dropout.token_keys(ids, mask, seed):
        y = d(jt.ones(shape, "float32")).numpy()
    with token_dropout.token_keys(ids, mask, seed):
        words = token_dropout.call_seed()  # what the first call of a block draws
    return y, words


def test_hash_in_int32_is_the_uint32_hash():
    """Jittor computes in int32; the hash must still be csrc/common.h's uint32 hash, also for
    inputs and intermediate values with the top bit set."""
    rng = np.random.default_rng(0)
    i = np.concatenate([[0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1], rng.integers(0, 2 ** 32, 5000)]).astype(np.uint32)
    s0, s1 = np.uint32(0xDEADBEEF), np.uint32(0x89ABCDEF)
    got = token_dropout.hash32(token_dropout._i32(int(s0)), token_dropout._i32(int(s1)), jt.array(i.view(np.int32)))
    wrong = int((got.numpy().view(np.uint32) != hash32(s0, s1, i)).sum())
    print(f"\nhash32 in Jittor int32 vs NumPy uint32: {wrong} of {i.size} differ")
    assert wrong == 0


def test_rows_of_tokens_are_the_mask_written_out():
    """A (B, T, C) activation: row (b, t) hashes its columns under the call's seed mixed with
    its token's key (example << 12) + position."""
    mask = np.arange(50)[None, :] < np.array([[50], [20], [33]])
    ids, p = [3, 70000, 11], 0.1
    y, words = keyed(p, (3, 50, 96), ids, mask, 5)
    s0, s1 = np.uint32(words[0]), np.uint32(int(words[1]) * 0x01000193 & 0xFFFFFFFF)
    token = (np.asarray(ids, np.uint32)[:, None] << np.uint32(12)) + np.arange(50, dtype=np.uint32)
    kept = hash32(hash32(s0, s1, token)[..., None], s1, np.arange(96, dtype=np.uint32)) >= np.uint32(p * 2 ** 32)
    print(f"\nplain keyed dropout p={p}: kept {kept.mean():.4f}; elements unlike the written-out mask "
          f"{int(((y > 0) != kept).sum())} of {kept.size}")
    assert np.array_equal(y > 0, kept) and np.allclose(y[kept], np.float32(1 / (1 - p)), rtol=0, atol=0)


def test_attention_probabilities_are_the_mask_written_out():
    B, H, T, p = 3, 2, 40, 0.3
    mask = np.arange(T)[None, :] < np.array([[40], [25], [9]])
    y, words = keyed(p, (B, H, T, T), [5, 9, 2], mask, 0)
    ref = keyed_attention_keep(words, p, [5, 9, 2], B, H, T)
    print(f"\nplain keyed attention dropout p={p}: elements unlike the written-out mask {int(((y > 0) != (ref > 0)).sum())}")
    assert np.array_equal(y, ref)


def test_outside_token_keys_it_is_jittors_dropout():
    d = token_dropout.KeyedDropout(0.5)
    d.is_train = True
    jt.set_global_seed(3)
    a = d(jt.ones((64, 64))).numpy()
    jt.set_global_seed(3)
    b = jt.nn.Dropout(0.5, is_train=True)(jt.ones((64, 64))).numpy()
    assert np.array_equal(a, b) and 0.4 < (a > 0).mean() < 0.6
    d.is_train = False
    with token_dropout.token_keys([0], np.ones((1, 64)), 1):
        assert np.array_equal(d(jt.ones((1, 64, 8))).numpy(), np.ones((1, 64, 8)))  # eval: no dropout


def tiny_lora_gpt(seed):
    """A LoRA GPT (base from Jittor's seed 0; LoRA weights and batch from `seed`) with every dropout on (embeddings, attention, residuals, LoRA input) and
    random LoRA weights, plus a batch: 4 examples of lengths 40/25/33/12, the last 6 tokens
    of each supervised."""
    rng = np.random.default_rng(seed)
    jt.set_global_seed(0)  # the random base
    model = LoRAGPT(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=300)),
                    LoRAConfig(r=4, dropout=0.1))
    for p in model.trainable_parameters():
        p.update(jt.array(rng.normal(0, 0.2, p.shape).astype(np.float32)))
    jt.sync_all()  # the random base weights are drawn now, not inside the first forward (after jt.set_seed)
    lengths = [40, 25, 33, 12]
    ids = rng.integers(0, 300, (4, 40)).astype(np.int32)
    targets = np.full((4, 40), -100, np.int32)
    for b, n in enumerate(lengths):
        targets[b, n - 6:n] = rng.integers(0, 300, 6)
    return model, lengths, ids, targets


def loss_sum_and_grads(model, groups, lengths, ids, targets, keyed_masks):
    """Summed token loss and LoRA gradients of the examples, one forward per group."""
    model.train()
    total, grads = 0.0, None
    for g in groups:
        T = max(lengths[b] for b in g)
        mask = np.array([[1] * lengths[b] + [0] * (T - lengths[b]) for b in g], np.int32)
        jt.set_seed(77)
        with token_dropout.token_keys(g, mask, 77) if keyed_masks else nullcontext():
            _, loss = model(jt.array(ids[g, :T]), jt.array(targets[g, :T]), attention_mask=jt.array(mask))
        loss = loss * float((targets[g, :T] != -100).sum())
        gs = jt.grad(loss, model.trainable_parameters())
        total += loss.item()
        grads = [x.numpy() for x in gs] if grads is None else [a + x.numpy() for a, x in zip(grads, gs)]
    return total, grads


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_kernels)], ids=["plain", "fused"])
def test_a_split_batch_draws_the_same_masks(fused):
    """The plain path (the GPU's) and the fused CPU kernels: a batch of 4 and the same examples
    as 2 + 2 (other widths, other places in the batch) give the same loss and LoRA gradients
    inside token_keys; with Jittor's generator (reseeded alike) they do not."""
    model, lengths, ids, targets = tiny_lora_gpt(10)
    runtime.prepare(model, "cpu", "fp32", fused=fused)
    one = loss_sum_and_grads(model, [[0, 1, 2, 3]], lengths, ids, targets, True)
    two = loss_sum_and_grads(model, [[2, 0], [3, 1]], lengths, ids, targets, True)
    flat = loss_sum_and_grads(model, [[2, 0], [3, 1]], lengths, ids, targets, False)
    d_loss, d_grad = abs(one[0] - two[0]) / abs(one[0]), max(rel(a, b) for a, b in zip(two[1], one[1]))
    d_flat, d_flat_grad = abs(one[0] - flat[0]) / abs(one[0]), max(rel(a, b) for a, b in zip(flat[1], one[1]))
    print(f"\n{'fused' if fused else 'plain'} path, batch of 4 vs 2 + 2: summed loss {d_loss:.1e}, LoRA gradients {d_grad:.1e}; "
          f"Jittor's generator: summed loss {d_flat:.1e}, LoRA gradients {d_flat_grad:.1e}")
    assert d_loss < 1e-6 and d_grad < 1e-5
    assert d_flat > 1e-4 and d_flat_grad > 1e-2


@needs_kernels
def test_plain_and_fused_draw_the_same_masks():
    """Every dropout on: the plain Jittor path and the fused CPU kernels give the same loss and
    gradients inside token_keys, as close as they are with dropout off (float32 rounding of
    two implementations: ~1e-5 of the largest gradient with these large random LoRA weights)."""
    differences = {}
    for p in (0.1, 0.0):
        model, lengths, ids, targets = tiny_lora_gpt(11)
        for m in model.modules():
            if isinstance(m, jt.nn.Dropout):
                m.p = p
        runs = {}
        for fused in (True, False):
            runtime.prepare(model, "cpu", "fp32", fused=fused)
            runs[fused] = loss_sum_and_grads(model, [[0, 1, 2, 3]], lengths, ids, targets, True)
        differences[p] = (abs(runs[True][0] - runs[False][0]) / abs(runs[False][0]),
                          max(rel(a, b) for a, b in zip(runs[True][1], runs[False][1])))
    (d_loss, d_grad), (off_loss, off_grad) = differences[0.1], differences[0.0]
    print(f"\nfused vs plain inside token_keys: every dropout 0.1: loss {d_loss:.1e}, LoRA gradients {d_grad:.1e}; "
          f"dropout off: loss {off_loss:.1e}, LoRA gradients {off_grad:.1e}")
    assert d_loss < 1e-6 and d_grad < 3 * max(off_grad, 1e-6)
