"""The plain Jittor path (fused=False: what runs on a GPU) after the changes that make it compile
with any CUDA and stop leaking work to the host, checked on the CPU against what it computed
before (the same bits in float32 where the math is the same) and against torch:

- attention's softmax in plain ops (GPT2_jittor.softmax) instead of jt.nn.softmax's cub kernel;
- the supervised positions found on the host instead of jt.where(cond) (cub's DeviceSelect);
- token-keyed dropout in bf16/fp16 scaled in float32 and rounded once (torch's rule);
- gradient accumulation that runs each micro-batch's backward at once (train_default_lora.
  materialise_grads), so earlier micro-batches' graphs are not kept alive (the gradients equal
  to float32 rounding: Jittor fuses the operations differently);
- greedy generation's argmax on the device (jt.argmax, the first index among equals, as numpy);
- the LM head's transposed form (nn.matmul_transpose, what CUDA runs) against a @ w.T.
"""
import numpy as np
import pytest
import torch

from backend import runtime, token_dropout
from backend.jittor_env import jt
from jittor import nn
import GPT2_jittor
from GPT2_jittor import GPT, MASK_FILL
from model_utils import IGNORE_INDEX
from helpers import batch_with_padding, measured, norm_err


def masked_scores(rng, B=2, H=3, T=9):
    s = rng.standard_normal((B, H, T, T)).astype(np.float32) * 4
    allowed = np.tril(np.ones((T, T), bool))[None, None] & np.ones((B, 1, 1, 1), bool)
    allowed[1, :, :3, :] = False  # three fully masked query rows (left pads)
    return np.where(allowed, s, np.float32(MASK_FILL))


def test_plain_softmax_is_jittors_cpu_softmax_bit_for_bit_and_never_nan():
    x = masked_scores(np.random.default_rng(0))
    ours = GPT2_jittor.softmax(jt.array(x)).numpy()
    theirs = nn.softmax(jt.array(x), dim=-1).numpy()  # on the CPU: the same formula
    ref = torch.softmax(torch.tensor(x, dtype=torch.float64), -1).numpy()
    err = norm_err(ours, ref)
    print(f"plain softmax vs jt.nn.softmax (CPU): identical={np.array_equal(ours, theirs)}; vs torch float64: {err:.2e}")
    assert np.array_equal(ours, theirs)
    assert np.isfinite(ours).all() and err < 1e-6
    np.testing.assert_array_equal(ours[1, :, :3], np.full((3, 3, x.shape[-1]), 1 / x.shape[-1], np.float32))
    # its gradient is jt.nn.softmax's too
    g = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    xa, xb = jt.array(x), jt.array(x)
    ga = jt.grad((GPT2_jittor.softmax(xa) * jt.array(g)).sum(), xa).numpy()
    gb = jt.grad((nn.softmax(xb, dim=-1) * jt.array(g)).sum(), xb).numpy()
    assert np.array_equal(ga, gb)


def test_supervised_positions_from_the_host_equal_jt_where(hf_checkpoints):
    model = runtime.prepare(GPT.from_pretrained(hf_checkpoints("tiny")), fused=False)
    rng = np.random.default_rng(2)
    ids, mask = batch_with_padding(rng, 3, 12, model.config.vocab_size, "right")
    targets = np.where(rng.random(ids.shape) < 0.4, ids, IGNORE_INDEX).astype(np.int64)
    targets[~mask.astype(bool)] = IGNORE_INDEX
    idx, tgt, m = jt.array(ids), jt.array(targets), jt.array(mask)
    h, t = model.supervised_hidden(idx, tgt, m)
    full, _ = model.transformer(idx, m)  # what the jt.where(cond) version gathered
    keep = jt.where(tgt.reshape(-1) != IGNORE_INDEX)[0]
    assert np.array_equal(h.numpy(), full.reshape(-1, full.shape[-1])[keep].numpy())
    assert np.array_equal(t.numpy(), targets.reshape(-1)[targets.reshape(-1) != IGNORE_INDEX])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_keyed_dropout_scales_in_float32_and_rounds_once(dtype):
    B, T, C, p = 2, 5, 64, 0.1
    mask = np.ones((B, T), np.int64)
    x = jt.array(np.random.default_rng(3).standard_normal((B, T, C)).astype(np.float32)).cast(dtype)
    x32 = x.float32().numpy()  # the half values, exactly
    drop = token_dropout.KeyedDropout(p)
    drop.is_train = True
    with token_dropout.token_keys([7, 8], mask, seed=11):
        ours = drop(x).float32().numpy()
    with token_dropout.token_keys([7, 8], mask, seed=11):
        scale = token_dropout.keep_scale((B, T, C), p, token_dropout.call_seed(), token_dropout.row_keys(B * T)[0]).numpy()
    once = jt.array(x32 * scale).cast(dtype).float32().numpy()  # the float32 product, one rounding (Jittor's cast)
    twice = jt.array(x32 * jt.array(scale).cast(dtype).float32().numpy()).cast(dtype).float32().numpy()  # the old rule
    tdtype = getattr(torch, dtype)
    torch_rule = (torch.tensor(x32).float() * torch.tensor(scale)).to(tdtype).float().numpy()  # torch's dropout
    same_cast = np.array_equal(jt.array(x32 * scale).cast(dtype).float32().numpy(), torch_rule)
    kept = scale > 0
    print(f"{dtype}: kept {kept.mean():.3f}; elements the old rule rounded differently: {(twice != once)[kept].mean():.3f}; "
          f"vs torch's rule: norm err {norm_err(ours, torch_rule):.1e} (Jittor's CPU cast rounds as torch's: {same_cast})")
    assert np.array_equal(ours, once)
    if same_cast:  # bf16 on the CPU: Jittor's cast truncates, torch's rounds to nearest (a GPU's cast rounds)
        assert np.array_equal(ours, torch_rule)
    if dtype == "bfloat16":  # bf16(1/0.9) = 1.109375: the old rule's scale was 0.16% small
        assert (twice != once)[kept].mean() > 0.2
        assert float(jt.array(scale[kept][:1]).cast(dtype).float32().numpy()[0]) == 1.109375


def test_micro_batches_do_not_keep_earlier_graphs_alive(hf_checkpoints):
    from train_default_lora import materialise_grads
    rng = np.random.default_rng(4)
    batches = [batch_with_padding(rng, 2, 16, 50257, "right") for _ in range(6)]

    def accumulate(k, materialise):
        model = runtime.prepare(GPT.from_pretrained(hf_checkpoints("tiny")), fused=False)  # eval: no dropout draws
        opt = jt.optim.AdamW([p for p in model.parameters() if p.name().startswith("h.")], lr=1e-3)
        for ids, mask in batches[:k]:
            tgt = np.where(mask > 0, np.roll(ids, -1, 1), IGNORE_INDEX)
            _, loss = model(jt.array(ids), jt.array(tgt), attention_mask=jt.array(mask))
            opt.backward(loss / k)
            if materialise:
                materialise_grads(opt, loss)
            loss.item()
        jt.gc()
        lived = jt.number_of_lived_vars()
        grads = [g.numpy() for pg in opt.param_groups for g in pg["grads"]]
        del model, opt
        return lived, grads

    jt.gc()
    base = jt.number_of_lived_vars()
    lazy = {k: accumulate(k, False)[0] - base for k in (1, 3, 6)}
    now = {k: accumulate(k, True) for k in (1, 3, 6)}
    lived = {k: v[0] - base for k, v in now.items()}
    line = (f"grad accumulation, live Jittor Vars before opt.step at k = 1 / 3 / 6 micro-batches: "
            f"lazy {lazy[1]} / {lazy[3]} / {lazy[6]}, materialised {lived[1]} / {lived[3]} / {lived[6]}")
    print(line)
    measured(line)
    assert lazy[6] > lazy[1] + 100  # the old way keeps each micro-batch's graph
    assert lived[6] == lived[1] == lived[3]
    lazy_grads = accumulate(6, False)[1]
    # the same sums, but Jittor fuses (and so orders some reductions) differently when each
    # micro-batch's backward runs alone: float32 rounding apart
    same = sum(np.array_equal(a, b) for a, b in zip(now[6][1], lazy_grads))
    err = norm_err(dict(enumerate(now[6][1])), dict(enumerate(lazy_grads)))
    print(f"gradients after 6 micro-batches, materialised vs lazy: {same} of {len(lazy_grads)} tensors identical, "
          f"norm err {err:.1e}")
    assert err < 1e-6


def test_device_argmax_is_the_first_index_among_equals_like_numpy():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 50257)).astype(np.float32)
    logits[1, [10, 500, 40000]] = 9.0  # a tie: the first index, as np.argmax (and the greedy head)
    assert np.array_equal(jt.array(logits).argmax(-1)[0].numpy(), logits.astype(np.float64).argmax(-1))


def test_lm_head_transposed_form_matches_a_times_w_transposed():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((12, 64)).astype(np.float32)
    w = (rng.standard_normal((3000, 64)) * 0.2).astype(np.float32)
    exact = a.astype(np.float64) @ w.astype(np.float64).T
    ours = nn.matmul_transpose(jt.array(a), jt.array(w)).numpy()
    plain = (jt.array(a) @ jt.array(w).t()).numpy()
    e1, e2 = norm_err(ours, exact), norm_err(plain, exact)
    print(f"LM head: matmul_transpose vs float64 {e1:.2e}, a @ w.t() vs float64 {e2:.2e}")
    assert e1 < 1e-6 and e2 < 1e-6
