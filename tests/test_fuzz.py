"""Readers that no input can crash, fuzzed with hypothesis (derandomized: the same cases on
every run, for CI).

Every generated file either loads, is skipped and counted (SQuAD with skip_bad), or raises
the reader's one error type with a message that names the file:
    SQuAD JSON             gpt2_lora_dataset.read_squad       SquadFormatError
    GPT-2 config.json      GPT2_jittor.GPT.from_pretrained    ValueError
    adapter_config.json    lora_models.LoRAGPT.from_pretrained ValueError
    safetensors            model_utils.load_safetensors       ValueError
(a missing file is FileNotFoundError, not fuzzed here). Any other exception, a hang (the
deadline) or a crash of the process fails the test. No subnormal floats are generated:
Jittor's import turns on flush-to-zero in this process, and hypothesis then refuses them. A SQuAD file that loads is also encoded
for training (encode_dataset), which may only refuse a question with ValueError.
"""
import json
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.jittor_env import jt
from gpt2_lora_dataset import SquadFormatError, encode_dataset, read_squad
from GPT2_jittor import GPT, GPTConfig
from LoRA import LoRAConfig
from lora_models import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAGPT
from model_utils import atomic_save_safetensors, load_safetensors, load_tokenizer

CASES = 2500  # per reader


def fuzz_settings(n=CASES):
    return settings(max_examples=n, deadline=10_000, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def clean(error, *files):
    """The one clean error: names the file first, printable (no lone surrogates), one short line."""
    message = str(error)
    assert message.startswith(tuple(f"{f}: " for f in files)), message
    message.encode("utf-8")
    assert len(message) < 1000 and "\n" not in message, message


def run_cases(name, test, n=CASES):
    """Run the @given `test` and print how its cases ended."""
    outcomes = Counter()
    t0 = time.time()
    fuzz_settings(n)(test(outcomes))()
    total = sum(outcomes.values())
    print(f"\n{name}: {total} cases in {time.time() - t0:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    assert total >= n, outcomes
    return outcomes


# ----------------------------------------------------------------------------
# Values: JSON of every kind, strings that bite

HUGE = "a" * 100_000
TRICKY = ["", " ", "\x00", "\x1f", "\ud800", "a\udfffb", "\u200b", "\n\n", "é", "🙂", "river", "The river",
          "the Velka River", "Orn", "\\", '"', "<|endoftext|>", "\u202e", "a" * 3000]
text = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12))
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2 ** 70, 2 ** 70),
                   st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), text)
junk = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                    max_leaves=6)


def chance(p):
    """True with probability about p (hypothesis leans towards the ends of a range, so a plain
    integers(0, 99) < 100 p would come out True far more often)."""
    n = round(1 / p)
    return st.sampled_from([False] * (n - 1) + [True])


def mostly(usual, other, p_other=0.3):
    """`usual`, or with probability about p_other `other` (one_of cannot be weighted)."""
    return chance(p_other).flatmap(lambda odd: other if odd else usual)


def maybe(strategy, p_junk=0.15):
    """`strategy`, or with probability about p_junk any JSON value at all."""
    return mostly(strategy, junk, p_junk)


def sometimes_without(dicts, p_drop=0.04):
    """A dict, or with probability about p_drop the same without one of its keys."""
    return st.tuples(dicts, chance(p_drop), st.integers(0, 10)).map(
        lambda a: a[0] if not a[1] or not a[0] else
        {k: v for i, (k, v) in enumerate(a[0].items()) if i != a[2] % len(a[0])})


def raw_file(document):
    """The bytes of a JSON document, sometimes damaged: cut short, a byte changed, non-UTF-8,
    or nested far too deep."""
    def damage(args):
        doc, how, where, byte = args
        data = json.dumps(doc).encode()
        at = int(where * len(data))
        return {"as is": data, "cut": data[:at], "byte": data[:at] + bytes([byte]) + data[at + 1:],
                "latin-1": data + b"\xff\xfe", "deep": b"[" * 100_000 + b"]" * 100_000,
                "deep object": b'{"data": ' + b"[" * 50_000}[how]
    hows = mostly(st.just("as is"), st.sampled_from(["cut", "byte", "latin-1", "deep", "deep object"]), 0.2)
    return st.tuples(document, hows, st.floats(0, 1, allow_subnormal=False), st.integers(0, 255)).map(damage)


# ----------------------------------------------------------------------------
# SQuAD JSON: documents are built by a Random that hypothesis seeds (st.randoms), far
# faster to draw for these deep nested documents than composed strategies, and as
# reproducible (derandomize). use_true_random: hypothesis' own Random leans towards 0.0,
# which would make every "small probability" below come true.

CHARS = list("ab ri.?") + ["\n", "\x00", "\x1f", "é", "中", "🙂", "\ud800", "\udfff", "\u200b", "\u202e", '"', "\\"]
CONTEXTS = ["The Velka River rises in the Orn hills.", "", "river river river", "é🙂\u200b river", HUGE + " river",
            "a\udfffb river", "\x00 river \x1f", "中文 river"]
ANSWERS = ["Velka River", "Orn", "x", "", " ", "é🙂", "a\udfffb", "river ", "中文", HUGE]


def random_text(rnd):
    return rnd.choice(TRICKY) if rnd.random() < 0.3 else "".join(rnd.choice(CHARS) for _ in range(rnd.randrange(9)))


def random_json(rnd, depth=0):
    """Any JSON value: scalars of every kind, lists and objects nested a few levels."""
    kind = rnd.randrange(8 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.random() < 0.5
    if kind == 2:
        return rnd.choice([0, -1, 1, 2 ** 31, -(2 ** 63), 2 ** 70, rnd.randint(-1000, 1000)])
    if kind == 3:
        return rnd.choice([float("nan"), float("inf"), float("-inf"), -0.0, 1e308, 0.5])
    if kind in (4, 5):
        return random_text(rnd)
    if kind == 6:
        return [random_json(rnd, depth + 1) for _ in range(rnd.randrange(3))]
    return {random_text(rnd): random_json(rnd, depth + 1) for _ in range(rnd.randrange(3))}


def squad_document(rnd):
    """A SQuAD v1.1 document where anything may go wrong: at each level, with a small
    probability, a value is replaced by any JSON or a key is dropped (rarely at the top,
    so that half the documents keep their structure and fuzz only the questions)."""
    rough = rnd.random() < 0.5

    def odd(p):
        return rnd.random() < p

    def value(usual, p_junk):
        return random_json(rnd) if odd(p_junk) else usual()

    def obj(fields, p_drop):
        d = {k: make() for k, make in fields.items()}
        if d and odd(p_drop):
            d.pop(rnd.choice(list(d)))
        return d

    p = 0.05 if rough else 0.0
    answer = lambda: obj({
        "text": lambda: value(lambda: "river" if odd(0.6) else rnd.choice(ANSWERS + [random_text(rnd)]), 0.1),
        "answer_start": lambda: value(lambda: rnd.choice([0, 4, 10, 17, -1, 2 ** 80, rnd.randint(-5, 60)]), 0.1),
    }, 0.05)
    qa = lambda: obj({
        "id": lambda: value(lambda: rnd.choice(["q1", "q2", "q3", "q4"]) if odd(0.7) else
                            rnd.choice(["q1 ", "", " ", "\ud800", 3, -1, 0]), 0.1),
        "question": lambda: value(lambda: "Where?" if odd(0.7) else
                                  rnd.choice(["", "  ", "What " * 2000, "\ud800?", random_text(rnd)]), 0.1),
        "answers": lambda: value(lambda: [value(answer, 0.05) for _ in range(rnd.randrange(4) or 1)], 0.1),
    }, 0.05)
    paragraph = lambda: obj({
        "context": lambda: value(lambda: rnd.choice(CONTEXTS) if odd(0.7) else random_text(rnd), p),
        "qas": lambda: value(lambda: [value(qa, 0.05) for _ in range(1 + rnd.randrange(4))], p),
    }, p)
    article = lambda: obj({
        "title": lambda: value(lambda: "Velka" if odd(0.7) else random_text(rnd), p),
        "paragraphs": lambda: value(lambda: [value(paragraph, p) for _ in range(1 + rnd.randrange(3))], p),
    }, p)
    return value(lambda: obj({"version": lambda: value(lambda: "1.1", 0.1),
                              "data": lambda: value(lambda: [value(article, p) for _ in range(1 + rnd.randrange(3))],
                                                    p)}, p), p)


squad = st.randoms(use_true_random=True).map(squad_document)


def test_squad_reader(tmp_path):
    path = tmp_path / "squad.json"
    tokenizer = load_tokenizer()

    def test(outcomes):
        @given(raw_file(squad), st.booleans())
        def case(data, skip_bad):
            path.write_bytes(data)
            try:
                examples, skipped = read_squad(path, skip_bad=skip_bad)
            except SquadFormatError as e:
                clean(e, path)
                outcomes["error"] += 1
                return
            assert examples and (skip_bad or not skipped)
            outcomes["loaded, some skipped" if skipped else "loaded"] += 1
            try:  # what training does next
                encode_dataset(tokenizer, [ex for ex in examples if len(ex.context) < 5000][:3], max_length=64)
            except ValueError as e:
                assert "leave no room in max_length" in str(e), e
        return case
    outcomes = run_cases("read_squad (SquadFormatError)", test)
    assert outcomes["error"] and outcomes["loaded"] and outcomes["loaded, some skipped"]


# ----------------------------------------------------------------------------
# GPT-2 config.json

SMALL = dict(n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=64)
CONFIG_VALUES = st.one_of(st.integers(-3, 3), st.sampled_from([8, 16, 64, 10 ** 9, 2 ** 63, -(2 ** 63), 2 ** 200]),
                          st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.booleans(), st.none(), text,
                          st.sampled_from(["gpt2", "gelu", "gelu_new", "relu", "tanh", [], {}]), junk)


def mutated(valid, keys):
    """`valid` with a few of its keys (or new ones) given any value, some removed."""
    return st.tuples(st.dictionaries(st.sampled_from(keys), CONFIG_VALUES, max_size=3),
                     st.sets(st.sampled_from(keys), max_size=2)).map(
        lambda a: {**{k: v for k, v in valid.items() if k not in a[1]}, **a[0]})


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A tiny GPT-2 folder and a LoRA adapter for it (r=2 on c_attn and c_fc)."""
    d = tmp_path_factory.mktemp("small")
    GPT(GPTConfig(**SMALL)).save_pretrained(d / "base")
    LoRAGPT(GPT.from_pretrained(d / "base"), LoRAConfig(r=2, target_modules=("c_attn", "c_fc"))).save_lora_weights(
        d / "adapter")
    jt.sync_all(True)  # no random init left pending to run inside a later test's training (it draws at run time)
    return d / "base", d / "adapter"


def test_gpt2_config_reader(small_base, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((small_base[0] / "model.safetensors").read_bytes())
    valid = json.loads((small_base[0] / "config.json").read_text())
    keys = sorted(valid) + ["n_inner", "model_type", "unknown"]

    def test(outcomes):
        @given(raw_file(st.one_of(mutated(valid, keys), junk)))
        def case(data):
            (folder / "config.json").write_bytes(data)
            try:
                model = GPT.from_pretrained(folder)
            except ValueError as e:
                clean(e, folder / "config.json", folder / "model.safetensors")
                outcomes["error"] += 1
                return
            assert model.config.n_embd == SMALL["n_embd"]  # only a config that fits the weights builds
            outcomes["loaded"] += 1
        return case
    outcomes = run_cases("GPT.from_pretrained on generated config.json (ValueError)", test)
    jt.sync_all(True)
    assert outcomes["error"] and outcomes["loaded"]


def test_gpt2_config_values_never_build_an_absurd_model():
    """The bounds themselves, without a weight file: from_hf_config refuses them by name."""
    for key, value in (("n_embd", 10 ** 9), ("n_layer", -1), ("n_head", 0), ("vocab_size", 2 ** 40),
                       ("layer_norm_epsilon", float("nan")), ("attn_pdrop", 1.0), ("n_layer", True),
                       ("n_embd", 8.0), ("activation_function", ["gelu"])):
        with pytest.raises(ValueError, match=f"^cfg.json: {key}") as e:
            GPTConfig.from_hf_config({**SMALL, key: value}, source="cfg.json")
        print(f"\n{e.value}", end="")


# ----------------------------------------------------------------------------
# adapter_config.json

def test_adapter_config_reader(small_base, tmp_path):
    base, adapter = small_base
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / ADAPTER_WEIGHTS).write_bytes((adapter / ADAPTER_WEIGHTS).read_bytes())
    valid = json.loads((adapter / ADAPTER_CONFIG).read_text())
    keys = sorted(valid) + ["unknown"]
    patterns = st.dictionaries(st.sampled_from(["c_attn", "c_fc", "h.0.mlp.c_fc", "(", "a{99999999999}", "[", "*", ""]),
                               CONFIG_VALUES, max_size=2)
    configs = st.one_of(mutated(valid, keys), mutated(valid, keys).flatmap(
        lambda c: st.tuples(patterns, patterns).map(lambda p: {**c, "rank_pattern": p[0], "alpha_pattern": p[1]})),
        junk)

    def test(outcomes):
        @given(raw_file(configs))
        def case(data):
            (folder / ADAPTER_CONFIG).write_bytes(data)
            try:
                model = LoRAGPT.from_pretrained(base, folder)
            except ValueError as e:
                clean(e, folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS)
                outcomes["error"] += 1
                return
            assert set(model.lora_modules) == {"h.0.attn.c_attn", "h.0.mlp.c_fc"}
            outcomes["loaded"] += 1
        return case
    outcomes = run_cases("LoRAGPT.from_pretrained on generated adapter_config.json (ValueError)", test)
    jt.sync_all(True)
    assert outcomes["error"] and outcomes["loaded"]


# ----------------------------------------------------------------------------
# safetensors

def header_of(data):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n])


def test_safetensors_reader(tmp_path):
    good = tmp_path / "good.safetensors"
    atomic_save_safetensors(good, {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                   "b": np.ones(4, dtype=np.int64)}, metadata={"format": "pt"})
    data = good.read_bytes()
    header = header_of(data)
    body = data[8 + struct.unpack("<Q", data[:8])[0]:]
    entry = st.fixed_dictionaries({"dtype": maybe(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3",
                                                                    "C64", "f32", ""])),
                                   "shape": maybe(st.lists(st.integers(-2, 2 ** 40) | st.integers(0, 6), max_size=3)),
                                   "data_offsets": maybe(st.lists(st.integers(-1, 2 ** 64) | st.integers(0, 60),
                                                                  min_size=2, max_size=2))})
    headers = st.one_of(st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), maybe(entry), max_size=3),
                        st.just(header).flatmap(lambda h: st.sampled_from(sorted(h)).flatmap(
                            lambda k: maybe(entry).map(lambda e: {**h, k: e}))), junk)

    def assemble(args):
        kind, h, n, at, byte, where = args
        if kind == "header":  # a generated header over the real body, its length field right or wrong
            raw = json.dumps(h).encode()
            length = len(raw) if n is None else n
            return struct.pack("<Q", length % 2 ** 64) + raw + body
        at = int(where * len(data))
        return {"cut": data[:at], "byte": data[:at] + bytes([byte]) + data[at + 1:], "append": data + bytes([byte]) * at,
                "length": struct.pack("<Q", (n or 0) % 2 ** 64) + data[8:]}[kind]
    files = st.tuples(st.sampled_from(["header", "header", "cut", "byte", "byte", "append", "length"]), headers,
                      st.none() | st.integers(0, 2 ** 64) | st.integers(0, 300), st.integers(0, 10), st.integers(0, 255),
                      st.floats(0, 1, allow_subnormal=False)).map(assemble)
    path = tmp_path / "fuzzed.safetensors"

    def test(outcomes):
        @given(files)
        def case(raw):
            path.write_bytes(raw)
            try:
                tensors = load_safetensors(path)
            except ValueError as e:
                clean(e, path)
                assert str(e).startswith(f"{path}: not a valid safetensors file ("), e
                outcomes["error"] += 1
                return
            assert all(isinstance(v, np.ndarray) for v in tensors.values())
            outcomes["loaded"] += 1
        return case
    outcomes = run_cases("load_safetensors on corrupted files (ValueError)", test)
    assert outcomes["error"] and outcomes["loaded"]
