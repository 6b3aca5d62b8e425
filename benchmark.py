"""LoRA training and greedy answer generation: Jittor (this project) against transformers +
PEFT on PyTorch, on the same machine, the same weights and the same batches.

    python benchmark.py train --framework jittor          # GPT-2 124M, LoRA r=8, batch 4 x <=384
    python benchmark.py train --framework torch
    python benchmark.py generate --framework jittor       # greedy answers with the KV cache
    python benchmark.py generate --framework torch
    python benchmark.py train --framework jittor --tiny --steps 2 --warmup 1   # smoke test
    python benchmark.py train --framework jittor --variant dora   # DoRA (use_dora) on both sides
    mpirun -np 2 python benchmark.py train --threads 1     # Jittor, 2 processes x batch 4
    python benchmark.py train --framework torch --device cuda --precision bf16 --batch-size 16

Each run prints ONE JSON line on stdout (framework, config, tokens/s or answers/s, median
and min/max of the step time, peak RSS, steps, warm-up time, FLOP accounting) and a short
table on stderr. Run the frameworks one after the other, not at the same time: they
share the cores.

Same work on both sides:
- GPT-2 124M shape, random init written once by transformers (seeded) into a cache folder
  (`prepare`, run in a subprocess so that no PyTorch is loaded next to Jittor); Jittor
  reads it with GPT.from_pretrained, so the weights are identical.
- LoRA r=8, alpha=16, dropout 0.1 on c_attn, c_proj, c_fc (fan_in_fan_out), made by PEFT
  and saved once; Jittor loads that adapter (LoRAGPT.from_pretrained). B is small random
  instead of PEFT's zeros, so the adapter changes generated tokens (speed is the same).
- AdamW, lr 5e-4, weight decay 0.01. GPT-2's own dropouts (0.1) are on in training.
- --variant dora: the same adapter with PEFT's use_dora (its lora_magnitude_vector trains
  too). PiSSA / OLoRA (init only) and LoRA+ (optimizer groups only) run exactly plain
  LoRA's step, so they have no variant here.
- Training batches: real SQuAD examples from gpt2_lora_dataset (read_squad, encode_dataset
  with --max-length, collate; answer-only targets; each batch padded to its longest
  example), in one fixed shuffled order. HF labels are unshifted (hf_batch: one more pad
  column, so that the eos target of the longest row is kept). tokens/s counts real tokens.
- Generation: held-out questions, prompts from gpt2_lora_dataset.encode_prompt, sorted by
  length, batched and left-padded (test_generation.left_pad); greedy, KV cache, stop at
  <|endoftext|>; transformers' model.generate on the PEFT model (LoRA unmerged on both
  sides). Prompt processing is included in the time.

The torch side runs as a user would run it: default threads, default attention (sdpa); on a
GPU model.to("cuda"), torch.autocast for bf16/fp16 (with GradScaler for fp16 training) and
TF32 matmuls for tf32. Both sides take --device and --precision (mixed_precision.py); each
resolves "auto" itself and the JSON says what ran. On a GPU it also reports the peak GPU
memory (each framework's allocator: Jittor's jt.get_mem_info().total_cuda_used after every
step, torch.cuda.max_memory_reserved; and, the same for both, nvidia-smi's memory.used
polled every 50 ms above its value at the start) and MFU: the FLOPs below / time / the GPU's
dense bf16 peak (NVIDIA's datasheet figure, by the name nvidia-smi gives; --peak-tflops).

Under mpirun (Jittor only) --batch-size is per process: each takes its share of every
global batch of batch size x processes examples (gpt2_lora_dataset.rank_share), as
train_default_lora.py does; the LoRA gradients are summed once per step (distributed.py),
and that all-reduce is timed on its own. Rank 0 reports the global batch's tokens.
"""
import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from backend.bench_metrics import (GpuMemoryPeak, cpu_model, generate_flops, matmul_rate, nvidia_smi, peak_bf16_tflops,
                           peak_rss_mb, train_flops)
from gpt2_lora_dataset import SHARED_SQUAD
from backend.mixed_precision import DEVICES, HALF_DTYPES, PRECISIONS, resolve
from model_utils import EOS_ID, IGNORE_INDEX

ROOT = Path(__file__).resolve().parent
SAMPLE_DATA = ROOT / "data" / "squad_sample.json"

# name -> transformers GPT2Config kwargs
MODELS = {
    "gpt2-124M": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
    # --tiny: the smoke test's model (GPT-2's vocabulary, so the real tokenizer and data work)
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, n_positions=256, vocab_size=50257),
}
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["c_attn", "c_proj", "c_fc"])
LR, WEIGHT_DECAY = 5e-4, 0.01


# ----------------------------------------------------------------------------
# The shared checkpoint: base model + adapter, written by transformers and PEFT

def cache_dir(model_name, seed, variant="lora"):
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2_lora_jittor" / "benchmark"
    return root / f"{model_name}-seed{seed}{'' if variant == 'lora' else '-' + variant}"


def prepare(model_name, seed, out, variant="lora"):
    """Write out/base (config.json + model.safetensors) and out/adapter (PEFT LoRA)."""
    import shutil
    import tempfile
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**MODELS[model_name]))
    model.save_pretrained(str(tmp / "base"))
    peft_model = get_peft_model(model, LoraConfig(fan_in_fan_out=True, task_type="CAUSAL_LM",
                                                  use_dora=variant == "dora", **LORA))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)  # nonzero, so generation exercises the adapter
    peft_model.save_pretrained(str(tmp / "adapter"))
    try:
        tmp.rename(out)  # atomic: a parallel run sees the whole folder or none
    except OSError:
        shutil.rmtree(tmp)  # another run got there first
    return out


def ensure_prepared(model_name, seed, variant="lora"):
    out = cache_dir(model_name, seed, variant)
    if not (out / "adapter" / "adapter_model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        # a subprocess: the Jittor run must not carry PyTorch's memory and threads
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "prepare", "--model", model_name,
                        "--seed", str(seed), "--variant", variant], check=True, stdout=subprocess.DEVNULL)
    return out / "base", out / "adapter"


# ----------------------------------------------------------------------------
# Data: the same batches for both frameworks

def default_data(task):
    name = "dev-v1.1-train-split.json" if task == "train" else "dev-v1.1-heldout-split.json"
    path = SHARED_SQUAD / name
    return path if path.is_file() else SAMPLE_DATA


def hf_batch(b):
    """(input_ids, attention_mask, labels) for transformers from one of our batches. Its labels
    are unshifted (labels[t] is predicted at t - 1), so the target at our last position (the
    eos of the longest row) needs one more column: a pad, masked out, predicting nothing."""
    B, T = b["input_ids"].shape
    ids = np.concatenate([b["input_ids"], np.full((B, 1), EOS_ID)], 1).astype(np.int64)
    mask = np.concatenate([b["attention_mask"], np.zeros((B, 1))], 1).astype(np.int64)
    labels = np.full((B, T + 1), IGNORE_INDEX, dtype=np.int64)
    labels[:, 1:] = b["targets"]
    return ids, mask, labels


def train_batches(args, n, rank=0, world_size=1):
    """n steps of (this process's collated batch, the step's real tokens, padded tokens):
    with several processes, rank's share of each global batch of batch_size x world_size."""
    from gpt2_lora_dataset import batches, collate, encode_dataset, rank_share, read_squad
    from model_utils import load_tokenizer
    examples, _ = read_squad(args.data, skip_bad=True)
    features, _ = encode_dataset(load_tokenizer(), examples, max_length=args.max_length)
    groups = batches(features, args.batch_size * world_size, seed=args.seed, epoch=0, drop_last=True)
    if len(groups) < n:
        groups = (groups * (n // max(1, len(groups)) + 1))  # a small file: go round again
    steps = []
    for g in groups[:n]:
        shares = [rank_share(g, world_size, r, 1)[0] for r in range(world_size)]
        lengths = [[len(features[i].input_ids) for i in share] for share in shares]
        steps.append((collate([features[i] for i in shares[rank]]), sum(map(sum, lengths)),
                      sum(len(n) * max(n) for n in lengths)))
    return steps


def generation_batches(args):
    from gpt2_lora_dataset import encode_prompt, read_squad
    from model_utils import load_tokenizer
    from test_generation import left_pad
    tokenizer = load_tokenizer()
    examples, _ = read_squad(args.data, skip_bad=True)
    examples = examples[:args.questions]
    prompts = [encode_prompt(tokenizer, ex.context, ex.question, args.max_length, args.max_new_tokens)[0]
               for ex in examples]
    prompts.sort(key=len)  # like test_generation.answer_questions: similar lengths together
    return [left_pad(prompts[i:i + args.batch_size]) for i in range(0, len(prompts), args.batch_size)]


# ----------------------------------------------------------------------------
# Framework runners: each returns (list of step seconds, extra dict), after setting
# args.device and args.precision to what runs ("auto" resolved by that framework).

def jittor_setup(args):
    from backend.jittor_env import jt
    from backend import cpu_kernels
    from lora_models import LoRAGPT
    from backend import runtime
    args.device, args.precision = runtime.resolve(args.device, args.precision)
    jt.set_global_seed(args.seed)
    base, adapter = ensure_prepared(args.model, args.seed, args.variant)
    model = runtime.prepare(LoRAGPT.from_pretrained(base, adapter), args.device, args.precision)
    if runtime.is_fused(model):
        mm, make = (lambda a, b, t: cpu_kernels.matmul(a, b, trans_b=t)), (lambda *s: jt.randn(*s))
    else:
        dtype = HALF_DTYPES.get(args.precision, "float32")
        mm, make = (lambda a, b, t: a @ (b.t() if t else b)), (lambda *s: jt.randn(*s).cast(dtype))
    gflops = matmul_rate(mm, make, lambda v: v.sync(True), MODELS[args.model]["n_embd"])
    print(runtime.describe(model), file=sys.stderr)
    return jt, model, gflops


def jittor_gpu_memory(jt):
    """MiB held by Jittor's CUDA allocator now (used + cached), as torch.cuda.memory_reserved counts."""
    return jt.get_mem_info().total_cuda_used / 2 ** 20 if jt.flags.use_cuda else None


def jittor_train(args, data):
    """Like train_default_lora.optimizer_step: this process's batch, the gradients summed over
    the processes once (timed separately, after the backward pass has run), one AdamW step
    (fp16: with the loss scaler)."""
    from backend.mixed_precision import LossScaler
    jt, model, gflops = jittor_setup(args)
    from backend import distributed
    opt = jt.optim.AdamW(model.trainable_parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    scaler = LossScaler() if args.precision == "fp16" else None
    model.train()
    times, losses, reduce_times, memory = [], [], [], []
    for b, _, _ in data:
        n = int((b["targets"] != IGNORE_INDEX).sum())
        n_total = distributed.sum_over_ranks([n])[0]  # before the clock: the data of the step
        t = time.perf_counter()
        with distributed.no_sync():
            _, loss = model(jt.array(b["input_ids"]), jt.array(b["targets"]), attention_mask=jt.array(b["attention_mask"]))
            part = loss * (n / n_total)
            opt.backward(part if scaler is None else scaler.scale_loss(part))
        jt.sync_all()
        t_reduce = time.perf_counter()
        loss_sum, = distributed.all_reduce_grads(opt, [loss.item() * n])
        jt.sync_all()
        reduce_times.append(time.perf_counter() - t_reduce)
        if scaler is None:
            opt.step()
        else:  # fp16: as train_default_lora.optimizer_step does it
            scaler.step(opt)
            scaler.update()
        jt.sync_all(True)
        times.append(time.perf_counter() - t)
        losses.append(loss_sum / n_total)
        memory.append(jittor_gpu_memory(jt))
    return times, {"matmul_gflops": gflops, "losses": losses, "allreduce_times": reduce_times,
                   "processes": distributed.world_size, "gpu_allocator_mb": max_or_none(memory)}


def jittor_generate(args, data):
    jt, model, gflops = jittor_setup(args)
    model.eval()
    times, outputs, memory = [], [], []
    for ids, mask in data:
        t = time.perf_counter()
        out = model.generate(ids, args.max_new_tokens, eos_token_id=EOS_ID, attention_mask=mask)
        times.append(time.perf_counter() - t)
        outputs.append(out[:, ids.shape[1]:])
        memory.append(jittor_gpu_memory(jt))
    return times, {"matmul_gflops": gflops, "outputs": outputs, "gpu_allocator_mb": max_or_none(memory)}


def max_or_none(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def torch_setup(args):
    """The PEFT model as PyTorch users run it: model.to(device), torch.autocast for bf16/fp16
    (the weights stay float32), TF32 through torch.backends, default attention (sdpa)."""
    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    args.device, args.precision = resolve(args.device, args.precision, cuda, "torch.cuda.is_available() is False",
                                          bf16_supported=not cuda or torch.cuda.is_bf16_supported())
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    torch.manual_seed(args.seed)
    base, adapter = ensure_prepared(args.model, args.seed, args.variant)
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(base)), str(adapter),
                                      is_trainable=args.task == "train").to(args.device)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = lambda: torch.autocast(args.device, dtype=half, enabled=half is not None)  # noqa: E731
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    gflops = matmul_rate(lambda a, b, t: a @ (b.T if t else b),
                         lambda *s: torch.randn(*s, device=args.device, dtype=half or torch.float32),
                         lambda v: sync(), MODELS[args.model]["n_embd"])
    return torch, model, gflops, autocast


def torch_gpu_memory(torch, args):
    if args.device != "cuda":
        return {}
    return {"gpu_allocator_mb": torch.cuda.max_memory_reserved() / 2 ** 20,
            "gpu_allocated_mb": torch.cuda.max_memory_allocated() / 2 ** 20}


def torch_train(args, data):
    torch, model, gflops, autocast = torch_setup(args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(args.device, enabled=args.precision == "fp16")
    model.train()
    times, losses = [], []
    for b, _, _ in data:
        ids, mask, labels = hf_batch(b)
        t = time.perf_counter()
        with autocast():
            out = model(input_ids=torch.tensor(ids).to(args.device), attention_mask=torch.tensor(mask).to(args.device),
                        labels=torch.tensor(labels).to(args.device))
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())  # waits for the whole step
        times.append(time.perf_counter() - t)
    return times, {"matmul_gflops": gflops, "losses": losses, **torch_gpu_memory(torch, args),
                   "attn_implementation": model.base_model.model.config._attn_implementation}


def torch_generate(args, data):
    torch, model, gflops, autocast = torch_setup(args)
    model.eval()
    times, outputs = [], []
    for ids, mask in data:
        t = time.perf_counter()
        with autocast():
            out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long).to(args.device),
                                 attention_mask=torch.tensor(mask, dtype=torch.long).to(args.device),
                                 max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=EOS_ID, pad_token_id=EOS_ID)
        new = out[:, ids.shape[1]:].cpu().numpy()  # waits for the device
        times.append(time.perf_counter() - t)
        outputs.append(new)
    return times, {"matmul_gflops": gflops, "outputs": outputs, **torch_gpu_memory(torch, args),
                   "attn_implementation": model.base_model.model.config._attn_implementation}


RUNNERS = {("train", "jittor"): jittor_train, ("train", "torch"): torch_train,
           ("generate", "jittor"): jittor_generate, ("generate", "torch"): torch_generate}


# ----------------------------------------------------------------------------
# Reporting

def stats(times):
    t = np.asarray(times)
    return {"median_s": float(np.median(t)), "min_s": float(t.min()), "max_s": float(t.max()),
            "iqr_s": [float(np.percentile(t, 25)), float(np.percentile(t, 75))]}


def run_train(args, rank=0, world_size=1):
    cfg = MODELS[args.model]
    data = train_batches(args, args.warmup + args.steps, rank, world_size)
    times, extra = RUNNERS[("train", args.framework)](args, data)
    warm, measured = times[:args.warmup], times[args.warmup:]
    steps = data[args.warmup:]
    tokens = np.array([real for _, real, _ in steps])  # of the global batch: every process's share
    padded = np.array([pad for _, _, pad in steps])
    rates = tokens / np.asarray(measured)
    # this process's FLOPs; its share of the global batch's work runs in the same time
    flops = np.array([train_flops(b, cfg, LORA["r"]) for b, _, _ in steps])
    achieved = float(np.median(flops / np.asarray(measured))) / 1e9
    return {
        "tokens_per_s": float(np.median(rates)),               # median over steps of real tokens / step time
        "tokens_per_s_total": float(tokens.sum() / np.sum(measured)),
        "step": stats(measured),
        "real_tokens_per_step": float(tokens.mean()), "padded_tokens_per_step": float(padded.mean()),
        "warmup_s": float(np.sum(warm)), "first_step_s": float(times[0]),
        "loss_first": extra["losses"][0], "loss_last": extra["losses"][-1],
        "flops_per_step_G": float(flops.mean() / 1e9), "achieved_gflops": achieved,
        "matmul_gflops": extra["matmul_gflops"],
        "fraction_of_matmul_limit": achieved / extra["matmul_gflops"],
        **{k: extra[k] for k in ("attn_implementation", "gpu_allocator_mb", "gpu_allocated_mb") if k in extra},
        **({"processes": extra["processes"], "allreduce": stats(extra["allreduce_times"][args.warmup:]),
            "allreduce_fraction": float(np.sum(extra["allreduce_times"][args.warmup:]) / np.sum(measured))}
           if "allreduce_times" in extra else {}),
    }


def run_generate(args):
    cfg = MODELS[args.model]
    data = generation_batches(args)
    warm = data[:args.warmup]  # warm-up on the first batches, then time every batch
    times, extra = RUNNERS[("generate", args.framework)](args, warm + data)
    warm_times, measured, outputs = times[:len(warm)], times[len(warm):], extra["outputs"][len(warm):]
    new_tokens = sum(o.size for o in outputs)  # rows x steps (rows finished early count their padding)
    total = float(np.sum(measured))
    flops = sum(generate_flops(m, o.shape[1], cfg, LORA["r"]) for (_, m), o in zip(data, outputs))
    digest = hashlib.sha1(b"".join(np.ascontiguousarray(o, dtype=np.int64).tobytes() for o in outputs)).hexdigest()
    return {
        "answers_per_s": args.questions / total if total else 0.0,
        "new_tokens_per_s": new_tokens / total if total else 0.0,
        "batch": stats(measured), "total_s": total, "new_tokens": int(new_tokens),
        "warmup_s": float(np.sum(warm_times)), "first_step_s": float(times[0]),
        "generated_sha1": digest,  # equal on both sides when the greedy tokens agree
        "achieved_gflops": flops / total / 1e9, "matmul_gflops": extra["matmul_gflops"],
        "fraction_of_matmul_limit": flops / total / 1e9 / extra["matmul_gflops"],
        **{k: extra[k] for k in ("attn_implementation", "gpu_allocator_mb", "gpu_allocated_mb") if k in extra},
    }


def print_table(r):
    rows = [("framework", r["framework"]), ("task", r["task"]), ("model", r["config"]["model"]),
            ("device, precision", f"{r['device']}{' (' + r['gpu'] + ')' if r['gpu'] else ''}, {r['precision']}")]
    if r["task"] == "train":
        s = r["step"]
        if "processes" in r:
            rows += [("processes x batch", f"{r['processes']} x {r['config']['batch_size']}"),
                     ("all-reduce median / share of the time",
                      f"{1000 * r['allreduce']['median_s']:.1f} ms / {100 * r['allreduce_fraction']:.1f}%")]
        rows += [("tokens/s (median)", f"{r['tokens_per_s']:.1f}"),
                 ("step time median [min, max]", f"{s['median_s']:.2f} s [{s['min_s']:.2f}, {s['max_s']:.2f}]"),
                 ("real / padded tokens per step", f"{r['real_tokens_per_step']:.0f} / {r['padded_tokens_per_step']:.0f}")]
    else:
        s = r["batch"]
        rows += [("answers/s", f"{r['answers_per_s']:.2f}"), ("new tokens/s", f"{r['new_tokens_per_s']:.1f}"),
                 ("batch time median [min, max]", f"{s['median_s']:.2f} s [{s['min_s']:.2f}, {s['max_s']:.2f}]")]
    rows += [("warm-up (incl. compile)", f"{r['warmup_s']:.1f} s"),
             ("achieved / matmul GFLOP/s", f"{r['achieved_gflops']:.1f} / {r['matmul_gflops']:.1f} "
                                           f"= {100 * r['fraction_of_matmul_limit']:.0f}%"),
             ("peak RSS", f"{r['peak_rss_mb']:.0f} MB")]
    if r["device"] == "cuda":
        rows += [("peak GPU memory: allocator / nvidia-smi", f"{r.get('gpu_allocator_mb') or 0:.0f} / "
                                                            f"{r.get('gpu_memory_smi_mb') or 0:.0f} MiB")]
    if r["mfu"] is not None:
        rows += [("MFU (vs dense bf16 peak)", f"{100 * r['mfu']:.1f}% of {r['peak_bf16_tflops']:.0f} TFLOP/s")]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows), file=sys.stderr)


def mpi_rank_and_size():
    """(rank, processes) under mpirun, read from OpenMPI's environment: Jittor is imported
    later (after the thread settings), and not at all for --framework torch."""
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", 0)), int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=["train", "generate", "prepare"],
                   help="what to time (prepare: only write the shared checkpoint; used internally)")
    p.add_argument("--framework", choices=["jittor", "torch"], default="jittor", help="which implementation runs")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 10; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed first steps / generation batches (default 2 train, 1 generate)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per training step or generation batch")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest example (train) or prompt + answer (generate), tokens (default 384; 128 with --tiny)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (OMP_NUM_THREADS / torch.set_num_threads); default: the frameworks' own")
    p.add_argument("--data", type=Path, default=None,
                   help="SQuAD v1.1 file (default: ../shared/data/squad train split for train, held-out "
                        "split for generate; data/squad_sample.json if absent)")
    p.add_argument("--questions", type=int, default=16, help="generate: held-out questions to answer")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generate: longest answer, tokens")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide GPT-2 (smoke tests)")
    p.add_argument("--variant", choices=["lora", "dora"], default="lora",
                   help="the adapter on both sides: plain LoRA or DoRA (PEFT's use_dora)")
    p.add_argument("--model", choices=list(MODELS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="weights, adapter and batch order")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto (CUDA when a usable GPU is there), cpu or cuda; the same for either framework")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="fp32, tf32 (CUDA), bf16 or fp16; Jittor: mixed_precision.py, PyTorch: torch.autocast "
                        "(bf16/fp16), TF32 matmuls (tf32). auto: fp32 on the CPU, bf16 on CUDA")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the GPU for MFU (default: from its name, NVIDIA's datasheets)")
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.tiny else "gpt2-124M")
    if args.task == "prepare":
        prepare(args.model, args.seed, cache_dir(args.model, args.seed, args.variant), args.variant)
        return
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before Jittor / torch start their pools
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.task == "train" else 1)
    args.max_length = args.max_length or (128 if args.tiny else 384)
    args.data = args.data or default_data(args.task)
    rank, world_size = mpi_rank_and_size()
    if world_size > 1 and (args.task != "train" or args.framework != "jittor"):
        p.error("under mpirun only `train --framework jittor` runs (Jittor's MPI)")
    gpu = (nvidia_smi("name") or [None])[0]
    try:
        with GpuMemoryPeak() if gpu else contextlib.nullcontext() as memory:
            result = run_train(args, rank, world_size) if args.task == "train" else run_generate(args)
    except (RuntimeError, ValueError) as e:  # e.g. --device cuda without a usable GPU
        sys.exit(f"error: {e}")
    if rank:
        return  # rank 0 reports
    peak, source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else peak_bf16_tflops(gpu)
    on_gpu = args.device == "cuda"
    config = {"model": args.model, **MODELS[args.model], "lora": LORA, "variant": args.variant, "lr": LR, "weight_decay": WEIGHT_DECAY,
              "batch_size": args.batch_size, "processes": world_size, "max_length": args.max_length,
              "threads": args.threads,
              "data": str(args.data), "seed": args.seed}
    if args.task == "train":
        config["steps"], config["warmup"] = args.steps, args.warmup
    else:
        config.update(questions=args.questions, max_new_tokens=args.max_new_tokens, warmup=args.warmup)
    result = {"task": args.task, "framework": args.framework, "config": config,
              "device": args.device, "precision": args.precision, "gpu": gpu if on_gpu else None,
              "cpu": cpu_model(), **result,
              "peak_rss_mb": peak_rss_mb(), "gpu_memory_smi_mb": memory.peak_mb if on_gpu and gpu else None,
              # model FLOP utilisation: the FLOPs the work needs (flop accounting above) / time / peak
              "mfu": result["achieved_gflops"] / (peak * 1e3) if on_gpu and peak else None,
              "peak_bf16_tflops": peak if on_gpu else None, "peak_source": source if on_gpu else None}
    print(json.dumps(result))
    print_table(result)


if __name__ == "__main__":
    main()
