"""benchmark.py smoke test: both frameworks, both tasks, a tiny GPT-2, a few steps.

Checks that each run prints one valid JSON line with the fields the README quotes, that its
figures follow from the batches it was asked to time (tokens counted independently from
the same data, rates = tokens / measured time, as many steps as requested), and that greedy
generation gives the same tokens in Jittor and in transformers + PEFT.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_lora_dataset import batches, encode_dataset, read_squad
from model_utils import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "squad_sample.json"
COMMON = ["--tiny", "--steps", "2", "--warmup", "1", "--data", str(DATA)]
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


def timed_training_batches():
    """(real, padded) tokens of the 2 timed batches: the sample file at --tiny's max length 128,
    batches of 4 in the (seed 0, epoch 0) order, after the 1 warm-up batch."""
    examples, _ = read_squad(DATA)
    features, _ = encode_dataset(load_tokenizer(), examples, max_length=128)
    groups = batches(features, 4, seed=0, epoch=0, drop_last=True)[1:3]
    lengths = [[len(features[i].input_ids) for i in g] for g in groups]
    return [sum(n) for n in lengths], [len(n) * max(n) for n in lengths]


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("task", ["train", "generate"])
def test_both_frameworks_print_one_json_line(env, task):
    extra = ["--questions", "4", "--max-new-tokens", "4"] if task == "generate" else []
    results = {fw: run(env, task, "--framework", fw, *extra) for fw in ("jittor", "torch")}
    if task == "train":
        real, padded = timed_training_batches()
    for fw, res in results.items():
        assert res["task"] == task and res["framework"] == fw and res["config"]["model"] == "tiny"
        assert (TRAIN_FIELDS if task == "train" else GENERATE_FIELDS) <= set(res)
        assert res["peak_rss_mb"] > 0 and res["matmul_gflops"] > 0
        if task == "train":
            s = res["step"]
            # two timed steps (as asked): their median is their mean, their sum min + max
            d = {"median = (min + max) / 2": rel(s["median_s"], (s["min_s"] + s["max_s"]) / 2),
                 "tokens/s total = tokens / (min + max)": rel(res["tokens_per_s_total"],
                                                               sum(real) / (s["min_s"] + s["max_s"])),
                 # the median of 2 per-step rates, with the 2 step times in either order
                 "tokens/s = median of tokens / step time": min(
                     rel(res["tokens_per_s"], (real[0] / s["min_s"] + real[1] / s["max_s"]) / 2),
                     rel(res["tokens_per_s"], (real[0] / s["max_s"] + real[1] / s["min_s"]) / 2))}
            print(f"[{fw}] timed batches: real tokens {real}, padded {padded}; relative differences: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
            assert res["real_tokens_per_step"] == sum(real) / 2 and res["padded_tokens_per_step"] == sum(padded) / 2
            assert max(d.values()) < 1e-9
        else:
            b, t = res["batch"], res["total_s"]
            # 4 questions in one timed batch of 4 rows; no row of a random model says eos within 4 tokens
            d = {"one batch: median = min = max = total": max(rel(b["median_s"], t), rel(b["min_s"], t), rel(b["max_s"], t)),
                 "answers/s = 4 / total": rel(res["answers_per_s"], 4 / t),
                 "new tokens/s = new tokens / total": rel(res["new_tokens_per_s"], res["new_tokens"] / t)}
            print(f"[{fw}] new tokens {res['new_tokens']}, sha1 {res['generated_sha1'][:12]}; relative differences: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
            assert res["new_tokens"] == 4 * 4
            assert max(d.values()) < 1e-9
            assert res["generated_sha1"] != hashlib.sha1(b"").hexdigest()
    if task == "generate":  # same weights, same prompts, greedy: the same tokens
        assert results["jittor"]["generated_sha1"] == results["torch"]["generated_sha1"]
