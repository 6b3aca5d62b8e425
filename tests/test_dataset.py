"""Tests for gpt2_lora_dataset: reading/checking SQuAD, loss masking, truncation, batching, splits.

Uses the project's own data/squad_sample.json and, when present, the real SQuAD v1.1 dev set
in shared/data/squad/ (read in place, never copied into the repo).
"""
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gpt2_lora_dataset as D  # noqa: E402
from model_utils import EOS_ID, EOS_TOKEN, IGNORE_INDEX, load_tokenizer  # noqa: E402

SAMPLE = ROOT / "data" / "squad_sample.json"
needs_shared = pytest.mark.skipif(not (D.SHARED_SQUAD / "dev-v1.1.json").is_file(),
                                  reason=f"real SQuAD dev set not found in {D.SHARED_SQUAD}")


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer()
    # A tokenizer built with the wrong constructor arguments silently has an empty vocab.
    assert t(" Paris")["input_ids"] == [6342] and t.eos_token_id == EOS_ID, \
        "load_tokenizer() did not return GPT-2's BPE tokenizer"
    return t


@pytest.fixture(scope="module")
def sample():
    examples, n_skipped = D.read_squad(SAMPLE)
    assert n_skipped == 0
    return examples


@pytest.fixture(scope="module")
def real_train(tok):
    """The 40-article train split of the real dev set, encoded once at max_length 512."""
    examples, _ = D.read_squad(D.SHARED_SQUAD / "dev-v1.1-train-split.json")
    features, n_truncated = D.encode_dataset(tok, examples, max_length=512)
    return examples, features, n_truncated


def _context_part(tok, ids):
    """The decoded context of a prompt (between 'Context:' and the last '\\nQuestion:')."""
    text = tok.decode(ids)
    assert text.startswith("Context:")
    return text[len("Context:"):].rsplit("\nQuestion:", 1)[0]


def _long_example(answer_at):
    """A ~1000-token context with a unique answer at the start, middle or end."""
    filler = [f"Sentence {i} of the chronicle mentions the {w} harvest of the valley."
              for i, w in enumerate(["barley", "oat", "rye", "apple", "pear"] * 20)]
    pos = {"start": 0, "middle": len(filler) // 2, "end": len(filler)}[answer_at]
    filler.insert(pos, "The founder of the valley guild was Orla Penwick of Dunmere.")
    context = " ".join(filler)
    answer = "Orla Penwick"
    return D.SquadExample(id=f"long-{answer_at}", title="Chronicle", context=context,
                          question="Who founded the valley guild?", answers=[answer],
                          answer_start=context.index(answer))


def _write(tmp_path, obj_or_text, name="bad.json"):
    path = tmp_path / name
    path.write_text(obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text))
    return path


def _squad(context="The river is long.", answers=(("long", 13),), qid="q1", title="River"):
    qa = {"id": qid, "question": "How is the river?",
          "answers": [{"text": t, "answer_start": s} for t, s in answers]}
    return {"version": "1.1", "data": [{"title": title, "paragraphs": [{"context": context, "qas": [qa]}]}]}


# ----------------------------------------------------------------------------
# Reading

def test_sample_file_loads(sample):
    data = D.load_squad_json(SAMPLE)
    assert json.loads(SAMPLE.read_text())["version"] == "1.1"
    assert len(data) == 6 and sum(len(a["paragraphs"]) for a in data) == 12
    assert len(sample) == 53
    assert sum(len(ex.answers) > 1 for ex in sample) >= 20  # alternatives, like the real dev set
    for ex in sample:
        assert ex.context[ex.answer_start:ex.answer_start + len(ex.answers[0])] == ex.answers[0]
        assert all(a in ex.context for a in ex.answers)
    assert len({ex.id for ex in sample}) == len(sample)


@needs_shared
def test_real_dev_set_loads():
    examples, n_skipped = D.read_squad(D.SHARED_SQUAD / "dev-v1.1.json")
    assert (len(examples), n_skipped) == (10_570, 0)
    assert len(D.load_squad_json(D.SHARED_SQUAD / "dev-v1.1.json")) == 48


# ----------------------------------------------------------------------------
# Encoding

def test_loss_only_on_answer_and_eos(tok, sample):
    for ex in sample:
        f = D.encode_example(tok, ex, max_length=512)
        assert not f.truncated and len(f.input_ids) == len(f.targets)
        kept = [t for t in f.targets if t != IGNORE_INDEX]
        assert tok.decode(kept) == " " + ex.answers[0] + EOS_TOKEN
        assert kept == tok(" " + ex.answers[0])["input_ids"] + [EOS_ID]
        # the kept targets are one contiguous run at the end
        assert f.targets[-len(kept):] == kept


def test_loss_on_all_keeps_every_target(tok, sample):
    f = D.encode_example(tok, sample[0], loss_on="all")
    assert IGNORE_INDEX not in f.targets
    assert tok.decode(f.input_ids + f.targets[-1:]).endswith(" " + sample[0].answers[0] + EOS_TOKEN)
    with pytest.raises(ValueError, match="loss_on"):
        D.encode_example(tok, sample[0], loss_on="prompt")


def test_targets_are_inputs_shifted_by_one(tok, sample):
    ex = sample[0]
    f = D.encode_example(tok, ex, loss_on="all")
    assert f.targets[:-1] == f.input_ids[1:]
    assert f.targets[-1] == EOS_ID and EOS_ID not in f.input_ids
    prompt = "Context: " + ex.context + "\nQuestion: " + ex.question + "\nAnswer:"
    assert tok.decode(f.input_ids) == prompt + " " + ex.answers[0]
    g = D.encode_example(tok, ex, loss_on="answer")
    assert g.input_ids == f.input_ids
    assert all(t == IGNORE_INDEX or t == u for t, u in zip(g.targets, f.targets))


@pytest.mark.parametrize("answer_at", ["start", "middle", "end"])
def test_truncation_keeps_question_and_answer(tok, answer_at):
    ex = _long_example(answer_at)
    assert len(tok(ex.context)["input_ids"]) > 900
    f = D.encode_example(tok, ex, max_length=96)
    assert f.truncated and len(f.input_ids) <= 96
    assert tok.decode(f.input_ids).endswith("\nQuestion: " + ex.question + "\nAnswer: " + ex.answers[0])
    n_prompt = len(f.input_ids) - len(tok(" " + ex.answers[0])["input_ids"])
    context = _context_part(tok, f.input_ids[:n_prompt])
    assert ex.answers[0] in context and context.strip() in ex.context
    # cut at word boundaries: the prompt text tokenizes back to the same ids
    assert tok(tok.decode(f.input_ids[:n_prompt]))["input_ids"] == f.input_ids[:n_prompt]
    kept = [t for t in f.targets if t != IGNORE_INDEX]
    assert tok.decode(kept) == " " + ex.answers[0] + EOS_TOKEN


def test_truncation_on_sample_at_96(tok, sample):
    features, n_truncated = D.encode_dataset(tok, sample, max_length=96)
    print(f"\nsample at max_length 96: {n_truncated}/{len(sample)} truncated")
    assert 0 < n_truncated < len(sample)
    for ex, f in zip(sample, features):
        assert len(f.input_ids) <= 96 and f.id == ex.id
        assert ("\nQuestion: " + ex.question + "\nAnswer:") in tok.decode(f.input_ids)
        assert ex.answers[0] in _context_part(tok, f.input_ids)
    # encode_dataset (batched, cached contexts) equals encode_example one by one
    assert features == [D.encode_example(tok, ex, max_length=96) for ex in sample]


def test_encode_prompt(tok, sample):
    ex = sample[0]
    ids, truncated = D.encode_prompt(tok, ex.context, ex.question)
    assert not truncated
    assert ids == D.encode_example(tok, ex).input_ids[:len(ids)]
    long = _long_example("end")
    ids, truncated = D.encode_prompt(tok, long.context, long.question, max_length=128, max_new_tokens=32)
    assert truncated and len(ids) + 32 <= 128
    text = tok.decode(ids)
    assert text.startswith("Context: " + long.context[:40])  # inference keeps the start
    assert text.endswith("\nQuestion: " + long.question + "\nAnswer:")


@needs_shared
def test_real_train_split_truncation(tok, real_train):
    examples, features, n_truncated = real_train
    lengths = np.array([len(f.input_ids) for f in features])
    print(f"\nreal train split (8,981 q) at max_length 512: {n_truncated} truncated "
          f"({100 * n_truncated / len(features):.2f}%), length mean {lengths.mean():.0f}, max {lengths.max()}")
    assert len(features) == 8_981 and 0 < n_truncated < 200
    assert lengths.max() <= 512
    for ex, f in zip(examples, features):
        kept = [t for t in f.targets if t != IGNORE_INDEX]
        assert kept == tok(" " + ex.answers[0])["input_ids"] + [EOS_ID]
        if f.truncated:  # the answer survives in the cut context
            assert ex.answers[0] in _context_part(tok, f.input_ids[:len(f.input_ids) - len(kept) + 1])


# ----------------------------------------------------------------------------
# Batching

def test_collate_pads_right_and_masks(tok, sample):
    features = [D.encode_example(tok, ex) for ex in sample[:4]]
    lengths = [len(f.input_ids) for f in features]
    assert len(set(lengths)) > 1
    batch = D.collate(features)
    B, T = batch["input_ids"].shape
    assert (B, T) == (4, max(lengths))
    assert batch["targets"].shape == batch["attention_mask"].shape == (B, T)
    for i, (f, n) in enumerate(zip(features, lengths)):
        assert batch["input_ids"][i, :n].tolist() == f.input_ids
        assert batch["targets"][i, :n].tolist() == f.targets
        assert (batch["attention_mask"][i, :n] == 1).all() and (batch["attention_mask"][i, n:] == 0).all()
        assert (batch["targets"][i, n:] == IGNORE_INDEX).all() and (batch["input_ids"][i, n:] == EOS_ID).all()
    assert D.count_tokens(batch) == sum(lengths)


def test_batches_pin_the_order_per_seed_and_epoch():
    """The exact batches of a small case, written out: a resumed run skips the first k batches
    of the epoch it stopped in, so the order must not change between runs or versions."""
    features = list(range(10))  # only len() matters without bucketing
    # np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,))).permutation(10),
    # cut into batches of 4
    expected = {0: [[4, 1, 6, 7], [0, 5, 9, 2], [3, 8]],
                1: [[5, 0, 9, 3], [2, 4, 6, 1], [8, 7]],
                2: [[7, 8, 6, 2], [4, 1, 0, 5], [9, 3]]}
    got = {epoch: D.batches(features, 4, seed=1, epoch=epoch) for epoch in expected}
    print(f"\nseed 1, 10 examples, batch 4: {got}")
    assert got == expected
    assert D.batches(features, 4, seed=1, epoch=0, drop_last=True) == expected[0][:2]
    assert D.batches(features, 4, seed=1, epoch=0, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # seeding with seed + epoch made (seed 2, epoch 0) replay (seed 1, epoch 1)
    assert D.batches(features, 4, seed=2, epoch=0) == [[5, 7, 3, 9], [6, 1, 8, 4], [0, 2]] != expected[1]


def test_batches_cover_each_example_once_per_epoch_in_a_new_order():
    features = list(range(53))
    epochs = [D.batches(features, 8, seed=1, epoch=e) for e in range(4)]
    for groups in epochs:
        assert [len(b) for b in groups] == [8] * 6 + [5]
        assert sorted(i for b in groups for i in b) == list(range(53))  # every index exactly once
    flat = [tuple(i for b in groups for i in b) for groups in epochs]
    assert len(set(flat)) == 4, "two epochs saw the examples in the same order"
    kept = D.batches(features, 8, seed=1, epoch=0, drop_last=True)
    assert kept == epochs[0][:6]


def test_rank_share_cuts_a_global_batch_into_disjoint_micro_batches():
    """Rank r of W takes pieces r * k .. r * k + k - 1 of the global batch cut into W * k
    near-equal contiguous pieces (k = grad_accum), whatever the split."""
    batch = [7, 3, 9, 1, 4, 8, 0, 2, 6, 5]
    assert D.rank_share(batch, 1, 0, 1) == [batch]
    assert D.rank_share(batch, 1, 0, 2) == [[7, 3, 9, 1, 4], [8, 0, 2, 6, 5]]
    assert D.rank_share(batch, 2, 0, 1) == [[7, 3, 9, 1, 4]]
    assert D.rank_share(batch, 2, 1, 1) == [[8, 0, 2, 6, 5]]
    assert D.rank_share(batch, 2, 0, 2) == [[7, 3, 9], [1, 4, 8]]
    assert D.rank_share(batch, 2, 1, 2) == [[0, 2], [6, 5]]
    for world, accum in ((1, 3), (2, 2), (3, 1), (4, 4)):
        shares = [D.rank_share(batch, world, r, accum) for r in range(world)]
        flat = [i for share in shares for micro in share for i in micro]
        assert flat == batch, (world, accum)  # disjoint, complete, in the global batch's order
        assert all(len(share) == accum for share in shares)
    assert D.rank_share([5], 2, 1, 1) == [[]]  # a short last batch can leave a rank nothing


def test_count_supervised(tok, sample):
    features = D.encode_dataset(tok, sample[:5])[0]
    batch = D.collate(features)
    expected = int((batch["targets"] != IGNORE_INDEX).sum())
    print(f"\n5 questions: {expected} supervised targets")
    assert D.count_supervised(features) == expected
    assert D.count_supervised(features[:2]) + D.count_supervised(features[2:]) == expected


class _Len:
    """A stand-in feature: batches(bucket=True) reads only len(input_ids)."""
    def __init__(self, n):
        self.input_ids = [0] * n


def test_bucketed_batches_pin_the_order_and_group_similar_lengths():
    lengths = [5, 1, 9, 3, 7, 2, 8, 6, 4, 10]
    features = [_Len(n) for n in lengths]
    # permutation [4, 1, 6, 7, 0, 5, 9, 2, 3, 8] sorted by length -> [1, 5, 3 | 8, 0, 7 | 4, 6, 2 | 9],
    # then the batch order is shuffled by the same generator
    assert D.batches(features, 3, seed=1, epoch=0, bucket=True) == [[1, 5, 3], [8, 0, 7], [9], [4, 6, 2]]
    assert D.batches(features, 3, seed=1, epoch=0, bucket=True, shuffle=False) == \
        [[1, 5, 3], [8, 0, 7], [4, 6, 2], [9]]
    # several chunks (64 * batch_size = 256 examples each): still each example once per epoch
    rng = np.random.default_rng(0)
    n = 701
    features = [_Len(int(k)) for k in rng.integers(1, 400, n)]
    epochs = [D.batches(features, 4, seed=3, epoch=e, bucket=True) for e in range(3)]
    for groups in epochs:
        assert sorted(i for b in groups for i in b) == list(range(n))
        assert sorted(len(b) for b in groups) == [1] + [4] * 175
        spans = [len(features[b[-1]].input_ids) - len(features[b[0]].input_ids) for b in groups]
        assert min(spans) >= 0, "a bucketed batch is not sorted by length"
        print(f"\nbucketed, {n} examples in 3 chunks, batch 4: mean length span within a batch "
              f"{np.mean(spans):.1f} (lengths 1..399)")
        assert np.mean(spans) < 10
    assert len({tuple(map(tuple, g)) for g in epochs}) == 3
    dropped = D.batches(features, 4, seed=3, epoch=0, bucket=True, drop_last=True)
    assert len(dropped) == n // 4 and len({i for b in dropped for i in b}) == n // 4 * 4


def _padding_fraction(features, groups):
    padded = sum(len(g) * max(len(features[i].input_ids) for i in g) for g in groups)
    return 1 - sum(len(f.input_ids) for f in features) / padded


def test_bucketing_reduces_padding(tok, sample, request):
    # the real train split when present (realistic lengths), else the small sample
    if (D.SHARED_SQUAD / "dev-v1.1-train-split.json").is_file():
        features = request.getfixturevalue("real_train")[1]
    else:
        features = D.encode_dataset(tok, sample)[0]
    plain = D.batches(features, 16, seed=0, epoch=0)
    bucketed = D.batches(features, 16, seed=0, epoch=0, bucket=True)
    assert bucketed != D.batches(features, 16, seed=0, epoch=1, bucket=True)
    assert sorted(i for b in bucketed for i in b) == list(range(len(features)))
    p_plain, p_bucket = _padding_fraction(features, plain), _padding_fraction(features, bucketed)
    print(f"\npadding fraction, batch 16, {len(features)} examples: "
          f"shuffled {100 * p_plain:.1f}%, bucketed {100 * p_bucket:.1f}%")
    assert p_bucket < p_plain / 2


# ----------------------------------------------------------------------------
# Splits

def test_split_by_article(sample):
    train, val = D.split_by_article(sample, val_fraction=0.2, seed=0)
    assert len(train) + len(val) == len(sample) and val and train
    assert not {ex.context for ex in train} & {ex.context for ex in val}
    assert not {ex.title for ex in train} & {ex.title for ex in val}
    # pinned: a run's held-out articles must not change between runs or versions
    assert {ex.title for ex in val} == {"Ilsabet_Marrow"}  # 20% of 6 articles
    assert [ex.id for ex in val] == [ex.id for ex in sample if ex.title == "Ilsabet_Marrow"]  # file order kept
    assert {ex.title for ex in D.split_by_article(sample, 0.5, seed=1)[1]} == \
        {"Harrowmere", "Lantern_Tide_Festival", "Quillfeather_Instruments"}


def test_split_never_shares_a_repeated_paragraph(sample):
    # the same paragraph under two titles must stay on one side
    twin = [D.SquadExample(ex.id + "-copy", "Other_Title", ex.context, ex.question, ex.answers, ex.answer_start)
            for ex in sample[:5]]
    for seed in range(5):
        train, val = D.split_by_article(sample + twin, val_fraction=0.5, seed=seed)
        assert not {ex.context for ex in train} & {ex.context for ex in val}


@needs_shared
def test_real_splits_share_no_context():
    train, _ = D.read_squad(D.SHARED_SQUAD / "dev-v1.1-train-split.json")
    heldout, _ = D.read_squad(D.SHARED_SQUAD / "dev-v1.1-heldout-split.json")
    assert (len(train), len(heldout)) == (8_981, 1_589)
    assert not {ex.context for ex in train} & {ex.context for ex in heldout}
    assert not {ex.title for ex in train} & {ex.title for ex in heldout}


# ----------------------------------------------------------------------------
# Bad input

def test_not_json(tmp_path):
    path = _write(tmp_path, '{"data": [\n  {"title": "x",,}\n]}')
    with pytest.raises(D.SquadFormatError, match=r"bad\.json: not valid JSON \(line 2, column"):
        D.read_squad(path)


def test_empty_file_and_no_questions(tmp_path):
    with pytest.raises(D.SquadFormatError, match="empty.json: empty file"):
        D.read_squad(_write(tmp_path, "  \n", "empty.json"))
    with pytest.raises(D.SquadFormatError, match="none.json: no usable questions"):
        D.read_squad(_write(tmp_path, {"version": "1.1", "data": []}, "none.json"))


def test_missing_keys(tmp_path):
    with pytest.raises(D.SquadFormatError, match="no top-level 'data' list"):
        D.read_squad(_write(tmp_path, {"version": "1.1", "articles": []}))
    with pytest.raises(D.SquadFormatError, match="bad.json: article 0 lacks 'title' or a 'paragraphs' list"):
        D.read_squad(_write(tmp_path, {"data": [{"title": "River"}]}))
    with pytest.raises(D.SquadFormatError, match="article 'River', paragraph 0 lacks 'context'"):
        D.read_squad(_write(tmp_path, {"data": [{"title": "River", "paragraphs": [{"qas": []}]}]}))
    obj = _squad()
    del obj["data"][0]["paragraphs"][0]["qas"][0]["answers"]
    with pytest.raises(D.SquadFormatError, match="article 'River', question q1: missing key\\(s\\) 'answers'"):
        D.read_squad(_write(tmp_path, obj))


def test_answer_not_in_context(tmp_path):
    with pytest.raises(D.SquadFormatError, match="bad.json: article 'River', question q1: answer 'short' not found"):
        D.read_squad(_write(tmp_path, _squad(answers=[("short", 13)])))
    # an alternative answer must be in the context too
    with pytest.raises(D.SquadFormatError, match="answer 'wide' not found"):
        D.read_squad(_write(tmp_path, _squad(answers=[("long", 13), ("wide", 0)])))


def test_shifted_answer_start_uses_first_occurrence(tmp_path):
    examples, _ = D.read_squad(_write(tmp_path, _squad(answers=[("long", 2)])))
    assert examples[0].answer_start == 13


def test_skip_bad_counts_bad_questions(tmp_path):
    obj = _squad()
    qas = obj["data"][0]["paragraphs"][0]["qas"]
    qas.append({"id": "q2", "question": "What?", "answers": [{"text": "short", "answer_start": 0}]})
    qas.append({"id": "q3", "question": "What?"})
    qas.append({"id": "q1", "question": "Again?", "answers": [{"text": "river", "answer_start": 4}]})
    path = _write(tmp_path, obj)
    with pytest.raises(D.SquadFormatError, match="question q2"):
        D.read_squad(path)
    examples, n_skipped = D.read_squad(path, skip_bad=True)
    assert [ex.id for ex in examples] == ["q1"] and n_skipped == 3
    # file-level errors still raise
    with pytest.raises(D.SquadFormatError, match="not valid JSON"):
        D.read_squad(_write(tmp_path, "nope"), skip_bad=True)


# ----------------------------------------------------------------------------
# Download (never touches the network)

def test_ensure_squad_uses_existing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download expected"))
    (tmp_path / "dev-v1.1.json").write_text("{}")
    assert D.ensure_squad("dev", data_dir=tmp_path) == tmp_path / "dev-v1.1.json"
    with pytest.raises(ValueError, match="unknown SQuAD split"):
        D.ensure_squad("test", data_dir=tmp_path)


def test_ensure_squad_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as e:
        D.ensure_squad("train", data_dir=tmp_path / "data")
    msg = str(e.value)
    print("\n" + msg)
    assert "could not download SQuAD v1.1 train from https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json" in msg
    assert "URLError" in msg and str(tmp_path / "data" / "train-v1.1.json") in msg and "--train-file" in msg
    assert list((tmp_path / "data").iterdir()) == []  # no temporary file left behind


def test_ensure_squad_rejects_wrong_download(tmp_path, monkeypatch):
    body = SAMPLE.read_bytes()

    class Response:
        headers = {"Content-Length": str(len(body))}
        def __init__(self):
            self.left = body
        def read(self, n):
            chunk, self.left = self.left[:n], self.left[n:]
            return chunk
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Response())
    with pytest.raises(RuntimeError, match="(?s)53 questions, expected 10570.*--eval-file"):
        D.ensure_squad("dev", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
