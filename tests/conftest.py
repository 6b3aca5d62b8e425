"""Shared fixtures. Plain helpers (reference models, PEFT wrapping, padded batches) are in helpers.py."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before any tokenizer loads

import pytest  # noqa: E402

from helpers import make_hf_model, save_hf_model  # noqa: E402


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
