"""Patch an installed Jittor 1.3.11 so that it builds with the CUDA toolkit at hand (CUDA 13 and
newer GPUs); run it once before the first `import jittor` with CUDA:

    python tools/jittor_cuda_fix.py                  # the Jittor that `python` imports, nvcc from $nvcc_path / PATH
    python tools/jittor_cuda_fix.py --check          # say what would change, change nothing (exit 1 if anything would)
    python tools/jittor_cuda_fix.py --jittor DIR --cuda 13.0

Every patch is one exact text replacement in one file of Jittor's package (a table below, with
the CUDA version from which it is needed), so the tool is idempotent (a patched file carries the
marker `jittor_cuda_fix` and is left alone) and refuses a file whose text it does not recognise
rather than guessing. On a CUDA version that needs none of them (CUDA 11 and 12 before 12.8),
it changes nothing and says so. What each patch is for (measured with CUDA 13.0 from the
package index by `make gpu-rehearsal`; see docs/gpu.md):

- compiler.py: C++17 for every g++ and nvcc command. CUDA 13's cub/thrust (CCCL 3) require it,
  Jittor passes -std=c++14; and its nvcc flag conversion (nvcc >= 11.4) rewrites -std=c++17
  into "-std=c++14 -Xcompiler -std:c++14", which g++ rejects, so that line becomes a no-op.
  (A global sed c++14 -> c++17 over compiler.py breaks exactly that line.)
- extern/cuda/inc/helper_cuda.h: cudaDeviceProp::computeMode and ::clockRate are gone in CUDA 13;
  42 core files include the header. computeMode is read as "default" (no GPU is skipped as
  prohibited) and clockRate as 1 (it only ranks GPUs for cuda-samples' "fastest device").
- other/code_softmax.py (jt.nn.softmax on CUDA): cub::Max() is gone in CCCL 3 -> cuda::maximum<>.
- extern/cuda/cub/ops/cub_where_op.cc (jt.where(cond) on CUDA): cub::CountingInputIterator and
  cub::TransformInputIterator are gone -> thrust::counting_iterator / make_transform_iterator.
- depthwise_conv.py: cub::LaneId() is gone -> cuda::ptx::get_sreg_laneid() (the same %laneid).
- compiler.py, the architecture clamp (nvcc >= 12.8): Jittor clamps every GPU architecture above
  90 to 90 and emits only sm_ images, so a Blackwell card (sm_100, sm_120) gets no kernel it can
  run. Patched: the clamp follows what this nvcc can compile (up to 120 from 12.8) and the PTX of
  the virtual architecture is embedded too (-code=compute_XX), which the driver compiles for a
  card newer than any listed.
"""
import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

JITTOR_VERSION = "1.3.11.0"
MARK = "jittor_cuda_fix"


@dataclass(frozen=True)
class Patch:
    name: str
    file: str  # relative to the jittor package folder
    since: tuple  # the first CUDA (major, minor) that needs it
    old: str  # every occurrence is replaced
    new: str  # contains MARK
    count: int = 1  # occurrences of `old` in stock Jittor 1.3.11


PATCHES = (
    Patch("C++17 for g++ and nvcc (CCCL 3)", "compiler.py", (13, 0),
          'cc_flags += " -Wall -Wno-unknown-pragmas -std=c++14 -fPIC "',
          f'cc_flags += " -Wall -Wno-unknown-pragmas -std=c++17 -fPIC "  # {MARK}: CCCL 3 needs C++17'),
    Patch("nvcc keeps -std=c++17 (no -Xcompiler -std:c++14)", "compiler.py", (13, 0),
          'nvcc_flags = nvcc_flags.replace("-std=c++17", "-std=c++14 -Xcompiler -std:c++14")',
          f'nvcc_flags = nvcc_flags  # {MARK}: was .replace("-std=c++17", "-std=c++14 -Xcompiler -std:c++14")'),
    Patch("cudaDeviceProp::computeMode (removed in CUDA 13)", "extern/cuda/inc/helper_cuda.h", (13, 0),
          "deviceProp.computeMode", f"cudaComputeModeDefault /* {MARK} */", count=3),
    Patch("cudaDeviceProp::clockRate (removed in CUDA 13)", "extern/cuda/inc/helper_cuda.h", (13, 0),
          "deviceProp.clockRate", f"1 /* {MARK} */"),
    Patch("softmax: cub::Max() -> cuda::maximum<> (CCCL 3)", "other/code_softmax.py", (13, 0),
          "BlockReduce(temp_storage).Reduce(v1, cub::Max());",
          f"BlockReduce(temp_storage).Reduce(v1, ::cuda::maximum<>{{{{}}}}); // {MARK}"),
    Patch("softmax: #include <cuda/functional>", "other/code_softmax.py", (13, 0),
          "#include <type/fp16_compute.h>\n",
          f"#include <type/fp16_compute.h>\n#include <cuda/functional> // {MARK}\n", count=2),
    Patch("where: cub::CountingInputIterator -> thrust::counting_iterator (CCCL 3)",
          "extern/cuda/cub/ops/cub_where_op.cc", (13, 0),
          "cub::CountingInputIterator<To> counting_itr(0);",
          f"thrust::counting_iterator<To> counting_itr(0); // {MARK}"),
    Patch("where: cub::TransformInputIterator -> thrust::make_transform_iterator (CCCL 3)",
          "extern/cuda/cub/ops/cub_where_op.cc", (13, 0),
          "cub::TransformInputIterator<bool, NonZeroOp<Ti>, Ti*> itr(cond->ptr<Ti>(), NonZeroOp<Ti>());",
          f"auto itr = thrust::make_transform_iterator(cond->ptr<Ti>(), NonZeroOp<Ti>()); // {MARK}"),
    Patch("where: thrust iterator headers", "extern/cuda/cub/ops/cub_where_op.cc", (13, 0),
          "#include <thrust/transform.h>\n",
          f"#include <thrust/transform.h>\n#include <thrust/iterator/counting_iterator.h> // {MARK}\n"
          "#include <thrust/iterator/transform_iterator.h>\n"),
    Patch("depthwise conv: cub::LaneId() -> cuda::ptx::get_sreg_laneid() (CCCL 3)", "depthwise_conv.py", (13, 0),
          "if (cub::LaneId() == 0) ",
          f"if (::cuda::ptx::get_sreg_laneid() == 0) // {MARK}\n   "),
    Patch("depthwise conv: #include <cuda/ptx>", "depthwise_conv.py", (13, 0),
          'cuda_header = f"#include <{jt.compile_extern.cub_home}cub/cub.cuh>"+"""',
          f'cuda_header = f"#include <{{jt.compile_extern.cub_home}}cub/cub.cuh>\\n#include <cuda/ptx> // {MARK}"+"""'),
    Patch("architectures above 90 (Blackwell) compiled, not clamped", "compiler.py", (12, 8),
          "    max_arch = 90\n",
          f"    max_arch = 120 if nvcc_version >= [12,8] else 90  # {MARK}: sm_100 / sm_120 from nvcc 12.8\n"),
    Patch("PTX embedded for GPUs newer than any listed", "compiler.py", (12, 8),
          "nvcc_flags += ''.join(map(lambda x:f' -code=sm_{x} ', archs))",
          f"nvcc_flags += ''.join(map(lambda x:f' -code=sm_{{x}} ', archs)) + f' -code=compute_{{min(archs)}} '"
          f"  # {MARK}: PTX too".replace("{{x}}", "{x}").replace("{{min(archs)}}", "{min(archs)}")),
)


class FixError(Exception):
    pass


def jittor_dir():
    """The folder of the jittor package `python` would import, found without importing it (an
    import with CUDA would start compiling)."""
    spec = importlib.util.find_spec("jittor")
    if spec is None or not spec.submodule_search_locations:
        raise FixError("no jittor package found for this python (pip install jittor==1.3.11.0, or pass --jittor DIR)")
    return Path(list(spec.submodule_search_locations)[0])


def jittor_version(root):
    init = Path(root) / "__init__.py"
    if not init.is_file():
        raise FixError(f"{root}: not a jittor package folder (no __init__.py)")
    m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", init.read_text(encoding="utf-8"), re.M)
    if not m:
        raise FixError(f"{init}: no __version__ line")
    return m.group(1)


def nvcc_version(nvcc=None):
    """(major, minor) of the nvcc Jittor will use: $nvcc_path (what Jittor reads), else nvcc on PATH,
    else /usr/local/cuda/bin/nvcc; None where there is none (Jittor then builds for the CPU)."""
    nvcc = nvcc or os.environ.get("nvcc_path") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not nvcc or not Path(nvcc).is_file():
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise FixError(f"{nvcc} --version: no 'release X.Y' in its output: {out.strip()[-200:]!r}")
    return int(m.group(1)), int(m.group(2))


def parse_cuda(text):
    m = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)*", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a CUDA version such as 13.0 or 12.4")
    return int(m.group(1)), int(m.group(2))


def plan(root, cuda):
    """[(patch, state)] for every patch, state one of 'not needed', 'applied', 'pending'.
    Raises FixError naming the file where a needed patch finds neither the stock nor the patched text."""
    root = Path(root)
    texts, result = {}, []
    for p in PATCHES:
        path = root / p.file
        if p.file not in texts:
            if not path.is_file():
                raise FixError(f"{path}: missing (is {root} a jittor {JITTOR_VERSION} package?)")
            texts[p.file] = path.read_text(encoding="utf-8")
        text = texts[p.file]
        if cuda is None or cuda < p.since:
            result.append((p, "not needed"))
        elif text.count(p.new) == p.count:  # (some `new` texts contain their `old`)
            result.append((p, "applied"))
        elif text.count(p.old) == p.count:
            result.append((p, "pending"))
        else:
            raise FixError(f"{path}: expected {p.count} occurrence(s) of {p.old[:70]!r} (stock Jittor "
                           f"{JITTOR_VERSION}) or the patched text, found {text.count(p.old)}: not patching "
                           f"a file this tool does not recognise ({p.name})")
    return result


def apply(root, cuda):
    """Apply the pending patches; returns plan()'s list as it was before (files written atomically)."""
    root = Path(root)
    steps = plan(root, cuda)
    for file in sorted({p.file for p, state in steps if state == "pending"}):
        path = root / file
        text = path.read_text(encoding="utf-8")
        for p, state in steps:
            if p.file == file and state == "pending":
                text = text.replace(p.old, p.new)
        tmp = path.with_name(path.name + ".jittor_cuda_fix.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jittor", type=Path, help="the jittor package folder (default: the one `python` imports)")
    ap.add_argument("--cuda", type=parse_cuda, help="CUDA version X.Y (default: from `nvcc --version`, "
                    "nvcc from $nvcc_path, PATH or /usr/local/cuda)")
    ap.add_argument("--nvcc", help="the nvcc whose version decides (default: $nvcc_path, PATH, /usr/local/cuda)")
    ap.add_argument("--check", action="store_true", help="report only; exit 1 if a patch is pending")
    args = ap.parse_args(argv)
    try:
        root = args.jittor or jittor_dir()
        version = jittor_version(root)
        if version != JITTOR_VERSION:
            raise FixError(f"{root}: jittor {version}; these patches are for {JITTOR_VERSION} "
                           f"(pip install jittor=={JITTOR_VERSION})")
        cuda = args.cuda or nvcc_version(args.nvcc)
        steps = plan(root, cuda) if args.check else apply(root, cuda)
    except (FixError, OSError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = "no nvcc (CPU build)" if cuda is None else f"CUDA {cuda[0]}.{cuda[1]}"
    print(f"jittor {version} at {root}, {where}:")
    verb = "would patch" if args.check else "patched"
    for p, state in steps:
        shown = {"pending": verb, "applied": "already patched",
                 "not needed": f"not needed (from CUDA {p.since[0]}.{p.since[1]})"}[state]
        print(f"  {p.file}: {p.name}: {shown}")
    pending = sum(state == "pending" for _, state in steps)
    if not any(state != "not needed" for _, state in steps):
        print("  nothing to do: stock Jittor builds with this CUDA")
    return 1 if args.check and pending else 0


if __name__ == "__main__":
    sys.exit(main())
