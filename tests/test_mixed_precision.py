"""Device and precision on the CPU: the choices (mixed_precision.py, runtime.prepare), the
casting rules of bf16/fp16, their accuracy against transformers, the masked-row fix under a
softmax with the semantics of Jittor's CUDA kernel, and LossScaler against torch's GradScaler.

Jittor runs bfloat16 and float16 on the CPU too (plain Jittor code, no fused kernels), so
the mixed-precision path runs here for real; only the CUDA-specific flags need a GPU
(`make gpu-check` on a GPU machine).
"""
import numpy as np
import pytest
import torch

import GPT2_jittor
from backend import mixed_precision, runtime
from helpers import batch_with_padding, make_hf_model
from backend.jittor_env import jt
from GPT2_jittor import GPT, GPTConfig
from LoRA import LoRAConfig
from lora_models import LoRAGPT
from backend.mixed_precision import HALF_DTYPES, LossScaler, resolve
from model_utils import IGNORE_INDEX

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=100, initializer_range=0.2)
HALF = ["bf16", "fp16"]
F32_MIN = -3.4028234663852886e38  # np.finfo(np.float32).min: transformers' fill, the old one here
NO_GPU = pytest.mark.skipif(jt.has_cuda, reason="checks the refusal on a machine without a GPU")


# ----------------------------------------------------------------------------
# The choices

def test_auto_resolves_to_the_documented_default_of_each_device():
    cases = {("auto", "auto", False, True): ("cpu", "fp32"), ("auto", "auto", True, True): ("cuda", "bf16"),
             ("auto", "auto", True, False): ("cuda", "fp32"),  # a GPU without bf16 tensor cores
             ("cpu", "auto", True, True): ("cpu", "fp32"), ("cuda", "tf32", True, True): ("cuda", "tf32"),
             ("cpu", "bf16", False, True): ("cpu", "bf16"), ("auto", "fp16", False, True): ("cpu", "fp16")}
    for (device, precision, gpu, bf16), want in cases.items():
        got = resolve(device, precision, gpu, bf16_supported=bf16)
        print(f"--device {device} --precision {precision}, GPU {gpu}, bf16 {bf16} -> {got}")
        assert got == want


def test_refusals_say_what_is_wrong():
    with pytest.raises(RuntimeError, match=r"--device cuda: no usable CUDA GPU \(no driver\); use --device cpu"):
        resolve("cuda", "auto", False, "no driver")
    with pytest.raises(ValueError, match="--precision tf32 is a CUDA tensor-core mode; on the CPU use fp32"):
        resolve("cpu", "tf32", True)
    with pytest.raises(ValueError, match="--precision tf32 is a CUDA tensor-core mode"):
        resolve("auto", "tf32", False)
    with pytest.raises(ValueError, match="--device must be one of auto, cpu, cuda, not 'gpu'"):
        resolve("gpu", "auto", True)
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, tf32, bf16, fp16, not 'fp8'"):
        resolve("cpu", "fp8", True)


@NO_GPU
def test_prepare_on_a_machine_without_gpu():
    model = LoRAGPT(GPT(SMALL), LoRAConfig(r=2))
    with pytest.raises(RuntimeError, match="--device cuda: no usable CUDA GPU .nvidia-smi lists no GPU"):
        runtime.prepare(model, device="cuda")
    with pytest.raises(ValueError, match="--precision tf32 is a CUDA tensor-core mode"):
        runtime.prepare(model, precision="tf32")
    with pytest.raises(RuntimeError, match="fused CPU kernels run on the CPU in fp32 only, not with "
                                           "--device cpu --precision bf16"):
        runtime.prepare(model, "cpu", "bf16", fused=True)
    for device in ("auto", "cpu"):
        runtime.prepare(model, device)
        line = runtime.describe(model)
        print(f"--device {device}: {line}")
        assert jt.flags.use_cuda == 0 and line.startswith("device cpu, precision fp32 (float32), ")
        assert runtime.is_fused(model) == runtime.fused_kernels_available()


# ----------------------------------------------------------------------------
# Casting rules

def dtypes(named):
    return {name: str(p.dtype) for name, p in named.items()}


def small_lora_model(seed=0, **lora):
    """A small LoRAGPT whose B is not zero, so that the adapters change the output and every
    LoRA tensor has a gradient."""
    jt.set_global_seed(seed)
    model = LoRAGPT(GPT(SMALL), LoRAConfig(r=2, **lora))
    for m in model.lora_modules.values():
        m.lora_B.assign(jt.randn(*m.lora_B.shape) * 0.1)
    return model


def answer_batch(seed=0, first_target=5):
    """(ids, targets) of 2 rows of 8 tokens, the next token a target from position
    `first_target` on (as in an answer), jt Vars."""
    ids = np.random.default_rng(seed).integers(0, 100, (2, 8)).astype(np.int32)
    targets = np.where(np.arange(8) >= first_target, np.roll(ids, -1, 1), IGNORE_INDEX).astype(np.int32)
    return jt.array(ids), jt.array(targets)


@pytest.mark.parametrize("precision", HALF)
def test_half_stores_only_frozen_base_weights_in_half_and_training_keeps_lora_and_adamw_fp32(precision):
    model = small_lora_model(dropout=0.1)
    fp32 = {n: p.numpy().copy() for n, p in model.model.hf_state_dict().items()}
    runtime.prepare(model, "cpu", precision)
    half = HALF_DTYPES[precision]
    base = model.model.hf_state_dict()
    want = {n: "float32" if n.startswith("ln_f") or ".ln_" in n else half for n in base}
    # rounded as torch rounds: to nearest even (Jittor's own CPU cast to bfloat16 truncates)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    off = sum(int((p.numpy() != torch.tensor(fp32[n]).to(torch_dtype).float().numpy()).sum()) for n, p in base.items())
    print(f"\n{runtime.describe(model)}\nbase: {sorted(set(dtypes(base).items()) - set(want.items())) or 'as expected'}; "
          f"values differing from torch's .to({torch_dtype}): {off}")
    assert dtypes(base) == want and "wte.weight" in base and want["h.0.attn.c_attn.weight"] == half
    assert off == 0
    assert set(dtypes(model.lora_state_dict()).values()) == {"float32"}
    assert runtime.precision_of(model) == precision and not runtime.is_fused(model)

    frozen = {n: p.numpy().copy() for n, p in base.items()}
    opt = jt.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    lora_before = [p.numpy().copy() for p in model.trainable_parameters()]
    model.train()
    logits, loss = model(*answer_batch())
    opt.step(loss)
    pg = opt.param_groups[0]
    states = {"logits": logits, "loss": loss, **{f"grad {i}": g for i, g in enumerate(pg["grads"])},
              **{f"exp_avg {i}": m for i, m in enumerate(pg["m"])},
              **{f"exp_avg_sq {i}": v for i, v in enumerate(pg["values"])},
              **{f"lora {i}": p for i, p in enumerate(model.trainable_parameters())}}
    print(f"loss {loss.item():.4f}; dtypes of logits, loss, grads, AdamW moments, LoRA: "
          f"{sorted(set(dtypes(states).values()))}")
    assert set(dtypes(states).values()) == {"float32"}
    assert all(np.isfinite(v.numpy()).all() for v in states.values())
    moved = [np.abs(p.numpy() - b).max() for p, b in zip(model.trainable_parameters(), lora_before)]
    assert min(moved) > 0  # every LoRA tensor trained
    assert all(np.array_equal(frozen[n], p.numpy()) for n, p in base.items())  # the base did not
    assert dtypes(base) == want


def test_half_keeps_a_modules_to_save_copy_fp32_and_trains_it():
    """modules_to_save's trainable copy of a Conv1D is a trained weight, not a frozen base one:
    in bf16 it stays float32 (AdamW's update, the saved adapter), the frozen base goes half."""
    model = small_lora_model(target_modules=["c_attn", "c_proj"], modules_to_save=["h.0.mlp.c_fc"])
    runtime.prepare(model, "cpu", "bf16")
    saved = {k: v for k, v in model.lora_state_dict().items() if k.startswith("modules_to_save.")}
    assert sorted(saved) == ["modules_to_save.h.0.mlp.c_fc.bias", "modules_to_save.h.0.mlp.c_fc.weight"]
    assert set(dtypes(model.lora_state_dict()).values()) == {"float32"}
    base = {n: p for n, p in model.model.hf_state_dict().items() if not n.startswith("h.0.mlp.c_fc")}
    assert dtypes(base)["h.1.mlp.c_fc.weight"] == dtypes(base)["h.0.attn.c_attn.weight"] == "bfloat16"
    before = {k: v.numpy().copy() for k, v in saved.items()}
    opt = jt.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    _, loss = model(*answer_batch())
    opt.step(loss)
    moved = {k: float(np.abs(v.numpy() - before[k]).max()) for k, v in saved.items()}
    grads = sorted(set(str(g.dtype) for g in opt.param_groups[0]["grads"]))
    print(f"\nbf16, modules_to_save h.0.mlp.c_fc: its copy {sorted(set(dtypes(saved).values()))}, moved by "
          f"{max(moved.values()):.1e}; gradients {grads}; loss {loss.item():.4f}")
    assert min(moved.values()) > 0 and grads == ["float32"] and np.isfinite(loss.item())
    assert set(dtypes(saved).values()) == {"float32"}


@pytest.mark.parametrize("precision", HALF)
def test_merge_in_half_keeps_the_weight_dtype_and_the_adapter(precision):
    """merge() folds the float32 adapter into the half weight and stores it back in half: the
    merged model is closer to the unmerged one than the base model without the adapter is."""
    model = runtime.prepare(small_lora_model(), "cpu", precision)
    ids = jt.array(np.random.default_rng(2).integers(0, 100, (2, 8)).astype(np.int32))
    before = model(ids).numpy()
    for m in model.lora_modules.values():  # marked merged without merging: the base model alone
        m.merged = True
    base = model(ids).numpy()
    for m in model.lora_modules.values():
        m.merged = False
    model.merge()
    merged = model(ids).numpy()
    dtypes_ = {str(m.weight.dtype) for m in model.lora_modules.values()}
    d_merged, d_base = np.abs(merged - before).max(), np.abs(base - before).max()
    print(f"\n[{precision}] max |logits - unmerged|: merged {d_merged:.2e}, base without the adapter {d_base:.2e}; "
          f"weights {dtypes_}")
    assert dtypes_ == {HALF_DTYPES[precision]} and np.isfinite(merged).all()
    assert d_merged < d_base / 2


def recording_matmul(monkeypatch, accumulate_in_fp32=False):
    """Route every `a @ b` of the model through a wrapper that records (a dtype, b dtype, output).
    accumulate_in_fp32: half products computed in float32 and rounded once, as cuBLAS does
    (Jittor's CPU loops for half matmuls accumulate in half: for bf16 with 256 terms, 80 times
    the error of the output's own rounding, measured), so that the placement of the casts,
    not Jittor's CPU kernel, is what an accuracy test measures."""
    calls, matmul = [], jt.Var.__matmul__

    def wrapper(a, b):
        if accumulate_in_fp32 and str(a.dtype) in HALF_DTYPES.values():
            out = matmul(a.float32(), b.float32()).cast(a.dtype)
        else:
            out = matmul(a, b)
        calls.append((str(a.dtype), str(b.dtype), out))
        return out
    monkeypatch.setattr(jt.Var, "__matmul__", wrapper)
    return calls


@pytest.mark.parametrize("precision", HALF)
def test_every_matmul_has_inputs_of_one_dtype_forward_and_backward(monkeypatch, precision):
    """cuBLAS (and oneDNN) refuse a matmul of two dtypes; in the backward pass the inputs are
    the weight and the gradient of the product, so that gradient must come back in the
    product's dtype (runtime sets jt.flags.auto_mixed_precision_level = 3 for it)."""
    model = runtime.prepare(small_lora_model(dropout=0.1), "cpu", precision)
    calls = recording_matmul(monkeypatch)
    model.train()
    _, loss = model(*answer_batch(seed=1, first_target=4), attention_mask=jt.array(np.ones((2, 8), np.int32)))
    outs = [out for *_, out in calls]
    grads = jt.grad(loss, outs)
    forward = {(a, b) for a, b, _ in calls}
    backward = {(str(o.dtype), str(g.dtype)) for o, g in zip(outs, grads)}
    print(f"\n[{precision}] {len(calls)} matmuls; forward (a, b) dtypes {sorted(forward)}; "
          f"(product, its gradient) dtypes {sorted(backward)}")
    assert forward == {(HALF_DTYPES[precision],) * 2}
    assert backward == {(HALF_DTYPES[precision],) * 2}
    assert all(np.isfinite(g.numpy()).all() for g in grads)


def hf_logits(hf, ids, mask, dtype=None):
    """transformers' logits in float32, or under torch.autocast(dtype) on the CPU."""
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def test_fp16_logits_are_as_close_to_transformers_fp32_as_torch_autocast(monkeypatch, hf_checkpoints):
    """Against transformers in float32, our fp16 model (with matmuls that accumulate in float32,
    as on CUDA) errs no more than transformers itself under torch.autocast(float16).

    fp16 only on the CPU: Jittor's CPU conversion to bfloat16 truncates (fp16_compute.h,
    `x >> 16`) where CUDA and torch round to nearest, so the activations' casts lose a bit
    here that they do not lose on a GPU; bf16 against transformers is gpu_check.py's."""
    name, precision = "tiny-gpt2init", "fp16"  # GPT-2's init: logits of GPT-2's size
    hf = make_hf_model(name)
    ids, mask = batch_with_padding(np.random.default_rng(4), B=3, T=24, vocab=50257, side="left")
    real = mask.astype(bool)
    ref = hf_logits(hf, ids, mask)
    autocast = hf_logits(hf, ids, mask, torch.float16)
    model = runtime.prepare(GPT.from_pretrained(hf_checkpoints(name)), "cpu", precision)
    recording_matmul(monkeypatch, accumulate_in_fp32=True)
    ours = model(jt.array(ids), attention_mask=jt.array(mask)).numpy()
    ours_diff, autocast_diff = np.abs(ours - ref)[real].max(), np.abs(autocast - ref)[real].max()
    agree = (ours.argmax(-1) == ref.argmax(-1))[real].mean()
    print(f"\n[{precision}] max |logits - transformers fp32| on real positions: ours {ours_diff:.3e}, "
          f"transformers under autocast {autocast_diff:.3e}; argmax agreement {agree:.3f}")
    assert np.isfinite(ours).all()
    assert 0 < ours_diff <= autocast_diff  # > 0: it did run in half


# ----------------------------------------------------------------------------
# Fully masked rows under a softmax with the semantics of Jittor's CUDA kernel

def cuda_softmax(x, dim=-1):
    """jittor/other/code_softmax.py's softmax_v1, as Jittor ops: float32 inside, the running
    maximum starts at -1e30, then exp, sum, divide; the result in x's dtype."""
    assert dim in (-1, len(x.shape) - 1)
    xf = x.float32()
    m = jt.maximum(xf.max(-1, keepdims=True), jt.float32(-1e30))
    e = (xf - m).exp()
    return (e / e.sum(-1, keepdims=True)).cast(x.dtype)


def test_the_cuda_softmax_emulation_reproduces_the_kernel():
    rows = np.array([[1.0, 2.0, 3.0, -1e9], [-1e9] * 4, [F32_MIN] * 4], np.float32)
    got = cuda_softmax(jt.array(rows)).numpy()
    ref = jt.nn.softmax(jt.array(rows[:2]), dim=-1).numpy()
    print(f"\nCUDA-semantics softmax: a normal row {got[0]}, fully masked at -1e9 {got[1]}, "
          f"at finfo(float32).min {got[2]}")
    assert np.abs(got[:2] - ref).max() < 1e-7 and np.allclose(got[1], 0.25)
    assert np.isnan(got[2]).all()  # the kernel's 0/0: the bug this file guards against


def left_padded_logits(precision, ids, mask):
    model = small_lora_model()
    runtime.prepare(model, "cpu", precision, fused=False)  # the plain formulas call GPT2_jittor.softmax
    return model, model(jt.array(ids), attention_mask=jt.array(mask)).numpy()


def small_left_padded_batch():
    """(ids, mask): 3 rows of 12, 0, 4 and 8 of them left pads (id 0: SMALL's vocabulary has no EOS)."""
    ids, mask = batch_with_padding(np.random.default_rng(5), B=3, T=12, vocab=SMALL.vocab_size, side="left")
    return np.where(mask > 0, ids, 0), mask


LEFT_PADDED = small_left_padded_batch()


@pytest.mark.parametrize("precision", ["fp32"] + HALF)
def test_left_padding_gives_no_nan_under_the_cuda_softmax(monkeypatch, precision):
    ids, mask = LEFT_PADDED
    _, cpu = left_padded_logits(precision, ids, mask)
    monkeypatch.setattr(GPT2_jittor, "softmax", cuda_softmax)  # what attention calls
    model, cuda = left_padded_logits(precision, ids, mask)
    real = mask.astype(bool)
    diff = np.abs(cuda - cpu)[real].max()
    print(f"\n[{precision}] CUDA-semantics softmax, left padding: NaN at real positions "
          f"{int(np.isnan(cuda[real]).sum())}, anywhere {int(np.isnan(cuda).sum())}; "
          f"max |logits - CPU softmax's| on real positions = {diff:.2e}")
    assert np.isfinite(cuda).all()
    assert diff <= (1e-6 if precision == "fp32" else 1e-2)
    tokens = model.generate(ids, 4, attention_mask=mask)
    monkeypatch.undo()
    assert np.array_equal(tokens, model.generate(ids, 4, attention_mask=mask))


@pytest.mark.parametrize("precision", ["fp32"] + HALF)
def test_the_old_fill_gives_nan_at_real_positions_under_the_cuda_softmax(monkeypatch, precision):
    """The test above fails on the fill transformers uses (what causal_attention used before)."""
    ids, mask = LEFT_PADDED
    monkeypatch.setattr(GPT2_jittor, "softmax", cuda_softmax)  # what attention calls
    monkeypatch.setattr(GPT2_jittor, "MASK_FILL", F32_MIN)
    _, logits = left_padded_logits(precision, ids, mask)
    real = mask.astype(bool)
    print(f"\n[{precision}] fill finfo(float32).min: NaN at {int(np.isnan(logits[real]).sum())} of "
          f"{logits[real].size} real logits")
    assert np.isnan(logits[real]).any()


# ----------------------------------------------------------------------------
# LossScaler against torch.amp.GradScaler

def run_both(grads, loss_weight=1.0, **kw):
    """One parameter trained by SGD under LossScaler (Jittor) and GradScaler (torch) with the
    same loss gradients; grads[i] = None: a plain step, else the scaled gradient to inject
    (inf/NaN entries model an fp16 overflow). Returns the per-step records of both."""
    init = np.array([1.0, -2.0, 0.5], np.float32)
    p_jt, p_t = jt.array(init), torch.nn.Parameter(torch.tensor(init))
    opt_jt, opt_t = jt.optim.SGD([p_jt], lr=0.1), torch.optim.SGD([p_t], lr=0.1)
    ours, theirs = LossScaler(**kw), torch.amp.GradScaler("cpu", **kw)
    records = []
    for poison in grads:
        opt_jt.backward(ours.scale_loss((p_jt * p_jt).sum() * (0.5 * loss_weight)))  # gradient w p scale
        theirs.scale((p_t * p_t).sum() * (0.5 * loss_weight)).backward()
        if poison is not None:
            g = np.array(poison, np.float32) * ours.scale
            opt_jt.param_groups[0]["grads"][0].update(jt.array(g))
            p_t.grad.copy_(torch.tensor(g))
        finite = ours.unscale_(opt_jt)
        theirs.unscale_(opt_t)
        g_jt, g_t = opt_jt.param_groups[0]["grads"][0].numpy().copy(), p_t.grad.numpy().copy()
        took = ours.step(opt_jt)
        theirs.step(opt_t)
        ours.update()
        theirs.update()
        opt_t.zero_grad()
        records.append(((finite, took, ours.scale, ours.growth_tracker, g_jt, p_jt.numpy().copy()),
                        (int(theirs._growth_tracker), theirs.get_scale(), g_t, p_t.detach().numpy().copy())))
    return records, ours, theirs


def test_loss_scaler_follows_torch_grad_scaler_step_by_step():
    inf, nan = np.inf, np.nan
    poisons = [None, [inf, 0, 0], None, None, None, [0, nan, 0], None, None, None, None, [-inf, 1, 1], None]
    records, ours, theirs = run_both(poisons, init_scale=2.0 ** 4, growth_interval=3)
    for i, ((finite, took, scale, tracker, g, p), (t_tracker, t_scale, t_g, t_p)) in enumerate(records):
        print(f"step {i + 1}: finite {finite}, stepped {took}, scale {scale:g} (torch {t_scale:g}), "
              f"good steps {tracker} (torch {t_tracker}), params {p} (torch {t_p})")
        assert took == finite == (poisons[i] is None)
        assert (scale, tracker) == (t_scale, t_tracker)
        assert np.array_equal(g, t_g, equal_nan=True) and np.array_equal(p, t_p)
    assert [r[0][2] for r in records] == [16, 8, 8, 8, 16, 8, 8, 8, 16, 16, 8, 8]
    assert ours.skipped_steps == 3
    state = ours.state_dict()
    assert {k: state[k] for k in theirs.state_dict()} == theirs.state_dict()
    copy = LossScaler()
    copy.load_state_dict(state)
    assert copy.state_dict() == state


def test_loss_scaler_stops_growing_where_float32_overflows():
    records, _, _ = run_both([None] * 3, loss_weight=2.0 ** -8, init_scale=2.0 ** 127, growth_interval=1)
    print(f"\nscales from 2**127 with growth every step: ours {[r[0][2] for r in records]}, "
          f"torch {[r[1][1] for r in records]}")
    assert all(r[0][2] == r[1][1] == 2.0 ** 127 for r in records)


def test_loss_scaler_update_needs_unscale():
    with pytest.raises(RuntimeError, match=r"LossScaler.update\(\) without unscale_\(\) or step\(\)"):
        LossScaler().update()
