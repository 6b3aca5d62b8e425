"""The SQuAD v1.1 metric in model_utils.py must match the official evaluate-v1.1.py.

    .venv/bin/python -m pytest tests/test_squad_metric.py -s   # -s shows the measured EM/F1
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_lora_dataset import SHARED_SQUAD, read_squad
from model_utils import (evaluate_squad, exact_match_score, f1_score,
                         metric_max_over_ground_truths, normalize_answer)

REPO = Path(__file__).resolve().parents[1]
DEV = SHARED_SQUAD / "dev-v1.1.json"

# Published table in ../shared/data/squad/README.md: EM, F1 to 3 decimals.
REFERENCE = {
    "bert-large-ensemble": (86.206, 92.196),
    "logistic-regression-baseline": (40.142, 50.982),
    "match-lstm-boundary-ensemble": (67.635, 76.756),
    "slqa-plus-ensemble": (81.949, 88.384),
    "r-net-plus-ensemble": (82.469, 88.478),
}


def tiny_dataset():
    """Two questions in the official layout: q1 has two ground truths, q2 one."""
    return [{"title": "T", "paragraphs": [{
        "context": "The cat sat on the mat in Paris.",
        "qas": [
            {"id": "q1", "question": "Who sat?", "answers": [
                {"text": "the cat", "answer_start": 0}, {"text": "a black cat", "answer_start": 0}]},
            {"id": "q2", "question": "Where?", "answers": [{"text": "in Paris", "answer_start": 23}]},
        ]}]}]


# ----------------------------------------------------------------------------
# Unit tests

def test_normalize_answer():
    assert normalize_answer("The Cat!") == "cat"
    assert normalize_answer("  a  Tale of  an Apple ") == "tale of apple"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("U.S.A.") == "usa"
    # punctuation goes before articles: "the-end" -> "theend", which is not an article
    assert normalize_answer("the-end") == "theend"
    assert normalize_answer("") == ""


def test_f1_partial_overlap():
    # prediction tokens: [denver, broncos, team]; truth: [denver, broncos]
    # common 2 -> precision 2/3, recall 2/2 -> F1 = 2*(2/3)*1 / (2/3 + 1) = 0.8
    assert f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # a repeated token counts at most as often as it occurs in both: [x, x, y] vs [x, z]
    # common 1 -> precision 1/3, recall 1/2 -> F1 = 2*(1/6) / (5/6) = 0.4
    assert f1_score("x x y", "x z") == pytest.approx(0.4)
    assert f1_score("nothing shared", "Denver") == 0
    assert f1_score("The", "a") == 0  # both normalise to no tokens: no common token -> 0


def test_exact_match_max_over_ground_truths():
    truths = ["Denver Broncos", "the Broncos", "Broncos"]
    assert exact_match_score("broncos.", "Broncos")
    assert not exact_match_score("Broncos", "Denver Broncos")
    assert metric_max_over_ground_truths(exact_match_score, "The broncos", truths) is True
    assert metric_max_over_ground_truths(exact_match_score, "Denver", truths) is False
    assert metric_max_over_ground_truths(f1_score, "Denver", truths) == pytest.approx(2 / 3)


def test_missing_prediction_counts_zero(capsys):
    result = evaluate_squad(tiny_dataset(), {"q1": "A black cat"})
    assert result == {"exact_match": 50.0, "f1": 50.0}
    assert "Unanswered question q2 will receive score 0." in capsys.readouterr().err


def test_extra_ids_ignored():
    preds = {"q1": "cat", "q2": "Paris", "not-a-question": "whatever"}
    result = evaluate_squad(tiny_dataset(), preds)
    # q1 EM 1; q2 "paris" vs "in paris": EM 0, F1 = 2*(1)*(1/2)/(1.5) = 2/3
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_many_unanswered_warns_briefly(capsys):
    dataset = [{"paragraphs": [{"qas": [{"id": f"q{i}", "answers": [{"text": "x"}]} for i in range(20)]}]}]
    assert evaluate_squad(dataset, {}) == {"exact_match": 0.0, "f1": 0.0}
    err = capsys.readouterr().err
    assert err.count("Unanswered question") == 5
    assert "20 unanswered" in err


# ----------------------------------------------------------------------------
# Command line

def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "model_utils.py"), "evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_cli_matches_function(tmp_path):
    data, preds = tmp_path / "data.json", tmp_path / "preds.json"
    data.write_text(json.dumps({"version": "1.1", "data": tiny_dataset()}))
    predictions = {"q1": "the cat", "q2": "Paris"}
    preds.write_text(json.dumps(predictions))
    r = run_cli(data, preds)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == evaluate_squad(tiny_dataset(), predictions)


def test_cli_bad_files(tmp_path):
    good_data = tmp_path / "data.json"
    good_data.write_text(json.dumps({"version": "1.1", "data": tiny_dataset()}))
    good_preds = tmp_path / "preds.json"
    good_preds.write_text("{}")
    not_json = tmp_path / "broken.json"
    not_json.write_text("{not json")
    no_data = tmp_path / "nodata.json"
    no_data.write_text(json.dumps({"version": "1.1"}))
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    missing = tmp_path / "missing.json"
    cases = [(missing, good_preds, missing), (not_json, good_preds, not_json),
             (no_data, good_preds, no_data), (good_data, missing, missing),
             (good_data, not_json, not_json), (good_data, a_list, a_list)]
    for data, preds, culprit in cases:
        r = run_cli(data, preds)
        assert r.returncode == 2, (data, preds, r.stderr)
        assert str(culprit) in r.stderr
        assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------
# The real dev set: reproduce the published numbers of five systems.

@pytest.fixture(scope="module")
def dev_dataset():
    if not DEV.is_file():
        pytest.skip(f"SQuAD v1.1 dev set not found at {DEV} (shared data absent on this machine)")
    return json.loads(DEV.read_text(encoding="utf-8"))["data"]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_predictions(dev_dataset, name):
    path = SHARED_SQUAD / "reference-predictions" / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"reference predictions not found at {path}")
    result = evaluate_squad(dev_dataset, json.loads(path.read_text(encoding="utf-8")))
    print(f"\n{name}: EM {result['exact_match']:.3f}  F1 {result['f1']:.3f}")
    assert (round(result["exact_match"], 3), round(result["f1"], 3)) == REFERENCE[name]


def test_every_dev_question_is_read_and_scored(dev_dataset, capsys):
    """read_squad yields all 10,570 dev questions, and evaluate_squad averages over all of them:
    the gold answer for every question but one gives 100 * 10569 / 10570, not 100."""
    examples, n_skipped = read_squad(DEV)
    assert (len(examples), n_skipped) == (10_570, 0)
    assert len({ex.id for ex in examples}) == 10_570
    left_out = examples[5_000]
    preds = {ex.id: ex.answers[0] for ex in examples if ex is not left_out}
    result = evaluate_squad(dev_dataset, preds)
    warnings = capsys.readouterr().err
    expected = 100 * 10_569 / 10_570
    with capsys.disabled():
        print(f"\ndev set: {len(examples)} questions read; gold answers for all but one: "
              f"EM {result['exact_match']:.6f} F1 {result['f1']:.6f} (expected {expected:.6f})")
    assert result == pytest.approx({"exact_match": expected, "f1": expected}, abs=1e-9)
    assert warnings.strip() == f"Unanswered question {left_out.id} will receive score 0."
