"""`make gpu-rehearsal`: build Jittor 1.3.11 for CUDA on a machine without a GPU, as far as that goes.

    python tools/gpu_rehearsal.py                  # CUDA 13.0 (the project's GPU machine)
    python tools/gpu_rehearsal.py --cuda 12        # CUDA 12.9 from the package index (the nvidia-*-cu12 wheels)
    python tools/gpu_rehearsal.py --no-fix         # stock Jittor (what a user gets without tools/jittor_cuda_fix.py)

Steps, each reported as "compiled" / "ok" or with the compiler's first error:
1. fetch: the CUDA toolkit's wheels (`pip download --no-deps`, about 525 MB for 13.0), cached in
   .gpu-rehearsal/ (ignored by git; a second run downloads nothing);
2. layout: a CUDA home from them, the way Jittor expects one (bin, nvvm, include with CCCL's
   cub/thrust/cuda, lib64 with unversioned libcudart/libcublas/libcublasLt/libcurand links);
3. jittor: Jittor's source package installed into a folder of its own, and tools/jittor_cuda_fix.py;
4. core: `import jittor` with nvcc_path set, in a JITTOR_HOME of its own (the CPU cache in
   ~/.cache/jittor is not touched): Jittor compiles its core (about 150 files) with nvcc. Without
   a driver, loading it must then stop at cudaErrorInsufficientDriver; that is the expected end.
   nvcc_path is a wrapper that logs every command, so the core's exact nvcc flags are known;
5. extern: Jittor's CUDA extern operators (cuBLAS, cuRAND, cub: extern/cuda/*/ops), their
   operator part and their JIT part (the CUDA code Jittor compiles when the operator first
   runs), rendered by Jittor's own preprocessor (jt.core.op_compiler.precompile, from the
   project's CPU Jittor) with the keys the operator's jit_prepare() writes, compiled with the
   core's nvcc flags for sm_90;
6. kernels: the jt.code kernels of Jittor's CUDA softmax (forward and backward, the shapes of
   GPT-2's attention) rendered the same way, and the CUDA 13 API replacements the fix uses.

What cannot be compiled without a device: the element-wise / reduce / broadcast kernels Jittor
fuses and generates from the graph at run time (its core's passes run only when an operator
executes on a GPU); docs/gpu.md says so.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".gpu-rehearsal"
SDIST = Path(os.environ.get("JITTOR_SDIST", ROOT.parent / "shared/gpu/wheels/jittor-1.3.11.0.tar.gz"))
sys.path.insert(0, str(ROOT / "tools"))
import jittor_cuda_fix  # noqa: E402

# The toolkit wheels: CUDA 13.0 as the project's GPU machine has it (../shared/gpu/README.md), and
# CUDA 12.9, the newest 12.x, which most users run.
TOOLKITS = {
    "13": {"version": (13, 0), "tree": "nvidia/cu13", "wheels": [
        "nvidia-cuda-nvcc==13.0.88", "nvidia-cuda-runtime==13.0.96", "nvidia-cuda-cccl==13.0.85",
        "nvidia-cuda-crt==13.0.88", "nvidia-nvvm==13.0.88", "nvidia-cublas==13.0.2.14", "nvidia-curand==10.4.0.35"]},
    "12": {"version": (12, 9), "tree": "nvidia", "wheels": [
        "nvidia-cuda-nvcc-cu12==12.9.86", "nvidia-cuda-runtime-cu12==12.9.79", "nvidia-cuda-cccl-cu12==12.9.27",
        "nvidia-cublas-cu12==12.9.3.13", "nvidia-curand-cu12==10.3.10.19"]},
}
ARCH_FLAGS = "-arch=compute_90 -code=sm_90 -code=compute_90"  # what the fixed compiler.py passes for an H100


def say(*a):
    print(*a, flush=True)


def first_error(text, n=3):
    """The compiler's first error lines (nvcc / g++ / Python), else the last lines."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.search(r"\berror\b|fatal|Error:|undefined reference", line) and "-Werror" not in line:
            return " | ".join(l.strip() for l in lines[i:i + n])[:600]
    return " | ".join(l.strip() for l in lines[-n:])[:600]


# ----------------------------------------------------------------------------
# 1-3: toolkit, CUDA home, Jittor

def fetch(kit, cache):
    cache.mkdir(parents=True, exist_ok=True)
    want = [w for w in kit["wheels"] if not list(cache.glob(w.split("==")[0].replace("-", "_") + "-" + w.split("==")[1] + "-*.whl"))]
    if want:
        say(f"fetch: pip download {len(want)} wheels into {cache} ...")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                            "-d", str(cache), *want], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"fetch: pip download failed: {first_error(r.stderr + r.stdout)}")
    return sorted(cache.glob("*.whl"))


def layout(kit, wheels, base):
    """Unzip the wheels into one tree and lay out a CUDA home over it; returns the home."""
    tree, home = base / "tree", base / "home"
    stamp = base / "layout.json"
    names = [w.name for w in wheels]
    if not (stamp.is_file() and json.loads(stamp.read_text()) == names):
        shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                for info in z.infolist():
                    if info.filename.startswith("nvidia/"):
                        out = z.extract(info, tree)
                        if (info.external_attr >> 16) & 0o111:
                            os.chmod(out, 0o755)
        src = tree / kit["tree"]
        if kit["tree"] == "nvidia":  # the cu12 wheels: one folder per library (nvidia/cuda_nvcc/bin, ...)
            merged = tree / "cu12"
            for lib in sorted(src.iterdir()):
                if lib.is_dir():
                    for part in lib.iterdir():
                        if part.is_dir():
                            shutil.copytree(part, merged / part.name, dirs_exist_ok=True, symlinks=True)
            src = merged
        if not (src / "lib64").exists():
            (src / "lib64").symlink_to("lib")  # nvcc's own nvcc.profile looks for $(TOP)/lib64
        home.mkdir(parents=True)
        for d in ("bin", "nvvm"):
            (home / d).symlink_to(src / d)
        inc = home / "include"
        shutil.copytree(src / "include", inc, symlinks=True)
        if (inc / "cccl").is_dir():  # CUDA 13 keeps cub/thrust/cuda under include/cccl
            shutil.copytree(inc / "cccl", inc, dirs_exist_ok=True, symlinks=True)
        lib64 = home / "lib64"
        lib64.mkdir()
        for f in sorted((src / "lib").iterdir()):
            (lib64 / f.name).symlink_to(f)
        for name in ("cudart", "cublas", "cublasLt", "curand"):
            versioned = sorted(lib64.glob(f"lib{name}.so.*"), key=lambda p: len(p.name))
            if versioned and not (lib64 / f"lib{name}.so").exists():
                (lib64 / f"lib{name}.so").symlink_to(versioned[0].name)
        stamp.write_text(json.dumps(names))
    nvcc = home / "bin" / "nvcc"
    if not nvcc.exists():
        say(f"layout: {home} (no nvcc in these wheels)")
        return home
    r = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"layout: {nvcc} --version failed: {first_error(r.stderr + r.stdout)}")
    say(f"layout: {home} ({r.stdout.strip().splitlines()[-1]})")
    return home


def install_jittor(base):
    target = base / "jittor-site"
    if not (target / "jittor" / "__init__.py").is_file():
        src = str(SDIST) if SDIST.is_file() else "jittor==1.3.11.0"
        say(f"jittor: pip install --target {target} {src} ...")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "--target", str(target), src], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"jittor: pip install failed: {first_error(r.stderr + r.stdout)}")
    return target / "jittor"


def nvcc_wrapper(home):
    """home/bin/nvcc becomes a wrapper that appends each command to $NVCC_LOG, then runs nvcc (Jittor
    finds the CUDA home from nvcc_path's folder, so the wrapper sits where nvcc sits)."""
    bin_dir = home / "bin"
    if bin_dir.is_symlink():
        real = bin_dir.resolve()
        bin_dir.unlink()
        bin_dir.mkdir()
        for f in real.iterdir():
            (bin_dir / f.name).symlink_to(f)
        (bin_dir / "nvcc").unlink()
        (bin_dir / "nvcc").write_text(f'#!/bin/sh\n[ -n "$NVCC_LOG" ] && printf "%s\\n" "$*" >> "$NVCC_LOG"\n'
                                      f'exec "{real / "nvcc"}" "$@"\n')
        (bin_dir / "nvcc").chmod(0o755)
    return bin_dir / "nvcc"


def jittor_env(home, site, jthome, nvcc_log):
    """The environment of the rehearsal's Jittor. HOME too: Jittor 1.3.11 writes a JITTOR_HOME it is
    given into ~/.cache/jittor/config.json, and every later Jittor process of the user that sets
    none (the project's CPU runs and tests) would then use the rehearsal's cache."""
    env = dict(os.environ, PYTHONPATH=str(site), nvcc_path=str(home / "bin" / "nvcc"), JITTOR_HOME=str(jthome),
               HOME=str(jthome),
               NVCC_LOG=str(nvcc_log), use_cutt="0", use_cutlass="0", use_nccl="0", use_mpi="0", use_mkl="0",
               conv_opt="1", PYTHONUNBUFFERED="1")
    env.pop("LD_LIBRARY_PATH", None)
    return env


def build_core(home, site, base):
    """`import jittor` with CUDA: compiles the core with nvcc. Returns (result line, core nvcc commands)."""
    jthome, log = base / "jthome", base / "core_nvcc.log"
    jthome.mkdir(exist_ok=True)  # (the log is kept: a core cached by an earlier run logs no command now)
    t = time.time()
    r = subprocess.run([sys.executable, "-c", "import jittor"], env=jittor_env(home, site, jthome, log),
                       capture_output=True, text=True, timeout=3600, cwd=base)
    out = r.stdout + r.stderr
    (base / "core_import.log").write_text(out)
    cores = list(jthome.rglob("jittor_core*.so"))
    cmds = log.read_text().splitlines() if log.is_file() else []
    done = re.findall(r"^Compiling jittor_core\((\d+)/\1\)", out, re.M)  # Jittor's progress lines
    dt = time.time() - t
    what = f"{done[-1]} files" if done else "cached by an earlier run"
    if r.returncode == 0:
        return f"compiled and loaded ({what}, {dt:.0f} s)", cmds
    if cores and re.search(r"cudaErrorInsufficientDriver|insufficient for CUDA runtime|no CUDA-capable device", out):
        return (f"compiled ({what}, {dt:.0f} s); loading it stops at "
                f"{'cudaErrorInsufficientDriver' if 'InsufficientDriver' in out else 'no device'}, as it must without a GPU"), cmds
    return f"FAILED after {dt:.0f} s: {first_error(out)}", cmds


# ----------------------------------------------------------------------------
# 5-6: Jittor's CUDA JIT sources, rendered the way its op compiler renders them

# extern/cuda/<lib>/ops/<op>.cc -> the jit keys its jit_prepare() writes (one line per dtype case
# the model reaches: fp32, and bf16 for the matmuls)
EXTERN_OPS = {
    "cublas/ops/cublas_matmul_op.cc": [dict(T="float32", Trans_a="N", Trans_b="T", op="S"),
                                       dict(T="bfloat16", Trans_a="N", Trans_b="N", op="H")],
    "cublas/ops/cublas_batched_matmul_op.cc": [dict(T="float32", Trans_a="N", Trans_b="T", op="S"),
                                               dict(T="bfloat16", Trans_a="N", Trans_b="N", op="H")],
    "curand/ops/curand_random_op.cc": [dict(T="float32", R="uniform")],
    "cub/ops/cub_where_op.cc": [dict(Ti="bool", To="int32", NDIM="1")],
    "cub/ops/cub_arg_reduce_op.cc": [dict(Tx="float32", Toffsets="int32", FUNC="ArgMax")],
    "cub/ops/cub_argsort_op.cc": [dict(Tx="float32", Tindexes="int32", Toffsets="int32", Ty="int32",
                                       FUNC="SortPairsDescending")],
    "cub/ops/cub_cumsum_op.cc": [dict(Tx="float32", Ty="int32", reverse="0")],
}
# (B * heads * T, T) attention rows of GPT-2 at T = 384, batch 4: Jittor's CUDA softmax kernel
SOFTMAX_SHAPE = (4 * 12 * 384, 384)

RENDER = r'''
# Runs in the project's CPU Jittor: its C++ preprocessor renders the (patched) sources of the
# rehearsal's Jittor exactly as its op compiler does (OpCompiler::get_jit_src).
import json, sys, types
import numpy as np
from backend.jittor_env import jt
jroot, specs = sys.argv[1], json.loads(sys.argv[2])
out = {}

def jit_src(src, keys):
    defs = dict(keys, JIT="1", JIT_cuda="1", index_t="int32")
    body = jt.core.op_compiler.precompile(defs, src)
    begin = "".join(f"#define {k} {v}\n" for k, v in defs.items() if k.startswith("JIT"))
    after = "".join(f"#define {k} {v}\n".replace("\n", "\\\n")[:-2] + "\n" for k, v in defs.items()
                    if not k.startswith("JIT") and k not in ("CODE", "HEADER"))
    pos = body.rfind("#include")
    pos = 0 if pos < 0 else body.find("\n", pos) + 1
    src = begin + body[:pos] + after + body[pos:] + "\n"
    if "float16" in src:  # FP16OpType::post_pass (src/type/fp16_op_type.cc): the half types' header
        pos = src.rfind("#include")
        pos = 0 if pos < 0 else src.find("\n", pos) + 1
        src = src[:pos] + '#include "type/fp16_compute.h"\n' + src[pos:]
    return src

for name, keys in specs["extern"]:
    out[name] = jit_src(open(f"{jroot}/extern/cuda/{name.split('|')[0]}").read(), keys)

# jt.code kernels: Jittor's CUDA softmax, forward and backward, captured from the patched file
calls = []
def fake_code(shape, dtype, inputs, cuda_header="", cuda_src="", **kw):
    calls.append((shape, dtype, [tuple(i.shape) for i in inputs], [str(i.dtype) for i in inputs], cuda_header, cuda_src))
    return inputs[-1] if len(inputs) > 1 else inputs[0] * 1
real_code, jt.code = jt.code, fake_code
if not hasattr(jt.compile_extern, "cub_home"):
    jt.compile_extern.cub_home = ""
mod = types.ModuleType("code_softmax_patched")
exec(compile(open(f"{jroot}/other/code_softmax.py").read(), "code_softmax.py", "exec"), mod.__dict__)
mod.can_softmax_v1 = lambda a, dim: True
x = jt.array(np.zeros(specs["softmax_shape"], np.float32))
y = mod.softmax_v1(x)
jt.grad(y.sum(), x)
jt.code = real_code
code_op = open(f"{jroot}/src/ops/code_op.cc").read()
for i, (shape, dtype, in_shapes, in_types, header, src) in enumerate(calls):
    # CodeOp::jit_prepare: leading __global__ functions move into HEADER, the rest is CODE
    j, depth = 0, 0
    while j < len(src) and src[j] in " \t\n":
        j += 1
    start = j
    while j < len(src) and src[j] == "_":
        while j < len(src):
            depth += src[j] == "{"
            depth -= src[j] == "}"
            j += 1
            if src[j - 1] == "}" and depth == 0:
                break
        while j < len(src) and src[j] in " \t\n":
            j += 1
    keys = {"IN_SIZE": str(len(in_shapes)), "OUT_SIZE": "1", "out0_dim": str(len(shape)), "out0_type": str(dtype),
            "HEADER": header + "\nnamespace jittor {\n" + src[start:j] + "}", "CODE": src[j:]}
    for k, (s, t) in enumerate(zip(in_shapes, in_types)):
        keys[f"in{k}_dim"], keys[f"in{k}_type"] = str(len(s)), t
    out[f"softmax {'forward' if i == 0 else 'backward'} (jittor/other/code_softmax.py)"] = jit_src(code_op, keys)
print(json.dumps(out))
'''


def render_sources(jroot):
    specs = {"extern": [(f"{op}|{'_'.join(k.values())}", k) for op, ks in EXTERN_OPS.items() for k in ks],
             "softmax_shape": list(SOFTMAX_SHAPE)}
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the project's CPU Jittor, its own cache
    r = subprocess.run([sys.executable, "-c", RENDER, str(jroot), json.dumps(specs)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=1800)
    if r.returncode:
        raise SystemExit(f"render: {first_error(r.stderr + r.stdout, 8)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def jit_flags(core_cmds, jroot):
    """The core's nvcc flags (the logged nan_checker.cu command less its source and output), plus
    what Jittor adds for a JIT kernel: --use_fast_math (convert_nvcc_flags), the architecture."""
    cmd = next((c for c in core_cmds if " -c " in f" {c} " and ".cu" in c), None)
    if cmd is None:
        raise SystemExit("extern: no nvcc command of the core was logged (was the core compiled in this run?)")
    args = shlex.split(cmd)
    keep, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "-o":
            skip = True
        elif not a.endswith(".cu"):
            keep.append(a)
    inc = [f"-I{jroot}/extern/cuda/{lib}/inc" for lib in ("cublas", "curand", "cub")]
    inc += [f"-I{jroot}/extern/cuda/{lib}/ops" for lib in ("cublas", "curand", "cub")]
    return keep + ["--use_fast_math", *shlex.split(ARCH_FLAGS), *inc]


def compile_sources(home, sources, flags, out_dir, jobs=3):
    from concurrent.futures import ThreadPoolExecutor
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(item):
        i, (name, src) = item
        path = out_dir / f"jit{i}.cu"
        path.write_text(src)
        t = time.time()
        r = subprocess.run([str(home / "bin" / "nvcc"), str(path), *flags, "-o", str(path.with_suffix(".o"))],
                           capture_output=True, text=True, timeout=1800)
        dt = time.time() - t
        return name, (f"compiled ({dt:.0f} s)" if r.returncode == 0 else f"FAILED: {first_error(r.stdout + r.stderr)}")
    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, enumerate(sorted(sources.items()))))


# CUDA APIs Jittor 1.3.11 uses that CUDA 13 removed (what tools/jittor_cuda_fix.py replaces), and
# where each one is declared in a toolkit that has it
REMOVED_APIS = (
    ("cudaDeviceProp::computeMode", "driver_types.h", r"\bint\s+computeMode;"),
    ("cudaDeviceProp::clockRate", "driver_types.h", r"\bint\s+clockRate;"),
    ("cub::Max", "cub/thread/thread_operators.cuh", r"\bMax\b"),
    ("cub::CountingInputIterator", "cub/iterator/counting_input_iterator.cuh", r"CountingInputIterator"),
    ("cub::TransformInputIterator", "cub/iterator/transform_input_iterator.cuh", r"TransformInputIterator"),
    ("cub::LaneId", "cub/util_ptx.cuh", r"\bLaneId\s*\("),
)


def api_check(home):
    """{API: 'present' / 'gone'} read from the toolkit's headers."""
    out = {}
    for name, header, pattern in REMOVED_APIS:
        path = home / "include" / header
        text = path.read_text(errors="replace") if path.is_file() else ""
        out[name] = "present" if re.search(pattern, text) else "gone"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cuda", choices=sorted(TOOLKITS), default="13", help="toolkit major version (default 13)")
    ap.add_argument("--no-fix", action="store_true", help="stock Jittor, without tools/jittor_cuda_fix.py")
    ap.add_argument("--jobs", type=int, default=3, help="nvcc processes for the JIT sources")
    args = ap.parse_args(argv)
    kit = TOOLKITS[args.cuda]
    base = WORK / f"cu{args.cuda}{'-stock' if args.no_fix else ''}"
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = {"cuda": ".".join(map(str, kit["version"])), "fix": not args.no_fix, "parts": {}}
    parts = report["parts"]
    home = layout(kit, fetch(kit, WORK / f"wheels-cu{args.cuda}"), base)
    parts["CUDA APIs Jittor uses that CUDA 13 removed (headers)"] = api_check(home)
    nvcc = home / "bin" / "nvcc"
    if not nvcc.exists():
        parts["nvcc"] = (f"not in the package index's wheels for CUDA {report['cuda']} "
                         f"({', '.join(w for w in kit['wheels'] if 'nvcc' in w)} holds only ptxas): nothing compiled")
        return finish(report, base, t0)
    nvcc_wrapper(home)
    jroot = install_jittor(base)
    if not args.no_fix:
        r = subprocess.run([sys.executable, str(ROOT / "tools/jittor_cuda_fix.py"), "--jittor", str(jroot),
                            "--nvcc", str(nvcc)], capture_output=True, text=True)
        say(r.stdout.strip())
        if r.returncode:
            raise SystemExit(f"fix: {r.stderr.strip()}")
    core, cmds = build_core(home, jroot.parent, base)
    parts["core (import jittor)"] = core
    say(f"core: {core}")
    if core.startswith("FAILED"):
        return finish(report, base, t0)
    sources = render_sources(jroot)
    results = compile_sources(home, sources, jit_flags(cmds, jroot), base / "jit", args.jobs)
    parts["extern operators and kernels (JIT sources, nvcc for sm_90)"] = results
    return finish(report, base, t0)


def finish(report, base, t0):
    report["seconds"] = round(time.time() - t0)
    (base / "report.json").write_text(json.dumps(report, indent=1))
    say(f"\nCUDA {report['cuda']}, Jittor 1.3.11{' + tools/jittor_cuda_fix.py' if report['fix'] else ' (stock)'}:")
    failed = False
    for part, result in report["parts"].items():
        if isinstance(result, dict):
            say(f"  {part}:")
            for k, v in result.items():
                say(f"    {k}: {v}")
                failed |= v.startswith("FAILED")
        else:
            say(f"  {part}: {result}")
            failed |= result.startswith("FAILED")
    say(f"({report['seconds']} s; {base / 'report.json'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
