"""Every command-line value checked: one line saying what is wrong and the accepted range,
exit code 2 for a usage error and 1 for a data error, never a traceback (in-process through
main() for the many, a few as real subprocesses)."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from gpt2_lora_dataset import SquadExample, encode_example, encode_prompt
from helpers import write_sample_split
from model_utils import load_tokenizer
from training.train_config import MIN_MAX_LENGTH, MIN_PROMPT_TOKENS, parse_args
from train_default_lora import main

ROOT = Path(__file__).resolve().parents[1]
TINY = "n_layer=2,n_head=2,n_embd=32,n_positions=256,initializer_range=0.1"
TARGETS = ("a comma-separated list of GPT-2 projections (c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj, "
           "optionally with a layer, e.g. h.0.attn.c_attn) or a regular expression")

# extra arguments -> the message after "error: "
USAGE_ERRORS = {
    ("--lr", "0"): "--lr must be > 0, not 0.0",
    ("--lr=-1e-3",): "--lr must be > 0, not -0.001",  # argparse reads "-1e-3" alone as an option
    ("--lr", "nan"): "--lr must be a finite number, not nan",
    ("--lr", "inf"): "--lr must be a finite number, not inf",
    ("--dropout", "-0.1"): "--dropout must be in [0, 1), not -0.1",
    ("--dropout", "1"): "--dropout must be in [0, 1), not 1.0",
    ("--r", "-1"): "--r must be at least 1, not -1",
    ("--r", "0"): "--r must be at least 1, not 0",
    ("--alpha", "0"): "--alpha must be > 0, not 0.0",
    ("--alpha", "-16"): "--alpha must be > 0, not -16.0",
    ("--warmup-steps", "-1"): "--warmup-steps must be >= 0, not -1",
    ("--weight-decay", "-0.01"): "--weight-decay must be >= 0, not -0.01",
    ("--clip", "-1"): "--clip must be >= 0, not -1.0",
    ("--max-steps", "-5"): "--max-steps must be >= 0, not -5",
    ("--max-train-examples", "-1"): "--max-train-examples must be >= 0, not -1",
    ("--keep-checkpoints", "-1"): "--keep-checkpoints must be >= 0, not -1",
    ("--gen-eval-examples", "-1"): "--gen-eval-examples must be >= 0, not -1",
    ("--seed", "-1"): "--seed must be in [0, 2^31), not -1",
    ("--seed", str(2 ** 31)): f"--seed must be in [0, 2^31), not {2 ** 31}",
    ("--schedule", "cosin"): "--schedule must be cosine or linear or constant, not 'cosin'",
    ("--init", "xavier"): "--init must be kaiming, gaussian, pissa, pissa_niter_<N> or olora, not 'xavier'",
    ("--init", "pissa_niter_"): "--init must be kaiming, gaussian, pissa, pissa_niter_<N> or olora, not 'pissa_niter_'",
    ("--init", "pissa", "--use-dora"): "--init pissa decomposes whole weights and is saved as PEFT's conversion to a "
                                       "plain LoRA, which has no q/v-only form and drops DoRA's magnitude: leave out "
                                       "--use-dora",
    ("--loraplus-lr-ratio=-1",): "--loraplus-lr-ratio must be >= 0 (0 = off), not -1.0",
    ("--loss-on", "prompt"): "--loss-on must be answer or all, not 'prompt'",
    ("--targets", "c_attn,q_proj"): f"--targets must be {TARGETS}, not 'c_attn,q_proj'",
    ("--targets", ""): f"--targets must be {TARGETS}, not ''",
    ("--max-length", "10"): "--max-length must be at least 11 (the shortest prompt + answer), not 10",
    ("--max-new-tokens", "183"): "--max-new-tokens must be at most --max-length - 10 = 182 (room for the "
                                 "shortest prompt), not 183",
    ("--batch-size", "0"): "--batch-size must be at least 1, not 0",
    ("--epochs", "0"): "--epochs must be at least 1, not 0",
    ("--grad-accum", "-2"): "--grad-accum must be at least 1, not -2",
    ("--eval-interval", "0"): "--eval-interval must be at least 1, not 0",
    ("--save-interval", "0"): "--save-interval must be at least 1, not 0",
    ("--eval-examples", "0"): "--eval-examples must be at least 1, not 0",
    ("--max-new-tokens", "0"): "--max-new-tokens must be at least 1, not 0",
    ("--adapter-steps", "0,10"): "--adapter-steps must be comma-separated step numbers of at least 1 (e.g. 1,10,100), "
                                 "not '0,10'",
    ("--adapter-steps", "10;20"): "--adapter-steps must be comma-separated step numbers of at least 1 (e.g. 1,10,100), "
                                  "not '10;20'",
    ("--random-base", "n_embd=-5"): "--random-base: n_embd must be an integer in [1, 2^24], not -5",
    ("--random-base", "n_layer=0"): "--random-base: n_layer must be an integer in [1, 1024], not 0",
    ("--random-base", "n_embd=30,n_head=4"): "--random-base: n_embd=30 is not divisible by n_head=4",
    ("--random-base", "n_layr=2"): "--random-base: 'n_layr=2' is not a GPTConfig field=value (fields: n_layer, "
                                   "n_head, n_embd, n_positions, vocab_size, layer_norm_epsilon, activation_function, "
                                   "resid_pdrop, embd_pdrop, attn_pdrop, initializer_range, bos_token_id, eos_token_id)",
    ("--random-base", "n_layer=two"): "--random-base: 'n_layer=two': 'two' is not of type int",
    ("--random-base", "embd_pdrop=1.5"): "--random-base: embd_pdrop must be a number in [0, 1), not 1.5",
}


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    return write_sample_split(tmp_path_factory.mktemp("data"))


def argv(split_files, out, *extra):
    return ["--random-base", TINY, "--train-file", str(split_files[0]), "--eval-file", str(split_files[1]),
            "--output-dir", str(out), "--max-steps", "1", "--max-length", "192", "--gen-eval-examples", "1",
            "--eval-examples", "4", *extra]


def run_main(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_the_shortest_example_is_what_the_checks_assume():
    """MIN_PROMPT_TOKENS / MIN_MAX_LENGTH, measured: one-token context, question and answer."""
    tok = load_tokenizer()
    ex = SquadExample("q", "t", "a", "b", ["a"], 0)
    n_train = len(encode_example(tok, ex, 100).input_ids)
    n_prompt = len(encode_prompt(tok, "a", "b", 100, 5)[0])
    print(f"\nshortest training example {n_train} tokens, shortest prompt {n_prompt}")
    assert (n_train, n_prompt) == (MIN_MAX_LENGTH, MIN_PROMPT_TOKENS)
    with pytest.raises(ValueError, match="leave no room in max_length=10"):
        encode_example(tok, ex, MIN_MAX_LENGTH - 1)


def test_every_bad_value_is_one_line_and_exit_code_2(split_files, tmp_path, capsys):
    for i, (extra, message) in enumerate(USAGE_ERRORS.items()):
        out = tmp_path / f"run{i}"
        code, err = run_main(argv(split_files, out, *extra), capsys)
        assert (code, err) == (2, [f"error: {message}"]), (extra, code, err)
        assert not out.exists(), extra  # refused before anything was written
    with capsys.disabled():
        print(f"\n{len(USAGE_ERRORS)} bad values refused with exit 2 and one line, e.g.\n  "
              + "\n  ".join(f"{' '.join(k)}: error: {v}" for k, v in list(USAGE_ERRORS.items())[::8]))


def test_wrong_runs_and_bad_files(split_files, tmp_path, capsys):
    """Usage: --resume with nothing to resume or other settings, a new run over checkpoints, a
    --max-length the model cannot hold (exit 2). Data: files missing or malformed (exit 1)."""
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"version": "1.1", "data": ')
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**asdict(parse_args(argv(split_files, run))[0]), "lr": 0.1}))
    (run / "checkpoint-000001").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    cases = [
        (argv(split_files, tmp_path / "nothing", "--resume"), 2,
         f"error: {tmp_path / 'nothing'}: nothing to resume (no config.json of a run there); leave out --resume "
         f"to start one"),
        (argv(split_files, run, "--resume", "--lr", "0.2"), 2, None),
        (argv(split_files, run), 2, f"error: {run} already holds checkpoints: pass --resume to continue, or another "
                                    f"--output-dir"),
        (argv(split_files, tmp_path / "long", "--max-length", "300"), 2,
         "error: --max-length must be at most the base model's n_positions = 256, not 300"),
        (argv(split_files, tmp_path / "a", "--train-file", str(tmp_path / "missing.json")), 1,
         f"error: {tmp_path / 'missing.json'}: file not found"),
        (argv(split_files, tmp_path / "b", "--eval-file", str(bad_json)), 1,
         f"error: {bad_json}: not valid JSON (line 1, column 28: Expecting value)"),
        (argv(split_files, tmp_path / "c", "--random-base", "", "--model", str(tmp_path / "no_model")), 1, None),
        (argv(split_files, broken, "--resume"), 1, None),
    ]
    for args, code_expected, message in cases:
        code, err = run_main(args, capsys)
        with capsys.disabled():
            print(f"\nexit {code}: {err[-1]}")
        assert code == code_expected and err[-1].startswith("error: "), (args, code, err)
        assert not any("Traceback" in line for line in err)
        if message:
            assert err[-1] == message
    assert run_main(cases[1][0], capsys)[1][-1] == (f"error: {run / 'config.json'}: --resume with different "
                                                    f"settings (lr: 0.1 -> 0.2)")
    assert f"{tmp_path / 'no_model'}: no such folder" in run_main(cases[6][0], capsys)[1][-1]
    assert f"{broken / 'config.json'}: cannot be read as this run's settings" in run_main(cases[7][0], capsys)[1][-1]


def cli(*args, script="train_default_lora.py"):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_exit_codes_of_real_processes(split_files, tmp_path):
    cases = [
        (cli(*argv(split_files, tmp_path / "x", "--dropout", "1.5")), 2, "error: --dropout must be in [0, 1), not 1.5"),
        (cli(*argv(split_files, tmp_path / "y", "--train-file", tmp_path / "none.json")), 1,
         f"error: {tmp_path / 'none.json'}: file not found"),
        (cli("--lr", "abc"), 2, "train_default_lora.py: error: argument --learning-rate/--lr/--learning_rate: invalid float value: 'abc'"),
        (cli("--top-p", "1.5", script="test_generation.py"), 2,
         "test_generation.py: error: --top-p must be in (0, 1], not 1.5"),
        (cli("--max-length", "12", "--max-new-tokens", "4", script="test_generation.py"), 2,
         "test_generation.py: error: --max-length must be at least 10 (the shortest prompt) + --max-new-tokens = 14, "
         "not 12"),
    ]
    for r, code, last in cases:
        lines = r.stderr.strip().splitlines()
        print(f"\nexit {r.returncode}: {lines[-1]}")
        assert r.returncode == code and lines[-1] == last and "Traceback" not in r.stderr, r.stderr


def test_an_adapter_for_another_base_is_a_data_error(tmp_path):
    """test_generation.py with an adapter made for a wider GPT-2: exit 1, one line naming the file."""
    from GPT2_jittor import GPT, GPTConfig
    from LoRA import LoRAConfig
    from lora_models import LoRAGPT
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path / "base")
    LoRAGPT(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, n_positions=64)), LoRAConfig(r=4)).save_lora_weights(
        tmp_path / "adapter")
    r = cli("--model", tmp_path / "base", "--adapter", tmp_path / "adapter", "--context", "a b", "--question", "b?",
            "--max-length", "60", script="test_generation.py")
    print(f"\nexit {r.returncode}: {r.stderr.strip()}")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: {tmp_path / 'adapter' / 'adapter_model.safetensors'}: ")
    assert "the adapter was made for a different base model (n_embd=32) or rank" in r.stderr
