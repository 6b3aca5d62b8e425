"""Shared fixtures. Plain helpers (reference models, PEFT wrapping, padded batches) are in helpers.py."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before any tokenizer loads

import pytest  # noqa: E402

from helpers import make_hf_model, save_hf_model  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    """The CPU the suite ran on and the figures tests recorded with helpers.measured()."""
    from backend.bench_metrics import cpu_model
    from helpers import MEASURED
    terminalreporter.section("measured")
    for line in [f"CPU: {cpu_model()}"] + MEASURED:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Lazily built {(config name, "safetensors"|"bin"): folder} of HF-written checkpoints."""
    cache = {}

    def get(name="tiny", fmt="safetensors"):
        key = (name, fmt)
        if key not in cache:
            model = make_hf_model(name)
            cache[key] = save_hf_model(model, tmp_path_factory.mktemp(f"{name}_{fmt}"), safe=fmt == "safetensors")
        return cache[key]
    return get


@pytest.fixture(params=["plain", "fused"])
def impl(request):
    """Runs a test on each implementation: the plain Jittor formulas of the model files and
    the fused CPU kernels (runtime.prepare). Returns a function that switches a model to it."""
    from backend import runtime
    fused = request.param == "fused"
    if fused and not runtime.fused_kernels_available():
        pytest.skip("the fused kernels need Jittor on the CPU with oneDNN")
    return lambda model: runtime.prepare(model, fused=fused)


@pytest.fixture(autouse=True)
def jittor_precision_flags_reset():
    """runtime.prepare sets process-wide Jittor flags for half precision; a model another test
    builds without prepare() must not inherit them."""
    yield
    import sys
    if "jittor_env" in sys.modules:
        jt = sys.modules["jittor_env"].jt
        jt.flags.auto_mixed_precision_level = 0
