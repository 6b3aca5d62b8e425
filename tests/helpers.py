"""Plain helpers shared by several test files (fixtures live in conftest.py).

The reference models are random-initialised GPT-2 checkpoints written by transformers
itself: no pretrained weights can be downloaded on these machines, so a transformers
GPT2LMHeadModel with random weights, saved with save_pretrained, is the real file format.
Biases and LayerNorm parameters are randomised too (transformers initialises them to
0 / 1), so a loading mistake in any tensor shows in the logits.
"""
import json
from pathlib import Path

import numpy as np

from model_utils import EOS_ID

# Figures a test wants at the end of the run's output, where CI's excerpt of it shows them
# (conftest.py prints them with the CPU they were measured on): add with measured(line).
MEASURED = []


def measured(line):
    MEASURED.append(line)


def norm_err(values, exact):
    """||values - exact|| / ||exact|| over every element (dicts of arrays: over all of them).
    The yardstick for comparing two float32 computations with a float64 one: a norm moves by
    rounding only as much as rounding moves the whole result, where one element can be moved
    ~100x by float32 rounding that a nearly cancelling sum amplifies (seen with AdamW, which
    divides each gradient by its own running size)."""
    if isinstance(exact, dict):
        pairs = [(np.asarray(values[k], np.float64), np.asarray(exact[k], np.float64)) for k in exact]
    else:
        pairs = [(np.asarray(values, np.float64), np.asarray(exact, np.float64))]
    diff = sum(float(((a - b) ** 2).sum()) for a, b in pairs)
    ref = sum(float((b ** 2).sum()) for _, b in pairs)
    return (diff / max(ref, 1e-300)) ** 0.5


# name -> transformers GPT2Config kwargs. "tiny" is deliberately not GPT-2's shape.
CONFIGS = {
    # initializer_range 0.2 (GPT-2 uses 0.02): a random model with small weights repeats
    # one token forever, which would make the generation tests trivially pass.
    "tiny": dict(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=50257, initializer_range=0.2),
    # the same with GPT-2's own initializer_range: logits of GPT-2-like size (|logit| ~ 1)
    "tiny-gpt2init": dict(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=50257),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
}


def make_hf_model(name="tiny", seed=0, **overrides):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(**{**CONFIGS[name], **overrides})
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias") or ".ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, path, safe=True):
    """safe=False writes the legacy pytorch_model.bin (transformers 5 only writes safetensors)."""
    import torch
    path = Path(path)
    model.save_pretrained(str(path))
    if not safe:
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def peft_wrap(hf, r, alpha, targets, dropout=0.0, init=True, rslora=False):
    """A transformers GPT-2 wrapped by PEFT with LoRA on `targets` (fan_in_fan_out: GPT-2's Conv1D)."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                     fan_in_fan_out=True, init_lora_weights=init, use_rslora=rslora, task_type="CAUSAL_LM")
    return get_peft_model(hf, cfg)


def batch_with_padding(rng, B, T, vocab, side):
    """Random token ids (B, T) and a mask with rows of different lengths, padded on `side`."""
    lengths = np.linspace(T, max(2, T // 3), B).astype(int)
    ids = rng.integers(0, vocab, size=(B, T)).astype(np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n:] = 1
    ids = np.where(mask > 0, ids, EOS_ID)
    return ids, mask


def write_sample_split(folder):
    """(train file, held-out file): the project's sample SQuAD file split by article (4 / the rest)."""
    folder = Path(folder)
    raw = json.loads((Path(__file__).resolve().parents[1] / "data" / "squad_sample.json").read_text())
    for name, articles in (("train", raw["data"][:4]), ("eval", raw["data"][4:])):
        (folder / f"{name}.json").write_text(json.dumps({"version": "1.1", "data": articles}))
    return folder / "train.json", folder / "eval.json"


# ----------------------------------------------------------------------------
# The token-keyed dropout masks written out in NumPy (token_dropout.py, csrc/common.h)

def hash32(s0, s1, i):
    """csrc/common.h's hash32 in NumPy (uint32 arithmetic wraps, as in C++)."""
    z = (np.asarray(i, np.uint32) * np.uint32(0x9E3779B9) + np.asarray(s0, np.uint32)) ^ np.asarray(s1, np.uint32)
    z ^= z >> np.uint32(16)
    z *= np.uint32(0x85EBCA6B)
    z ^= z >> np.uint32(13)
    z *= np.uint32(0xC2B2AE35)
    return z ^ (z >> np.uint32(16))


def keyed_attention_keep(seed, p, example_ids, B, H, T):
    """The keyed attention dropout's keep mask / (1 - p), (B, H, T, T), written out from its
    definition: query (b, h, i) hashes key position j under the seed mixed with the query
    token's key (example_ids[b] << 12) + i, then with h."""
    s0, s1 = np.uint32(seed[0]), np.uint32(int(seed[1]) * 0x01000193 & 0xFFFFFFFF)
    t = np.uint32(min(4294967295.0, p * 4294967296.0))
    token = (np.asarray(example_ids, np.uint32)[:, None] << np.uint32(12)) + np.arange(T, dtype=np.uint32)  # (B, T)
    per_query = hash32(hash32(s0, s1, token)[:, None, :], s1, np.arange(H, dtype=np.uint32)[None, :, None])
    kept = hash32(per_query[..., None], s1, np.arange(T, dtype=np.uint32)) >= t  # (B, H, T, T)
    return kept.astype(np.float32) / np.float32(1 - p)


# ----------------------------------------------------------------------------
# A Hugging Face hub cache written by hand, in huggingface_hub's own layout, so that its
# resolution (HF_HOME, HF_HUB_OFFLINE=1, refs, revisions) runs for real in the tests.

def write_hub_cache(hub_cache, repo_id, files, commit="0" * 40, ref="main"):
    """Put `files` ({name: source path}) into hub_cache as revision `commit` of model repo
    `repo_id`, `ref` pointing at it: models--<org>--<name>/{blobs/<sha256>, refs/<ref>,
    snapshots/<commit>/<name> -> ../../blobs/<sha256>}, as `hf download` leaves them."""
    import hashlib
    repo = Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    if ref is not None:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def hub_model_files(folder):
    """{name: path} of a GPT-2 folder written by save_pretrained, plus GPT-2's BPE files."""
    from model_utils import gpt2_bpe_files
    vocab, merges = gpt2_bpe_files()
    return {**{p.name: p for p in Path(folder).iterdir() if p.is_file()}, "vocab.json": vocab, "merges.txt": merges}


def tensorboard_scalars(folder):
    """{tag: [(step, value)]} as TensorBoard itself reads the event files (purges included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
