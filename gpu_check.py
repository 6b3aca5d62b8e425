"""One command that proves the GPU path against transformers + PEFT on the same device.

    make gpu-check                     # on a GPU machine: GPT-2 124M shape, about 9 minutes with Jittor's compile
    make gpu-check DEVICE=cpu          # the same script on the CPU with a tiny model (part of `make test`)
    python gpu_check.py --device cuda --out gpu_check.json --budget-s 400

Writes one JSON report (--out) and a short table (stdout and --out with .md). The checks, in order:
  logits    fp32: max |logits - transformers| on the real positions of a left-padded batch of real
            prompts, and how far each of the two is from transformers in float64 (which one a
            difference comes from); bf16: the same against transformers in fp32 and under
            torch.autocast(bf16) (whose own error is the yardstick), and argmax agreement with fp32
            transformers
  nan       no NaN or inf anywhere, pads included, with left padding in fp32, bf16 and fp16, through
            Jittor's own softmax on this device; and, for the record, the old fill (finfo(float32).min)
            through the same softmax: NaN at real positions on CUDA, none on the CPU
  generate  greedy generate() tokens against transformers' generate(), fp32, batched, left-padded
            (and how many bf16 tokens agree with them)
  train     30 LoRA steps (AdamW, dropout off, the same real batches) against PEFT, fp32: the loss
            of every step
  speed     benchmark.py for both frameworks, one process each: training tokens/s, generation
            answers/s, peak GPU memory and MFU, in bf16, tf32 and fp32 (the CPU: fp32, and bf16 training)
The checks run first, then the speed runs in order of importance while --budget-s lasts;
what did not fit is listed as skipped. The report is rewritten after every section, so a run
cut short still leaves what it measured.

The models are random-initialised (no pretrained weights offline), written by transformers and
PEFT: GPT-2 124M's shape (the CPU: 2 layers, 64 wide) with initializer_range 0.1, so that the
greedy tokens are decided by clear margins, and LoRA r=8 on c_attn, c_proj, c_fc with a random B.
"""
import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import benchmark
from backend.bench_metrics import cpu_model
from benchmark import LORA, LR, MODELS, WEIGHT_DECAY, default_data
from model_utils import EOS_ID

ROOT = Path(__file__).resolve().parent
STEPS = 30
# Passing bounds. CPU bf16 is not held to the autocast yardstick: Jittor's CPU loops for half
# matmuls accumulate in half and its CPU conversion to bfloat16 truncates, which CUDA does not.
LOGITS_FP32_REL = 1e-4    # max |ours - transformers| / max(1, max |transformers|)
BF16_VS_AUTOCAST = 2.0    # on CUDA: our bf16 error at most this times autocast's own
TRAIN_LOSS_REL = 1e-4     # per-step |loss - PEFT's| / PEFT's
SPEED_RUNS = {  # (task, precision, batch size), most important first; both frameworks each
    "cuda": [("train", "bf16", 16), ("generate", "bf16", 16), ("train", "tf32", 16), ("generate", "fp32", 16),
             ("train", "bf16", 4), ("train", "fp32", 16)],
    # every line, kept short for CI (fp32 training on the CPU: tests/test_benchmark.py runs it)
    "cpu": [("train", "bf16", 4), ("generate", "fp32", 4)],
}


# ----------------------------------------------------------------------------
# The models and data

def write_models(folder, model_name, seed=0):
    """folder/base (transformers GPT-2) and folder/adapter (PEFT LoRA with a random B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**MODELS[model_name], initializer_range=0.1))
    hf.save_pretrained(str(folder / "base"))
    peft = get_peft_model(hf, LoraConfig(fan_in_fan_out=True, task_type="CAUSAL_LM", **LORA))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    peft.save_pretrained(str(folder / "adapter"))
    return folder / "base", folder / "adapter"


def prompts_batch(args):
    """(ids, mask): the first questions of the held-out file as left-padded prompts."""
    b = benchmark.generation_batches(SimpleNamespace(data=args.heldout, questions=args.rows, batch_size=args.rows,
                                                     max_length=args.max_length, max_new_tokens=args.new_tokens))
    return b[0]


class Pair:
    """Our model in `precision` and (when first used) transformers + PEFT in fp32 on one device,
    from the same files; both with dropout off, so that they compute the same function."""

    def __init__(self, args, precision="fp32", trainable=False):
        import torch
        from backend import runtime
        from lora_models import LoRAGPT
        self.torch, self.args, self.trainable, self._ref = torch, args, trainable, None
        self.device = args.device
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # strict fp32 reference
        self.ours = runtime.prepare(LoRAGPT.from_pretrained(args.base, args.adapter, dropout=0.0), args.device, precision)
        self.ours.eval()

    @property
    def ref(self):
        if self._ref is None:
            from peft import PeftModel
            from transformers import GPT2LMHeadModel
            base = GPT2LMHeadModel.from_pretrained(str(self.args.base))
            self._ref = PeftModel.from_pretrained(base, str(self.args.adapter), is_trainable=self.trainable)
            self._ref.to(self.device).eval()
        return self._ref

    def tensor(self, a):
        return self.torch.tensor(np.asarray(a), dtype=self.torch.long).to(self.device)

    def ours_logits(self, ids, mask):
        from backend.jittor_env import jt
        return self.ours(jt.array(ids), attention_mask=jt.array(mask)).numpy()

    def ref_logits(self, ids, mask, autocast=None, model=None):
        torch = self.torch
        pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)  # positions count real tokens, as generation does
        with torch.no_grad(), torch.autocast(self.device, dtype=autocast, enabled=autocast is not None):
            out = (model or self.ref)(input_ids=self.tensor(ids), attention_mask=self.tensor(mask),
                                      position_ids=self.tensor(pos))
        logits = out.logits  # float32, bf16 under autocast (numpy has no bf16), or float64
        return (logits if logits.dtype == torch.float64 else logits.float()).cpu().numpy()

    def ref_logits_float64(self, ids, mask):
        """transformers' logits computed in float64 (a copy of the model): the yardstick that
        tells which of two float32 implementations a difference between them comes from."""
        import copy
        return self.ref_logits(ids, mask, model=copy.deepcopy(self.ref).double())


# ----------------------------------------------------------------------------
# The checks

def check_logits(args, ids, mask):
    real = mask.astype(bool)
    pair = Pair(args)
    ref, ours = pair.ref_logits(ids, mask), pair.ours_logits(ids, mask)
    ref64 = pair.ref_logits_float64(ids, mask)
    scale = float(np.abs(ref[real]).max())
    fp32 = float(np.abs(ours - ref)[real].max())
    ours64, ref_vs64 = (float(np.abs(x - ref64)[real].max()) for x in (ours, ref))
    bf16_pair = Pair(args, "bf16")
    ours16 = bf16_pair.ours_logits(ids, mask)
    autocast = pair.ref_logits(ids, mask, pair.torch.bfloat16)
    bf16, yardstick = float(np.abs(ours16 - ref)[real].max()), float(np.abs(autocast - ref)[real].max())
    agree = float((ours16.argmax(-1) == ref.argmax(-1))[real].mean())
    ok16 = bool(np.isfinite(ours16).all()) and (args.device == "cpu" or bf16 <= BF16_VS_AUTOCAST * yardstick)
    ok32 = fp32 <= LOGITS_FP32_REL * max(1.0, scale)
    return {"logit_scale": scale, "fp32_max_abs_diff": fp32, "fp32_pass": ok32,
            "fp32_vs_float64": ours64, "transformers_fp32_vs_float64": ref_vs64,
            "bf16_max_abs_diff": bf16, "autocast_bf16_max_abs_diff": yardstick, "bf16_argmax_agreement": agree,
            "bf16_pass": ok16, "pass": ok32 and ok16}


def check_nan(args, ids, mask):
    import GPT2_jittor
    from backend.jittor_env import jt
    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        logits = Pair(args, precision).ours_logits(ids, mask)
        out[f"{precision}_nonfinite"] = int((~np.isfinite(logits)).sum())
    row = np.full((2, 8), np.finfo(np.float32).min, np.float32)
    row[0, 0] = 1.0  # row 1 fully masked at transformers' fill
    out["softmax_of_fully_masked_row_at_old_fill"] = [float(v) for v in jt.nn.softmax(jt.array(row), dim=-1).numpy()[1, :3]]
    fill = GPT2_jittor.MASK_FILL
    GPT2_jittor.MASK_FILL = float(np.finfo(np.float32).min)
    try:
        logits = Pair(args).ours_logits(ids, mask)
    finally:
        GPT2_jittor.MASK_FILL = fill
    out["old_fill_nan_at_real_positions"] = int(np.isnan(logits[mask.astype(bool)]).sum())
    out["pass"] = all(out[f"{p}_nonfinite"] == 0 for p in ("fp32", "bf16", "fp16"))
    return out


def check_generate(args, ids, mask):
    pair = Pair(args)
    ours = pair.ours.generate(ids, args.new_tokens, eos_token_id=EOS_ID, attention_mask=mask)[:, ids.shape[1]:]
    with pair.torch.no_grad():
        gen = pair.ref.generate(input_ids=pair.tensor(ids), attention_mask=pair.tensor(mask),
                                max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=EOS_ID,
                                pad_token_id=EOS_ID, output_scores=True, return_dict_in_generate=True)
    ref = gen.sequences[:, ids.shape[1]:].cpu().numpy()
    scores = np.stack([s.float().cpu().numpy() for s in gen.scores], 1)  # (B, steps, V)
    rows, gaps = [], []
    for b in range(len(ids)):
        n = min(ours.shape[1], ref.shape[1])
        diff = np.flatnonzero(ours[b, :n] != ref[b, :n])
        rows.append(len(diff) == 0)
        if len(diff):  # how close transformers' own top two were where the tokens part
            top = np.sort(scores[b, diff[0]])[-2:]
            gaps.append(float(top[1] - top[0]))
    ours16 = Pair(args, "bf16").ours.generate(ids, args.new_tokens, eos_token_id=EOS_ID, attention_mask=mask)
    ours16 = ours16[:, ids.shape[1]:]
    n = min(ours16.shape[1], ref.shape[1])
    return {"rows": len(rows), "rows_equal": int(sum(rows)), "top2_gap_at_first_difference": gaps,
            "bf16_tokens_equal_fraction": float((ours16[:, :n] == ref[:, :n]).mean()), "pass": all(rows)}


def check_train(args, ids, mask):
    """(ids, mask unused: the training batches are real ones from --train.)"""
    from backend.jittor_env import jt
    batches = benchmark.train_batches(SimpleNamespace(data=args.train, max_length=args.max_length, batch_size=4,
                                                      seed=0), STEPS)
    pair = Pair(args, trainable=True)
    torch, ref = pair.torch, pair.ref
    opt = jt.optim.AdamW(pair.ours.trainable_parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    ours, theirs = [], []
    for b, _, _ in batches:  # (batch, real tokens, padded tokens)
        _, loss = pair.ours(jt.array(b["input_ids"]), jt.array(b["targets"]), attention_mask=jt.array(b["attention_mask"]))
        opt.step(loss)
        ours.append(loss.item())
        ids_, mask_, labels = benchmark.hf_batch(b)
        out = ref(input_ids=pair.tensor(ids_), attention_mask=pair.tensor(mask_), labels=pair.tensor(labels))
        out.loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        theirs.append(out.loss.item())
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    return {"steps": STEPS, "loss_first": ours[0], "loss_last": ours[-1], "peft_loss_first": theirs[0],
            "peft_loss_last": theirs[-1], "max_rel_loss_diff": max(rel), "pass": max(rel) <= TRAIN_LOSS_REL,
            "losses": ours, "peft_losses": theirs}


def speed_run(args, task, framework, precision, batch, timeout):
    """One benchmark.py process: its JSON line, reduced to what the report needs (not its peak
    RSS: Linux carries a parent's peak over fork and exec, so a child of this big process
    would report this process's)."""
    cmd = [sys.executable, str(ROOT / "benchmark.py"), task, "--framework", framework, "--device", args.device,
           "--precision", precision, "--batch-size", str(batch),
           "--data", str(args.train if task == "train" else args.heldout)]
    cmd += (["--tiny", "--steps", "1", "--warmup", "1", "--questions", str(2 * batch), "--max-new-tokens", "4"]
            if args.model == "tiny" else ["--steps", "10", "--warmup", "3", "--questions", str(4 * batch)])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or not lines:
        return {"error": (r.stderr or r.stdout)[-1500:]}
    res = json.loads(lines[0])
    keep = ("tokens_per_s", "answers_per_s", "device", "precision", "gpu", "gpu_allocator_mb", "gpu_allocated_mb",
            "gpu_memory_smi_mb", "mfu", "peak_bf16_tflops", "warmup_s", "generated_sha1",
            "attn_implementation")
    return {k: res[k] for k in keep if k in res}


CHECKS = {"logits": check_logits, "nan": check_nan, "generate": check_generate, "train": check_train}


# ----------------------------------------------------------------------------
# Report

def table(report):
    lines = [f"gpu_check on {report['device']} ({report['gpu'] or 'no GPU'}; CPU {report.get('cpu')}), "
             f"model {report['model']}, {report['elapsed_s']:.0f} s",
             "", "| check | result | pass |", "| --- | --- | --- |"]
    c = dict(report["checks"])
    for name, result in list(c.items()):
        if "error" in result:
            lines.append(f"| {name} | error: {result['error'].splitlines()[0][:200]} | False |")
            del c[name]
    if "logits" in c:
        l = c["logits"]
        lines.append(f"| logits fp32 vs transformers | max abs diff {l['fp32_max_abs_diff']:.2e} "
                     f"(logits up to {l['logit_scale']:.1f}); vs transformers in float64: ours "
                     f"{l['fp32_vs_float64']:.2e}, transformers fp32 {l['transformers_fp32_vs_float64']:.2e} "
                     f"| {l['fp32_pass']} |")
        lines.append(f"| logits bf16 vs transformers fp32 | {l['bf16_max_abs_diff']:.2e} (autocast bf16: "
                     f"{l['autocast_bf16_max_abs_diff']:.2e}); argmax agreement {l['bf16_argmax_agreement']:.3f} "
                     f"| {l['bf16_pass']} |")
    if "nan" in c:
        n = c["nan"]
        lines.append(f"| NaN/inf with left padding (fp32 / bf16 / fp16) | {n['fp32_nonfinite']} / "
                     f"{n['bf16_nonfinite']} / {n['fp16_nonfinite']} (old fill: {n['old_fill_nan_at_real_positions']} "
                     f"NaN at real positions) | {n['pass']} |")
    if "generate" in c:
        g = c["generate"]
        lines.append(f"| greedy generate vs transformers, fp32 | {g['rows_equal']}/{g['rows']} rows equal; "
                     f"bf16 tokens equal {g['bf16_tokens_equal_fraction']:.3f} | {g['pass']} |")
    if "train" in c:
        t = c["train"]
        lines.append(f"| {t['steps']} LoRA steps vs PEFT, fp32 | loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}, "
                     f"max relative diff {t['max_rel_loss_diff']:.1e} | {t['pass']} |")
    if report["speed"]:
        lines += ["", "| task | precision | batch | Jittor | transformers + PEFT | ratio | peak GPU MiB (Jittor / PEFT) "
                  "| MFU (Jittor / PEFT) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in report["speed"]:
            j, t = s["jittor"], s["torch"]
            if "error" in j or "error" in t:
                lines.append(f"| {s['task']} | {s['precision']} | {s['batch']} | error | error | | | |")
                continue
            key = "tokens_per_s" if s["task"] == "train" else "answers_per_s"
            mem = " / ".join(f"{x['gpu_allocator_mb']:.0f}" if x.get("gpu_allocator_mb") else "-" for x in (j, t))
            mfu = " / ".join(f"{100 * x['mfu']:.1f}%" if x.get("mfu") else "-" for x in (j, t))
            lines.append(f"| {s['task']} ({key.replace('_per_s', '/s')}) | {s['precision']} | {s['batch']} | "
                         f"{j[key]:.1f} | {t[key]:.1f} | {j[key] / t[key]:.2f} | {mem} | {mfu} |")
    if report["skipped"]:
        lines += ["", "skipped (time budget): " + ", ".join(report["skipped"])]
    lines += ["", f"all checks pass: {report['pass']}"]
    return "\n".join(lines)


def save(report, out):
    """pass: every check ran and passed, and every speed run that ran finished (speed runs the
    budget left out are listed as skipped but do not fail the check)."""
    checks = report["checks"]
    report["pass"] = (set(checks) == set(CHECKS) and all(c["pass"] for c in checks.values()) and
                      not any("error" in s[fw] for s in report["speed"] for fw in ("jittor", "torch")))
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(table(report) + "\n")


def release_memory():
    """Before the speed runs: give back what the checks cached (both frameworks keep freed memory
    for reuse), and restore the default SIGCHLD handling. Jittor installs a SIGCHLD handler
    that ends this process when a child dies of a signal (meant for its data-loader workers):
    a speed run killed for its timeout would take the whole check down with it."""
    import torch
    from backend.jittor_env import jt
    jt.sync_all(True)
    jt.gc()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@contextmanager
def section(report, name, deadline):
    """Run a section if time is left, recording its seconds; else list it as skipped."""
    if time.time() > deadline:
        report["skipped"].append(name)
        yield None
        return
    t = time.time()
    yield report
    report["seconds"][name] = round(time.time() - t, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where to check (cpu: a tiny model)")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report (the table: .md)")
    p.add_argument("--train", type=Path, default=None, help="SQuAD file for training batches (default as benchmark.py)")
    p.add_argument("--heldout", type=Path, default=None, help="SQuAD file for prompts (default as benchmark.py)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting sections after this many seconds "
                                                                "(default 480 on CUDA, unlimited on the CPU)")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + (args.budget_s if args.budget_s is not None else (480 if args.device == "cuda" else math.inf))
    args.model = "tiny" if args.device == "cpu" else "gpt2-124M"
    args.train, args.heldout = args.train or default_data("train"), args.heldout or default_data("generate")
    args.max_length, args.rows, args.new_tokens = (96, 3, 6) if args.model == "tiny" else (256, 8, 16)
    gpu = (benchmark.nvidia_smi("name") or [None])[0] if args.device == "cuda" else None
    report = {"device": args.device, "gpu": gpu, "cpu": cpu_model(), "model": args.model, "checks": {}, "speed": [],
              "skipped": [], "seconds": {}, "elapsed_s": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        args.base, args.adapter = write_models(Path(tmp), args.model)
        ids, mask = prompts_batch(args)
        for name in CHECKS:
            with section(report, name, deadline) as r:
                if r is not None:
                    try:
                        r["checks"][name] = CHECKS[name](args, ids, mask)
                    except Exception as e:  # a failing check must not hide the others (a first GPU run is a discovery)
                        r["checks"][name] = {"pass": False, "error": f"{type(e).__name__}: {e}"[-2000:]}
            report["elapsed_s"] = time.time() - start
            save(report, args.out)
    release_memory()
    for task, precision, batch in SPEED_RUNS[args.device]:
        name = f"speed {task} {precision} batch {batch}"
        with section(report, name, deadline - 20) as r:
            if r is not None:
                runs = {}
                for framework in ("jittor", "torch"):
                    left = max(30.0, deadline - time.time())
                    try:
                        runs[framework] = speed_run(args, task, framework, precision, batch,
                                                    timeout=None if math.isinf(left) else left)
                    except subprocess.TimeoutExpired:
                        runs[framework] = {"error": f"timed out after {left:.0f} s"}
                r["speed"].append({"task": task, "precision": precision, "batch": batch, **runs})
        report["elapsed_s"] = time.time() - start
        save(report, args.out)
    print(table(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["pass"] else 1)
