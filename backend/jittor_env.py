"""Import Jittor the way these scripts need it: `from backend.jittor_env import jt`.

Every script imports Jittor through this file, because two things must happen
*before* `import jittor`:

1. CUDA probing. Jittor looks for `nvcc`; on a machine with an nvcc but no GPU
   driver, `import jittor` dies on a missing libcudart.so. With no GPU visible
   we set `nvcc_path=""` so Jittor builds for CPU only. With a GPU visible we
   let Jittor find CUDA (its first CUDA import compiles for minutes); whether a
   run then uses the GPU is runtime.py's choice (--device), not this file's.
   `nvcc_path= python ...` keeps Jittor on the CPU even with a GPU.
2. oneDNN. At first import Jittor downloads its oneDNN build
   (dnnl_lnx_2.2.0_cpu_gomp) from its own server; offline that fails. Debian's
   oneDNN 2.x (`apt-get install libdnnl-dev`, done by `make setup`) works in
   its place, so we link it where Jittor looks for the download. Without it
   (no apt, not root) we fall back to Jittor's own matmul loops (about 5x
   slower on CPU) and say so once.
"""
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

# Where Debian's libdnnl-dev puts oneDNN.
SYSTEM_DNNL_LIB = Path("/usr/lib") / f"{platform.machine()}-linux-gnu" / "libdnnl.so"
SYSTEM_DNNL_INCLUDE = Path("/usr/include")
# The folder name Jittor 1.3.x unpacks its oneDNN download into (compile_extern.install_mkl).
JITTOR_DNNL_DIR = "dnnl_lnx_2.2.0_cpu_gomp"


def gpu_visible():
    """True when an NVIDIA driver answers (nvidia-smi lists a GPU)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def jittor_home():
    """Jittor's home folder, resolved as jittor_utils.home() does."""
    if os.environ.get("JITTOR_HOME"):
        return Path(os.environ["JITTOR_HOME"])
    config = Path.home() / ".cache" / "jittor" / "config.json"
    if config.is_file():
        import json
        try:
            return Path(json.loads(config.read_text()).get("JITTOR_HOME", Path.home()))
        except ValueError:
            pass
    return Path.home()


def link_system_onednn(home):
    """Make Debian's oneDNN look like Jittor's download. Returns True when in place."""
    target = home / ".cache" / "jittor" / "mkl" / JITTOR_DNNL_DIR
    lib = target / "lib" / "libmkldnn.so"
    if lib.exists():
        return True
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False  # Jittor's folder name differs elsewhere; let Jittor try its own download.
    headers = sorted(SYSTEM_DNNL_INCLUDE.glob("dnnl*.h*"))
    if not SYSTEM_DNNL_LIB.exists() or not headers:
        return False
    try:
        (target / "lib").mkdir(parents=True, exist_ok=True)
        (target / "include").mkdir(parents=True, exist_ok=True)
        for header in headers + [SYSTEM_DNNL_INCLUDE / "oneapi"]:
            link = target / "include" / header.name
            if header.exists() and not link.exists():
                link.symlink_to(header)
        tmp = lib.with_name(f".libmkldnn.so.{os.getpid()}")
        tmp.symlink_to(SYSTEM_DNNL_LIB)
        os.replace(tmp, lib)  # atomic: a parallel import never sees half a link
    except OSError as e:
        warnings.warn(f"could not link system oneDNN into {target}: {e}")
        return False
    return True


def prepare():
    """Set the environment Jittor reads at import. Safe to call twice."""
    use_gpu = gpu_visible()
    if not use_gpu:
        os.environ.setdefault("nvcc_path", "")
        # At import Jittor imports PyTorch (compile_extern.py, FIX_TORCH_ERROR: a guard against
        # their MKL builds clashing should the program import PyTorch later): measured here 1.8 s
        # and 190 MB in every process, for scripts that never touch PyTorch. On the CPU build with
        # Debian's oneDNN, PyTorch imported after Jittor works (tests/test_runtime.py); on a GPU
        # Jittor keeps its own default, as there it is untested. FIX_TORCH_ERROR=1 restores it.
        os.environ.setdefault("FIX_TORCH_ERROR", "0")
    if os.environ.get("use_mkl", "1") == "1" and not link_system_onednn(jittor_home()):
        os.environ["use_mkl"] = "0"
        print("warning: oneDNN not found (install Debian's libdnnl-dev: `make setup` does it); "
              "Jittor runs its own, slower matmul kernels", file=sys.stderr)
    os.environ.setdefault("log_silent", "1")  # Jittor's [i ...] banner on every import
    if core_not_compiled(jittor_home()):
        print(f"Jittor compiles its core for this machine{' and CUDA' if use_gpu else ''} before the first run: "
              f"a few minutes, once (cached in {jittor_home() / '.cache' / 'jittor'})", file=sys.stderr, flush=True)
    check_mpi()
    return use_gpu


def core_not_compiled(home):
    """True when Jittor has not compiled its core for this installation yet (its first import
    then compiles for minutes, silently under log_silent). Jittor keeps the core in
    $JITTOR_HOME/.cache/jittor/jt<major.minor.patch>/<compiler>/<python>/<os>/<cpu>/<key>*/.../
    jittor_core*.so, where <key> is the first 4 hex digits of the md5 of jittor_utils/__init__.py's
    path (jittor_utils.find_cache_path): one folder per installation."""
    import hashlib
    from importlib import metadata, util
    try:
        spec = util.find_spec("jittor_utils")
        version = metadata.version("jittor").rsplit(".", 1)[0]
    except (ImportError, ValueError, metadata.PackageNotFoundError):
        return False  # not installed: the import fails with its own message
    key = hashlib.md5(spec.origin.encode()).hexdigest()[:4]
    cache = home / ".cache" / "jittor" / f"jt{version}"
    return not any(cache.glob(f"*/*/*/*/{key}*/**/jittor_core*.so"))


def check_mpi():
    """Under mpirun, Jittor needs OpenMPI's compiler wrapper to build its MPI operators;
    without it `import jittor` dies on an AttributeError. Say what to install instead."""
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        return
    if os.environ.get("use_mpi", "1") != "1" or not (os.environ.get("mpicc_path") or shutil.which("mpicc")):
        sys.exit("error: started by mpirun, but Jittor cannot use MPI here: it compiles its MPI operators with "
                 "OpenMPI's mpicc (Debian: apt-get install openmpi-bin libopenmpi-dev; `make setup` does it as "
                 "root), and use_mpi must not be 0. Without mpirun everything runs in one process.")


# oneDNN switches the CPU to flush-denormals-to-zero; numpy's finfo then warns that "the
# smallest subnormal is zero" the first time it is asked. Harmless for float32 training.
warnings.filterwarnings("ignore", message="The value of the smallest subnormal")

GPU_VISIBLE = prepare()
import jittor as jt  # noqa: E402  (must follow prepare())
