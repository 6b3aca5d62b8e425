"""test_generation.py: batched SQuAD answering, against transformers + PEFT, and its CLI.

A tiny random GPT-2 written by transformers and a random PEFT adapter stand in for the
real ones (no GPT-2 weights can be downloaded here). Prompts stay short (n_positions
128) and answers a few tokens, so Jittor compiles few shapes and the file runs fast.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from helpers import make_hf_model, peft_wrap, save_hf_model
from gpt2_lora_dataset import encode_prompt, read_squad
from model_utils import EOS_ID, ensure_gpt2
from test_generation import (SAMPLE_DATA, answer_questions, decode_answer, left_pad, load_model,
                             subset_dataset)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "test_generation.py"
GEN = dict(max_new_tokens=6, max_length=128, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base folder, adapter folder) of a tiny random GPT-2 and a random LoRA adapter, PEFT-written."""
    root = tmp_path_factory.mktemp("tiny_qa")
    base = save_hf_model(make_hf_model("tiny"), root / "base")
    pm = peft_wrap(make_hf_model("tiny"), 4, 8, ("c_attn", "c_proj", "c_fc"), init=False)  # random A and B
    pm.save_pretrained(str(root / "adapter"))
    return base, root / "adapter"


@pytest.fixture(scope="module")
def loaded(tiny):
    model, tokenizer = load_model(*tiny)
    return model, tokenizer


@pytest.fixture(scope="module")
def examples():
    return read_squad(SAMPLE_DATA)[0][:6]


def run_cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# --- the library ------------------------------------------------------------------

def test_batching_and_sorting_do_not_change_greedy_answers(loaded, examples):
    model, tokenizer = loaded
    one = answer_questions(model, tokenizer, examples, batch_size=1, **GEN)
    four = answer_questions(model, tokenizer, examples, batch_size=4, **GEN)
    print(f"\nbatch 1 vs batch 4 (left padding, length-sorted): {sum(one[k] == four[k] for k in one)}/{len(one)} "
          f"answers equal; e.g. {one[examples[0].id]!r}")
    assert list(one) == [ex.id for ex in examples]  # one answer per id, in the caller's order
    assert all(isinstance(a, str) for a in one.values())
    assert one == four
    assert any(one.values()), "every answer empty: the test would not see a batching bug"


def test_greedy_answers_equal_transformers_peft(tiny, loaded, examples):
    """The same prompts through PEFT's model and transformers' own left-padded greedy generate()."""
    model, tokenizer = loaded
    ours = answer_questions(model, tokenizer, examples, batch_size=3, **GEN)
    pm = PeftModel.from_pretrained(make_hf_model("tiny"), str(tiny[1])).eval()
    prompts = [encode_prompt(tokenizer, ex.context, ex.question, 128, GEN["max_new_tokens"])[0] for ex in examples]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = pm.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                          max_new_tokens=GEN["max_new_tokens"], do_sample=False, pad_token_id=EOS_ID,
                          eos_token_id=EOS_ID).numpy()
    ref = {ex.id: decode_answer(tokenizer, row[ids.shape[1]:]) for ex, row in zip(examples, out)}
    print(f"\nours vs transformers+PEFT greedy: {sum(ours[k] == ref[k] for k in ref)}/{len(ref)} answers equal")
    assert ours == ref


class ScriptedModel:
    """Stands in for GPT: 'generates' fixed tokens after each prompt, and checks the padding it is given."""

    class config:
        n_positions = 1024

    def __init__(self, new_tokens):
        self.new_tokens = np.array(new_tokens)
        self.calls = []

    def eval(self):
        return self

    def generate(self, ids, max_new_tokens, attention_mask=None, eos_token_id=None, **kw):
        assert (attention_mask[:, -1] == 1).all(), "prompts must be LEFT-padded"
        assert (ids[attention_mask == 0] == EOS_ID).all() and eos_token_id == EOS_ID
        self.calls.append(attention_mask.sum(1).tolist())
        new = np.broadcast_to(self.new_tokens, (ids.shape[0], len(self.new_tokens)))
        return np.concatenate([ids, new], axis=1)


def test_answer_is_cut_at_eos_and_newline(loaded, examples):
    _, tokenizer = loaded
    enc = lambda s: tokenizer(s)["input_ids"]
    assert decode_answer(tokenizer, enc(" the Orn hills") + [EOS_ID] + enc(" Question: x")) == "the Orn hills"
    assert decode_answer(tokenizer, enc(" 1887\nQuestion: When?") + [EOS_ID]) == "1887"
    assert decode_answer(tokenizer, [EOS_ID] * 3) == ""
    # end to end: only the tokens after each (left-padded) prompt make the answer
    fake = ScriptedModel(enc(" Lake Ost.\nContext: more") + [EOS_ID])
    answers = answer_questions(fake, tokenizer, examples, batch_size=4, **GEN)
    assert set(answers.values()) == {"Lake Ost."}
    lengths = [n for call in fake.calls for n in call]
    assert lengths == sorted(lengths) and len(fake.calls) == 2  # sorted by prompt length, 4 + 2


def test_subset_dataset_keeps_only_given_questions():
    data = json.loads(SAMPLE_DATA.read_text())["data"]
    ids = [data[0]["paragraphs"][1]["qas"][0]["id"], data[2]["paragraphs"][0]["qas"][3]["id"]]
    sub = subset_dataset(data, ids)
    assert [qa["id"] for a in sub for p in a["paragraphs"] for qa in p["qas"]] == ids
    assert [a["title"] for a in sub] == [data[0]["title"], data[2]["title"]]


def test_ensure_gpt2_missing_custom_path(tmp_path):
    missing = tmp_path / "my_model"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such folder; expected a GPT-2 checkpoint folder"):
        ensure_gpt2(missing)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{missing}: has no config.json"):
        ensure_gpt2(missing)
    (missing / "config.json").write_text("{}")
    assert ensure_gpt2(str(missing)) == missing


# --- the command line -------------------------------------------------------------

def test_cli_data_writes_predictions_and_scores(tiny, tmp_path):
    base, adapter = tiny
    out = tmp_path / "preds.json"
    r = run_cli("--model", base, "--adapter", adapter, "--data", SAMPLE_DATA, "--limit", 3, "--batch-size", 2,
                "--max-new-tokens", 6, "--output", out)
    print(f"\n{r.stdout}{r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr
    preds = json.loads(out.read_text())
    first3 = [ex.id for ex in read_squad(SAMPLE_DATA)[0][:3]]
    assert list(preds) == first3 and all(isinstance(v, str) for v in preds.values())
    scores = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(scores) == {"exact_match", "f1"} and all(0 <= v <= 100 for v in scores.values())
    assert "first 3 of 53 questions only" in r.stdout
    saved = json.loads((tmp_path / "preds.scores.json").read_text())
    assert saved["questions"] == 3 and saved["f1"] == scores["f1"]


def test_cli_one_question_prints_the_library_answer(tiny, loaded, examples):
    ex = examples[1]
    r = run_cli("--model", tiny[0], "--adapter", tiny[1], "--context", ex.context, "--question", ex.question,
                "--max-new-tokens", 6, "--max-length", 128)
    assert r.returncode == 0, r.stderr
    expected = answer_questions(*loaded, [ex], **GEN)[ex.id]
    print(f"\n--context/--question printed {r.stdout!r}; library: {expected!r}")
    assert r.stdout == expected + "\n"


def test_cli_demo_with_the_demo_checkpoint(tiny, tmp_path):
    """No arguments and no ./gpt2: the model of `make demo` in checkpoints/demo, said to be random."""
    demo = tmp_path / "checkpoints" / "demo"
    demo.mkdir(parents=True)
    (demo / "base_model").symlink_to(tiny[0])
    (demo / "adapter").symlink_to(tiny[1])
    r = run_cli("--max-new-tokens", 4, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "random-initialised base model" in r.stdout
    assert r.stdout.count("question: ") == 4 and r.stdout.count("gold: ") == 4


@pytest.mark.parametrize("case", ["no_model_at_all", "missing_model", "bad_adapter", "bad_data"])
def test_cli_data_errors_exit_1_naming_the_file(tiny, tmp_path, case):
    base, adapter = tiny
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.1", "data": ')
    args, cwd, needle = {
        "no_model_at_all": ([], tmp_path, "no model found: run `make demo`"),
        "missing_model": (["--model", tmp_path / "nowhere", "--context", "c", "--question", "q"], ROOT,
                          f"{tmp_path / 'nowhere'}: no such folder"),
        "bad_adapter": (["--model", base, "--adapter", tmp_path, "--context", "c", "--question", "q"], ROOT,
                        f"{tmp_path / 'adapter_config.json'}: missing"),
        "bad_data": (["--model", base, "--data", bad], ROOT, f"{bad}: not valid JSON"),
    }[case]
    # no run, no ./gpt2 and gpt2 not in an (empty, offline) Hugging Face cache
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    r = run_cli(*args, cwd=cwd, env=env)
    print(f"\n{case}: exit {r.returncode}: {r.stderr.strip()}")
    assert r.returncode == 1 and needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_interactive_streams_the_answer_token_by_token(loaded, examples):
    """interactive(): the answer comes in pieces as tokens are generated, and adds up to the
    library's answer; an empty question asks for a new context, end of input leaves."""
    import io
    from test_generation import interactive

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.parts = []

        def write(self, text):
            self.parts.append(text)
            return super().write(text)

    model, tokenizer = loaded
    ex = examples[0]
    gen = dict(max_new_tokens=6, max_length=128, temperature=0.0, top_k=None, top_p=None, seed=None)
    out = Writes()
    interactive(model, tokenizer, gen, lines=io.StringIO(f"{ex.context}\n\n{ex.question}\n\n"), out=out)
    expected = answer_questions(model, tokenizer, [ex], **GEN)[ex.id]
    prompt = "question (empty: new context)> "
    i = out.parts.index(prompt)
    pieces = [p for p in out.parts[i + 1:out.parts.index(prompt, i + 1)] if p.strip()]
    print(f"\nstreamed in {len(pieces)} pieces: {pieces}; library: {expected!r}")
    assert "".join(pieces).strip() == expected and len(pieces) > 1
    assert out.getvalue().count("Paste a context") == 2  # asked again after the empty question; then end of input
