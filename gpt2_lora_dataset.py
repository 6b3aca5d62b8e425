"""SQuAD v1.1 for a causal language model (GPT-2 + LoRA).

Reads and checks the official JSON, turns each question into
    "Context: {context}\\nQuestion: {question}\\nAnswer:" + " {answer}<|endoftext|>"
with the loss on the answer only, cuts long contexts around the answer, pads each batch
to its own longest example, and shuffles deterministically per (seed, epoch).

Unlike the old seed project: no padding to 1023 tokens, no loss on padding or on the
prompt, and train/validation are split by article so no paragraph is in both.

No Jittor here (numpy + the tokenizer only), so this module tests fast.
"""
import json
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_utils import EOS_ID, IGNORE_INDEX

SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"
# split -> (file name, number of questions in the official file, the script flag that takes it)
SQUAD_FILES = {
    "train": ("train-v1.1.json", 87_599, "--train-file"),
    "dev": ("dev-v1.1.json", 10_570, "--eval-file"),
}
# Where the project's machines keep SQuAD v1.1 and its article splits, next to the repository
# (read in place by the tests and benchmark.py, never copied into the repository).
SHARED_SQUAD = Path(__file__).resolve().parent.parent / "shared" / "data" / "squad"


class SquadFormatError(ValueError):
    """A SQuAD file that is not in the v1.1 layout; the message names the file and where."""


@dataclass
class SquadExample:
    id: str
    title: str
    context: str
    question: str
    answers: list        # all ground-truth texts; the first one is the training target
    answer_start: int    # character offset of answers[0] in context


@dataclass
class Feature:
    input_ids: list      # s[:-1] where s = prompt + answer + [eos]
    targets: list        # s[1:], IGNORE_INDEX where no loss is taken
    truncated: bool      # the context was cut to fit max_length
    id: str


# ----------------------------------------------------------------------------
# Reading and checking the JSON

def load_squad_json(path):
    """The raw `data` list of a SQuAD v1.1 file (articles), as the official metric wants it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SquadFormatError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise SquadFormatError(f"{path}: empty file, expected SQuAD v1.1 JSON")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SquadFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise SquadFormatError(f"{path}: JSON nested too deeply to be SQuAD") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise SquadFormatError(f"{path}: no top-level 'data' list; not a SQuAD v1.1 file")
    return obj["data"]


def _shown(value, n=80):
    """A file's value inside a one-line error message: short, with line breaks, control
    characters and lone surrogates escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode()
                   for c in str(value)[:n])


def _is_text(s):
    """A str the tokenizer can take: encodable as UTF-8 (JSON's \\ud800 escapes give lone surrogates)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_question(qa, context, seen_ids):
    """(id, question, answer texts, start of the first answer) of one question, or a message."""
    missing = [k for k in ("id", "question", "answers") if k not in qa]
    if missing:
        return "missing key(s) " + ", ".join(repr(k) for k in missing)
    if not _is_text(context):
        return "its context is not valid Unicode (a lone surrogate)"
    qid = qa["id"]
    if not ((isinstance(qid, str) and qid.strip() and _is_text(qid)) or type(qid) is int):
        return "the id is not a non-empty string"
    if not isinstance(qa["question"], str) or not qa["question"].strip():
        return "empty question"
    if not _is_text(qa["question"]):
        return "the question is not valid Unicode (a lone surrogate)"
    if str(qa["id"]) in seen_ids:  # the metric keys predictions by id, so ids must be unique
        return "duplicate question id"
    answers = qa["answers"]
    if not isinstance(answers, list) or not answers:
        return "no answers"
    texts = []
    for a in answers:
        if not isinstance(a, dict) or not isinstance(a.get("text"), str) or "answer_start" not in a:
            return "an answer lacks 'text' or 'answer_start'"
        if not a["text"].strip():
            return "empty answer text"
        if not _is_text(a["text"]):
            return "an answer is not valid Unicode (a lone surrogate)"
        if a["text"] not in context:
            return f"answer {_shown(repr(a['text']))} not found in its context"
        texts.append(a["text"])
    # Real SQuAD files have a few shifted answer_start values; the text is what counts, so
    # fall back to its first occurrence in the context.
    text, start = texts[0], answers[0]["answer_start"]
    if not (isinstance(start, int) and context[start:start + len(text)] == text):
        start = context.find(text)
    return str(qa["id"]), qa["question"], texts, start


def read_squad(path, skip_bad=False):
    """(examples, n_skipped) from a SQuAD v1.1 file.

    A broken file (not JSON, wrong layout, no questions) always raises SquadFormatError.
    A bad question raises too, unless skip_bad, which skips and counts it instead.
    """
    data = load_squad_json(path)
    examples, n_skipped, seen_ids = [], 0, set()
    for i, article in enumerate(data):
        if not isinstance(article, dict) or "title" not in article or not isinstance(article.get("paragraphs"), list):
            raise SquadFormatError(f"{path}: article {i} lacks 'title' or a 'paragraphs' list")
        title = str(article["title"])
        for j, para in enumerate(article["paragraphs"]):
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) \
                    or not isinstance(para.get("qas"), list):
                raise SquadFormatError(f"{path}: article '{_shown(title)}', paragraph {j} lacks 'context' or a 'qas' list")
            context = para["context"]
            for k, qa in enumerate(para["qas"]):
                checked = _check_question(qa, context, seen_ids) if isinstance(qa, dict) else "not an object"
                if isinstance(checked, str):
                    qid = qa.get("id", f"#{k} of paragraph {j}") if isinstance(qa, dict) else f"#{k} of paragraph {j}"
                    if not skip_bad:
                        raise SquadFormatError(f"{path}: article '{_shown(title)}', question {_shown(qid)}: {checked}")
                    n_skipped += 1
                    continue
                qid, question, texts, start = checked
                seen_ids.add(qid)
                examples.append(SquadExample(qid, title, context, question, texts, start))
    if not examples:
        raise SquadFormatError(f"{path}: no usable questions ({n_skipped} skipped)")
    return examples, n_skipped


def _count_questions(path):
    return sum(len(p["qas"]) for a in load_squad_json(path) for p in a["paragraphs"])


def ensure_squad(split, data_dir="data"):
    """Path of the official train-v1.1.json / dev-v1.1.json in data_dir, downloaded if missing.

    The download goes to a temporary file that is checked (valid JSON, the official number of
    questions) before it is renamed into place, so a cut connection never leaves a bad file.
    """
    if split not in SQUAD_FILES:
        raise ValueError(f"unknown SQuAD split {split!r}; expected one of {sorted(SQUAD_FILES)}")
    name, n_expected, flag = SQUAD_FILES[split]
    path = Path(data_dir) / name
    if path.is_file():
        return path
    url = SQUAD_URL + name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            _download(url, f, desc=name)
        n = _count_questions(tmp)
        if n != n_expected:
            raise SquadFormatError(f"downloaded file has {n} questions, expected {n_expected}")
        os.replace(tmp, path)
    except Exception as e:  # URLError, timeouts, HTTP errors, a truncated or wrong file
        raise RuntimeError(
            f"could not download SQuAD v1.1 {split} from {url} ({type(e).__name__}: {e}).\n"
            f"Without internet access here, download {name} elsewhere and put it at {path}, "
            f"or pass a SQuAD v1.1 file with {flag}.") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _download(url, f, desc):
    from tqdm import tqdm
    with urllib.request.urlopen(url, timeout=60) as r:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


# ----------------------------------------------------------------------------
# Encoding for a causal LM
#
# The prompt is tokenized in pieces, "Context:" | " {context}" | "\nQuestion: {q}\nAnswer:",
# and the target as " {answer}" + eos, so that the answer tokens are exactly
# tokenizer(" " + answer) and the context can be cut in token space.

PROMPT_HEAD = "Context:"


def _prompt_tail(question):
    return f"\nQuestion: {question}\nAnswer:"


@dataclass
class _Context:
    ids: list
    offsets: list        # character spans in " " + context
    word_start: list     # token i starts with a space, so a cut before it leaves whole words


def _encode_contexts(tokenizer, contexts):
    enc = tokenizer([" " + c for c in contexts], return_offsets_mapping=True)
    out = []
    for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
        # "Ġ" is how byte-level BPE writes a leading space.
        starts = [t.startswith("Ġ") for t in tokenizer.convert_ids_to_tokens(ids)]
        out.append(_Context(list(ids), [tuple(o) for o in offsets], starts))
    return out


def _ids(tokenizer, texts):
    return [list(ids) for ids in tokenizer(texts)["input_ids"]]


def _answer_tokens(ctx, char_start, char_end):
    """First and last context token overlapping the answer's characters [char_start, char_end)."""
    s, e = char_start + 1, char_end + 1  # +1: the context was tokenized with a leading space
    hits = [i for i, (a, b) in enumerate(ctx.offsets) if a < e and b > s]
    return hits[0], hits[-1]


def _window(ctx, budget, keep=None):
    """[lo, hi) of at most `budget` context tokens, cut at word starts where possible.

    keep=(a0, a1): the window holds tokens a0..a1 and is centred on them (training);
    keep=None: the window keeps the start of the context (inference).
    """
    n = len(ctx.ids)
    if n <= budget:
        return 0, n
    if keep is None:
        lo, a0, a1 = 0, 0, -1
    else:
        a0, a1 = keep
        assert a1 - a0 + 1 <= budget, "the answer tokens must fit in the window"
        lo = (a0 + a1) // 2 - budget // 2
        lo = min(max(lo, a1 - budget + 1), a0)  # contain the answer...
        lo = min(max(lo, 0), n - budget)        # ...and stay inside the context
    hi = lo + budget
    # Move the cuts inwards to word boundaries so the cut context is whole words and its
    # text (tokenizer.decode of the window) tokenizes back to the same ids.
    while lo < a0 and lo > 0 and not ctx.word_start[lo]:
        lo += 1
    while hi - 1 > max(a1, lo) and hi < n and not ctx.word_start[hi]:
        hi -= 1
    return lo, hi


def _feature(ex_id, head, ctx, tail, answer, max_length, loss_on, answer_span):
    """Build a Feature from already tokenized pieces (answer_span: answer chars in the context)."""
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on must be 'answer' or 'all', not {loss_on!r}")
    # len(input_ids) = len(s) - 1 <= max_length, so s may hold max_length + 1 tokens.
    budget = max_length + 1 - len(head) - len(tail) - len(answer) - 1
    a0, a1 = _answer_tokens(ctx, *answer_span)
    if a1 - a0 + 1 > budget:
        raise ValueError(f"question {ex_id}: question and answer leave no room in max_length={max_length} "
                         f"for the context around the answer")
    lo, hi = _window(ctx, budget, keep=(a0, a1))
    prompt = head + ctx.ids[lo:hi] + tail
    s = prompt + answer + [EOS_ID]
    targets = s[1:]
    if loss_on == "answer":
        # targets[t] is s[t+1]; keep it only where s[t+1] is an answer token or the eos.
        n_prompt = len(prompt)
        targets = [IGNORE_INDEX] * (n_prompt - 1) + targets[n_prompt - 1:]
    return Feature(input_ids=s[:-1], targets=targets, truncated=(hi - lo) < len(ctx.ids), id=ex_id)


def _span(ex):
    return ex.answer_start, ex.answer_start + len(ex.answers[0])


def encode_example(tokenizer, ex, max_length=512, loss_on="answer"):
    """One SquadExample as a training Feature; the context is cut around the answer if too long."""
    head, tail, answer = _ids(tokenizer, [PROMPT_HEAD, _prompt_tail(ex.question), " " + ex.answers[0]])
    ctx = _encode_contexts(tokenizer, [ex.context])[0]
    return _feature(ex.id, head, ctx, tail, answer, max_length, loss_on, _span(ex))


def encode_dataset(tokenizer, examples, max_length=512, loss_on="answer"):
    """(features, n_truncated). Tokenizes in batches and each paragraph once (SQuAD has ~5 questions each)."""
    if not examples:
        return [], 0  # the tokenizer fails on an empty batch
    contexts = list(dict.fromkeys(ex.context for ex in examples))
    encoded = dict(zip(contexts, _encode_contexts(tokenizer, contexts)))
    head = _ids(tokenizer, [PROMPT_HEAD])[0]
    tails = _ids(tokenizer, [_prompt_tail(ex.question) for ex in examples])
    answers = _ids(tokenizer, [" " + ex.answers[0] for ex in examples])
    features = [_feature(ex.id, head, encoded[ex.context], tail, answer, max_length, loss_on, _span(ex))
                for ex, tail, answer in zip(examples, tails, answers)]
    return features, sum(f.truncated for f in features)


def encode_prompt(tokenizer, context, question, max_length=512, max_new_tokens=32):
    """(prompt ids, truncated) for generation: len(ids) + max_new_tokens <= max_length.

    The answer is unknown here, so a long context keeps its start.
    """
    head, tail = _ids(tokenizer, [PROMPT_HEAD, _prompt_tail(question)])
    ctx = _encode_contexts(tokenizer, [context])[0]
    budget = max_length - max_new_tokens - len(head) - len(tail)
    if budget < 1:
        raise ValueError(f"the question alone needs more than max_length - max_new_tokens = "
                         f"{max_length - max_new_tokens} tokens")
    lo, hi = _window(ctx, budget)
    return head + ctx.ids[lo:hi] + tail, (hi - lo) < len(ctx.ids)


# ----------------------------------------------------------------------------
# Batching

def collate(features, pad_id=EOS_ID):
    """Pad on the right to the longest example of the batch.

    Pads get target IGNORE_INDEX and mask 0, so they never count in the loss; with causal
    attention and right padding, real tokens never attend to pads either.
    """
    T = max(len(f.input_ids) for f in features)
    B = len(features)
    input_ids = np.full((B, T), pad_id, dtype=np.int32)
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int32)
    mask = np.zeros((B, T), dtype=np.int32)
    for i, f in enumerate(features):
        n = len(f.input_ids)
        input_ids[i, :n] = f.input_ids
        targets[i, :n] = f.targets
        mask[i, :n] = 1
    return {"input_ids": input_ids, "targets": targets, "attention_mask": mask}


def batches(features, batch_size, seed, epoch, shuffle=True, bucket=False, drop_last=False):
    """Index lists, one per batch, fixed by (seed, epoch).

    Deterministic so that a resumed run can skip the first k batches of an epoch and see
    exactly the data it would have seen. bucket=True sorts by length inside chunks of
    64 * batch_size (then shuffles the batch order), so batches hold similar lengths and
    need less padding, while staying random across the epoch. Training calls it with the
    global batch (all micro-batches of all processes of one optimizer step) and cuts each
    batch with rank_share(), so the order never depends on how a step is split.
    """
    n = len(features)
    # epoch e draws from child stream e of the seed (NumPy's spawn_key): seed + epoch made
    # (seed 2, epoch 0) replay (seed 1, epoch 1)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,)))
    order = rng.permutation(n) if shuffle else np.arange(n)
    if bucket:
        lengths = np.array([len(f.input_ids) for f in features])
        chunk = 64 * batch_size
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                for c in (order[i:i + chunk] for i in range(0, n, chunk))])
    groups = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    if drop_last and groups and len(groups[-1]) < batch_size:
        groups.pop()
    if bucket and shuffle:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return groups


def rank_share(batch, world_size, rank, grad_accum):
    """The micro-batches (grad_accum index lists) that process `rank` of `world_size` trains
    on in one optimizer step whose global batch is `batch`.

    The global batch is cut into world_size * grad_accum near-equal contiguous pieces (a
    bucketed batch stays sorted by length inside each); rank r takes pieces r * grad_accum
    to (r + 1) * grad_accum - 1. The shares are disjoint and cover the batch. A short last
    batch can leave a piece, or a rank's whole share, empty.
    """
    pieces = np.array_split(np.asarray(batch, dtype=np.int64), world_size * grad_accum)
    return [p.tolist() for p in pieces[rank * grad_accum:(rank + 1) * grad_accum]]


def count_tokens(batch):
    """Number of real (non-padding) tokens in a collated batch."""
    return int(batch["attention_mask"].sum())


def count_supervised(features):
    """Number of supervised targets (not IGNORE_INDEX) in a list of features: the tokens the
    loss averages over."""
    return sum(len(f.targets) - f.targets.count(IGNORE_INDEX) for f in features)


# ----------------------------------------------------------------------------
# Train/validation split

def split_by_article(examples, val_fraction=0.1, seed=0):
    """(train, val) with whole articles on each side, so no paragraph is in both.

    A paragraph is grouped with the first article it appears in, so even a paragraph
    repeated under two titles cannot leak across the split.
    """
    group_of = {}
    for ex in examples:
        group_of.setdefault(ex.context, ex.title)
    groups = list(dict.fromkeys(group_of[ex.context] for ex in examples))
    if len(groups) < 2:
        raise ValueError("split_by_article needs at least 2 articles")
    n_val = min(max(1, round(val_fraction * len(groups))), len(groups) - 1)
    rng = np.random.default_rng(seed)
    val_groups = {groups[i] for i in rng.permutation(len(groups))[:n_val]}
    train = [ex for ex in examples if group_of[ex.context] not in val_groups]
    val = [ex for ex in examples if group_of[ex.context] in val_groups]
    assert not {ex.context for ex in train} & {ex.context for ex in val}
    return train, val


# ----------------------------------------------------------------------------
# The data of a training run (train_default_lora.py and train_pytorch_lora.py read it alike)

@dataclass
class Data:
    train_examples: list      # SquadExample, for EM/F1 on training questions
    train_path: Path
    train_features: list      # encoded, what the loop trains on
    eval_examples: list
    eval_path: Path
    eval_batches: list        # collated held-out batches for the validation loss


def log(msg):
    print(msg, file=sys.stderr)


def load_data(cfg, tokenizer):
    """The training and held-out questions of a run (a train_config.TrainConfig), read, checked
    and encoded (held-out ones collated for the loss)."""
    train_path = Path(cfg.train_file) if cfg.train_file else ensure_squad("train")
    train_ex, bad = read_squad(train_path, skip_bad=cfg.skip_bad)
    if cfg.eval_file:
        eval_path = Path(cfg.eval_file)
        eval_ex, bad_eval = read_squad(eval_path, skip_bad=cfg.skip_bad)
        bad += bad_eval
    elif cfg.demo:  # the sample file is split by article: no paragraph on both sides
        eval_path = train_path
        train_ex, eval_ex = split_by_article(train_ex, val_fraction=0.2, seed=cfg.seed)
    else:
        eval_path = ensure_squad("dev")
        eval_ex, bad_eval = read_squad(eval_path, skip_bad=cfg.skip_bad)
        bad += bad_eval
    if bad:
        log(f"skipped {bad} malformed questions (--skip-bad)")
    leaked = {e.context for e in train_ex} & {e.context for e in eval_ex}
    if leaked:
        log(f"warning: {len(leaked)} paragraphs are in both the training and the evaluation file")
    if cfg.max_train_examples:
        train_ex = train_ex[:cfg.max_train_examples]
    train_f, cut = encode_dataset(tokenizer, train_ex, cfg.max_length, cfg.loss_on)
    eval_f, cut_eval = encode_dataset(tokenizer, eval_ex[:cfg.eval_examples], cfg.max_length, cfg.loss_on)
    log(f"train: {len(train_f)} questions from {train_path} ({cut} contexts cut to {cfg.max_length} tokens); "
        f"held-out: {len(eval_ex)} questions from {eval_path}, {len(eval_f)} used for the loss ({cut_eval} cut)")
    eval_batches = [collate([eval_f[i] for i in b]) for b in batches(eval_f, cfg.batch_size, 0, 0, shuffle=False)]
    return Data(train_ex, train_path, train_f, eval_ex, eval_path, eval_batches)
