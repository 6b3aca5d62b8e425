"""What benchmark.py measures besides time: the matmul FLOPs of the work (for achieved
GFLOP/s and MFU), each framework's matmul rate on the model's shapes, peak host memory, and
the GPU as nvidia-smi reports it (name, dense bf16 peak, memory used), the same for both
frameworks, and the CPU the numbers came from. No Jittor and no PyTorch here.
"""
import os
import resource
import subprocess
import time
from pathlib import Path

import numpy as np

from model_utils import IGNORE_INDEX


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------
# FLOP accounting (matmul FLOPs; 2 per multiply-add)
#
# Training, per batch, counting the work the answer-only loss needs:
#   per real token and layer: 4 * 12 C^2      base projections (c_attn 3C^2, attn.c_proj C^2,
#                                             c_fc 4C^2, mlp.c_proj 4C^2): 2x forward and 2x for the
#                                             input gradient; frozen weights need no weight gradient
#                            + 6 * 16 r C     LoRA on the four projections, r (in + out) = 16 r C:
#                                             forward, input gradient, weight gradients
#   per sequence of n real tokens and layer: 6 n^2 C    attention: QK^T and PV, 4 n^2 C forward
#                                             and twice that backward, halved for causality
#   the last layer: c_attn (+ LoRA) on every real token (keys and values), attention and
#                   the rest only for the supervised positions
#   per supervised position: 4 V C            LM head (tied embedding, frozen): forward + input grad
# Generation: 2 (12 C^2 + 16 r C) per layer and real token (prompt or new), attention
# 4 Tk C per layer and query (half the square for the prompt), LM head 2 V C per row and
# step (last position only). The matmul limit is each framework's own rate on the model's
# weight shapes with 1024 rows; generation steps (4 rows) are bound by streaming weights
# from memory instead, so their fraction stays far below 1 on either side.

def train_flops(batch, cfg, r):
    C, L, V = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    lin, lora = 4 * 12 * C * C, 6 * 16 * r * C
    lin_attn, lora_attn = 4 * 3 * C * C, 6 * 4 * r * C  # c_attn only (last layer, every token)
    total = 0.0
    for mask, tgt in zip(batch["attention_mask"], batch["targets"]):
        n, s = int(mask.sum()), int(((tgt != IGNORE_INDEX) & (mask > 0)).sum())
        total += (L - 1) * (n * (lin + lora) + 6 * n * n * C)
        total += n * (lin_attn + lora_attn) + s * (lin - lin_attn + lora - lora_attn) + 12 * n * s * C
        total += s * 4 * V * C
    return total


def generate_flops(mask, n_steps, cfg, r):
    C, L, V = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    per_token = L * 2 * (12 * C * C + 16 * r * C)
    total = 0.0
    for row in mask:
        n = int(row.sum())
        total += n * per_token + L * 4 * n * n * C / 2 + 2 * V * C  # prompt (causal: half the square)
        for k in range(n_steps - 1):  # the first new token comes from the prompt pass
            total += per_token + L * 4 * (n + k + 1) * C + 2 * V * C
    return total


def matmul_rate(mm, make, sync, C, rows=1024, reps=5):
    """GFLOP/s of the model's 2-D fp32 matmul shapes (forward x W and backward dY W^T)."""
    shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]
    args = [(make(rows, i), make(i, o), make(rows, o)) for i, o in shapes]
    flops = sum(2 * 2 * rows * i * o for i, o in shapes)

    def run():
        for x, w, g in args:
            sync(mm(x, w, False))
            sync(mm(g, w, True))
    run()  # warm-up (Jittor compiles)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return flops / float(np.median(times)) / 1e9


# ----------------------------------------------------------------------------
# The GPU: name, dense bf16 peak (for MFU) and memory as nvidia-smi reports them (the same
# measurement for both frameworks)

# Dense bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets (which print the figure with
# 2:4 sparsity: halved here), by a part of the name nvidia-smi reports; the first match wins.
PEAK_BF16_TFLOPS = [("H200 NVL", 835.0), ("H200", 989.0),   # H200 datasheet: 1,671 / 1,979 with sparsity
                    ("H100 PCIe", 756.0), ("H100", 989.0),  # H100 datasheet: 1,513 (PCIe) / 1,979 (SXM)
                    ("A100", 312.0)]                        # A100 datasheet: 312 dense


def cpu_model():
    """'<model name>, <n> cores, AVX-512 yes|no' from /proc/cpuinfo: speeds and float32
    rounding (Jittor compiles for this CPU, -march=native) depend on it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"unknown CPU, {os.cpu_count()} cores"
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines if ":" in line)}
    avx512 = "yes" if "avx512f" in field.get("flags", "").split() else "no"
    return f"{field.get('model name', 'unknown CPU')}, {os.cpu_count()} cores, AVX-512 {avx512}"


def nvidia_smi(*query):
    """nvidia-smi's answer for the first GPU (a list of strings), or None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(query)}", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return [v.strip() for v in out.stdout.strip().split(",")] if out.returncode == 0 and out.stdout.strip() else None


def peak_bf16_tflops(gpu_name):
    """(TFLOP/s, source) of the dense bf16 peak of a GPU of this name, or (None, None)."""
    for part, tflops in PEAK_BF16_TFLOPS:
        if gpu_name and part in gpu_name:
            return tflops, f"NVIDIA datasheet, dense bf16 ({part})"
    return None, None


class GpuMemoryPeak:
    """Polls nvidia-smi's memory.used of the first GPU in a thread while the block runs: the
    peak above the value at the start, in MiB (framework-neutral: what the driver sees)."""

    def __init__(self, every_s=0.05):
        import threading
        self.every_s, self.peak_mb, self.stop = every_s, None, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def used(self):
        answer = nvidia_smi("memory.used")
        return float(answer[0]) if answer else None

    def poll(self):
        while not self.stop.is_set():
            used = self.used()
            if used is not None:
                self.peak_mb = max(self.peak_mb or 0.0, used - self.start)
            self.stop.wait(self.every_s)

    def __enter__(self):
        self.start = self.used() or 0.0
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
