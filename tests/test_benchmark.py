"""benchmark.py smoke test: both frameworks, both tasks, a tiny GPT-2, a few steps.

Checks that each run prints one valid JSON line with the fields the README quotes, and
that greedy generation gives the same tokens in Jittor and in transformers + PEFT.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--tiny", "--steps", "2", "--warmup", "1", "--data", str(ROOT / "data" / "squad_sample.json")]
TRAIN_FIELDS = {"tokens_per_s", "tokens_per_s_total", "step", "peak_rss_mb", "warmup_s", "first_step_s",
                "real_tokens_per_step", "flops_per_step_G", "achieved_gflops", "matmul_gflops",
                "fraction_of_matmul_limit", "loss_first", "loss_last"}
GENERATE_FIELDS = {"answers_per_s", "new_tokens_per_s", "batch", "peak_rss_mb", "warmup_s", "new_tokens",
                   "generated_sha1", "achieved_gflops", "matmul_gflops", "fraction_of_matmul_limit"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # a private cache: the shared checkpoint is written once for this module, by transformers
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")), "TOKENIZERS_PARALLELISM": "false"}


def run(env, *args):
    r = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *args, *COMMON], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, r.stdout
    print("\n" + r.stderr.strip().split("\n\n")[-1][-600:])  # the human table
    return json.loads(lines[0])


@pytest.mark.parametrize("task", ["train", "generate"])
def test_both_frameworks_print_one_json_line(env, task):
    extra = ["--questions", "4", "--max-new-tokens", "4"] if task == "generate" else []
    results = {fw: run(env, task, "--framework", fw, *extra) for fw in ("jittor", "torch")}
    for fw, res in results.items():
        assert res["task"] == task and res["framework"] == fw and res["config"]["model"] == "tiny"
        assert (TRAIN_FIELDS if task == "train" else GENERATE_FIELDS) <= set(res)
        assert res["peak_rss_mb"] > 0 and res["matmul_gflops"] > 0
        if task == "train":
            assert res["config"]["steps"] == 2 and res["tokens_per_s"] > 0
            assert res["step"]["min_s"] <= res["step"]["median_s"] <= res["step"]["max_s"]
        else:
            assert res["answers_per_s"] > 0 and res["new_tokens"] > 0
    if task == "generate":  # same weights, same prompts, greedy: the same tokens
        assert results["jittor"]["generated_sha1"] == results["torch"]["generated_sha1"]
