"""Models by name: hub ids resolved by huggingface_hub itself, offline, from a hub-layout cache.

No model hub can be reached here, so the test writes the cache `hf download` would leave
(models--<org>--<name>/{blobs, refs/main, snapshots/<commit>}) with random-initialised
checkpoints that transformers writes, under two names and two sizes, and runs every
resolution in a fresh process with HF_HOME pointing there and HF_HUB_OFFLINE=1 (the
variables huggingface_hub reads when it is imported). No mocks.
"""
import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (hub_model_files, make_hf_model, measured, norm_err, save_hf_model, tensorboard_scalars,
                     write_hub_cache, write_sample_split)

ROOT = Path(__file__).resolve().parents[1]
# Two names, two sizes (tiny, so that the test is fast; the names are what a user types).
HUB_MODELS = {"gpt2": dict(seed=1), "gpt2-medium": dict(seed=2, n_layer=2),  # C=64: no new kernels to compile
              "openai-community/gpt2-large": dict(seed=3, n_layer=1)}
OTHER_COMMIT = "1" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(HF_HOME, {repo id: transformers model}) of a hand-written hub cache."""
    root = tmp_path_factory.mktemp("hub")
    cache, models = root / "hf" / "hub", {}
    for repo_id, kw in HUB_MODELS.items():
        models[repo_id] = make_hf_model("tiny", **kw)
        folder = save_hf_model(models[repo_id], root / repo_id.replace("/", "_"))
        write_hub_cache(cache, repo_id, hub_model_files(folder))
    # a second revision of gpt2, reachable by its commit only: the same files, another n_positions
    folder = save_hf_model(make_hf_model("tiny", seed=1, n_positions=64), root / "gpt2_rev")
    write_hub_cache(cache, "gpt2", hub_model_files(folder), commit=OTHER_COMMIT, ref=None)
    # a repo of another architecture: its config.json is enough to refuse it
    (root / "llama.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    write_hub_cache(cache, "some-org/tiny-llama", {"config.json": root / "llama.json"})
    return root / "hf", models


def offline_env(hf_home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", **extra}


def run_python(code, env, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_hub_ids_load_from_the_cache_and_equal_transformers(hub, tmp_path):
    """GPT.from_pretrained("gpt2") and ("openai-community/gpt2-medium") through huggingface_hub's
    offline resolution: the right files (each shape), logits equal to transformers' on them."""
    hf_home, models = hub
    ids = np.random.default_rng(0).integers(0, 50257, size=(2, 16))
    np.save(tmp_path / "ids.npy", ids)
    code = ("import numpy as np\n"
            "from GPT2_jittor import GPT\nfrom backend.jittor_env import jt\n"
            f"ids = np.load({str(tmp_path / 'ids.npy')!r})\nout = {{}}\n"
            f"for name in {list(HUB_MODELS)!r}:\n"
            "    m = GPT.from_pretrained(name).eval()\n"
            "    out[name.replace('/', '_')] = m(jt.array(ids.astype(np.int32))).numpy()\n"
            "    print(name, m.config.n_layer, m.config.n_embd)\n"
            f"np.savez({str(tmp_path / 'logits.npz')!r}, **out)\n")
    r = run_python(code, offline_env(hf_home))
    assert r.returncode == 0, r.stderr
    print("\n" + r.stdout.strip())
    ours = np.load(tmp_path / "logits.npz")
    for repo_id, hf in models.items():
        assert f"{repo_id} {hf.config.n_layer} {hf.config.n_embd}" in r.stdout
        with torch.no_grad():  # the float64 yardstick, on the weights of the cached checkpoint
            ref = copy.deepcopy(hf).double()(torch.tensor(ids)).logits.numpy()
        err = norm_err(ours[repo_id.replace("/", "_")], ref)
        measured(f"hub id {repo_id} (offline cache): logits vs transformers float64, norm error {err:.1e}")
        assert err < 1e-5


def test_revision_missing_model_and_other_model_types(hub):
    """--revision picks a snapshot by commit; a name that is not cached is a clear offline error;
    a repo of another model_type is refused before its weights are fetched."""
    hf_home, _ = hub
    code = ("import json, sys\nfrom model_utils import resolve_model\n"
            "for name, rev in [('gpt2', None), ('gpt2', sys.argv[1])]:\n"
            "    print(json.load(open(resolve_model(name, rev) / 'config.json'))['n_positions'])\n"
            "for name in ('gpt2-large', 'some-org/tiny-llama'):\n"
            "    try:\n        resolve_model(name)\n"
            "    except (OSError, ValueError) as e:\n        print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code, OTHER_COMMIT], cwd=ROOT, env=offline_env(hf_home),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    print("\n" + "\n".join(lines))
    assert lines[:2] == ["128", "64"]
    assert lines[2].startswith(f"FileNotFoundError gpt2-large: not in the Hugging Face cache ({hf_home / 'hub'}) "
                               f"and HF_HUB_OFFLINE=1 is set")
    assert "hf download gpt2-large" in lines[2] and "--model DIR" in lines[2]
    assert lines[3].startswith("ValueError some-org/tiny-llama: model_type is 'llama', not 'gpt2'")


def test_local_folder_wins_and_missing_paths_are_not_hub_ids(tmp_path):
    from model_utils import is_hub_id, resolve_model
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text("{}")
    assert resolve_model(tmp_path / "gpt2") == tmp_path / "gpt2"
    assert [is_hub_id(n) for n in ("gpt2-medium", "openai-community/gpt2-large", "./x", "/a/b", "a/b/c")] == \
        [True, True, False, False, False]


@pytest.mark.slow
def test_seed_commands_with_a_hub_model(hub, tmp_path):
    """On a clean folder: train with --model gpt2-medium from the cache (the size line, the time
    to finish, TensorBoard), then the seed's bare `python test_generation.py` answers with that
    run, and --interactive streams answers to piped questions equal to the library's."""
    hf_home, models = hub
    train_file, eval_file = write_sample_split(tmp_path)
    env = offline_env(hf_home)
    r = subprocess.run([sys.executable, str(ROOT / "train_default_lora.py"), "--model", "gpt2-medium",
                        "--train-file", train_file, "--eval-file", eval_file, "--output-dir", "checkpoints/med",
                        "--max-steps", "6", "--eval-steps", "3", "--eval-examples", "4", "--gen-eval-examples", "2",
                        "--max-length", "128", "--max-new-tokens", "6", "--lora_r", "4", "--learning-rate", "3e-3",
                        "--report-to", "tensorboard"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "checkpoints" / "med"
    size = next(line for line in r.stderr.splitlines() if line.startswith("this run: "))
    eta = next(line for line in r.stderr.splitlines() if "s per step over steps 2-5" in line)
    print(f"\n{size}\n{eta}")
    n_train = int(size.split()[2].replace(",", ""))
    # evaluations at steps 0, 3, 6; one checkpoint, at the end (--save-steps 100)
    assert "= 6 optimizer steps" in size and "3 held-out evaluations" in size and "1 checkpoint(s)" in size
    assert n_train > 6 and "the 1 steps left take about" in eta
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "gpt2-medium" and adapter_cfg["r"] == 4

    # TensorBoard's own reader: one point per step, the values of metrics.jsonl / val_loss.txt
    scalars = tensorboard_scalars(out / "runs")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 7))
    assert np.allclose([v for _, v in scalars["train/loss"]], [m["loss"] for m in metrics], rtol=1e-5)
    assert [s for s, _ in scalars["eval/loss"]] == [0, 3, 6]
    assert {"train/learning_rate", "train/tokens_per_s", "eval/exact_match", "eval/f1"} <= set(scalars)

    # the seed's bare command: the newest finished run, said so
    r = subprocess.run([sys.executable, str(ROOT / "test_generation.py"), "--max-new-tokens", "4"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "answering with the newest finished run under checkpoints/: checkpoints/med/adapter on gpt2-medium" \
        in r.stderr
    assert r.stdout.count("question: ") == 4

    # no finished run: the untuned base gpt2, from the cache, said so
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "test_generation.py"), "--max-new-tokens", "4"],
                       cwd=tmp_path / "empty", env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no finished run under checkpoints/" in r.stderr and "untuned base model gpt2" in r.stderr
    assert r.stdout.count("question: ") == 4

    # --interactive with piped input: two questions, a new context, one more, then end of input
    from gpt2_lora_dataset import read_squad
    from test_generation import answer_questions, load_model
    exs = read_squad(train_file)[0]
    asked = [(exs[0].context, exs[0].question), (exs[0].context, exs[1].question), (exs[5].context, exs[5].question)]
    stdin = f"{asked[0][0]}\n\n{asked[0][1]}\n{asked[1][1]}\n\n{asked[2][0]}\n\n{asked[2][1]}\n"
    r = subprocess.run([sys.executable, str(ROOT / "test_generation.py"), "--interactive", "--max-new-tokens", "6",
                        "--max-length", "128"], cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # what follows each question prompt up to the newline; an empty question (a new context) prints none
    streamed = [part.split("\n")[0] for part in r.stdout.split("question (empty: new context)> ")[1:]
                if not part.startswith("Paste a context")]
    model, tok = load_model(str(hf_home / "hub" / "models--gpt2-medium" / "snapshots" / ("0" * 40)), out / "adapter")
    qs = [type("Q", (), dict(id=str(i), context=c, question=q)) for i, (c, q) in enumerate(asked)]
    ref = answer_questions(model, tok, qs, max_new_tokens=6, max_length=128, progress=False)
    print(f"interactive answers {streamed[:3]}; answer_questions {list(ref.values())}")
    assert streamed[:3] == list(ref.values()) and r.stdout.count("Paste a context") == 2


class Mirror:
    """A hub mirror on 127.0.0.1 that answers huggingface_hub's HEAD and GET requests for
    /<repo>/resolve/<revision>/<file> from {repo: {name: bytes}}, as the hub does (X-Repo-Commit,
    ETag, Content-Length; 404 with X-Error-Code EntryNotFound for a missing file). Its private
    repos answer only a request that carries `Authorization: Bearer <token>` (else 401, as
    the hub answers a private repo without a token); every request is recorded."""

    def __init__(self, repos, private=(), token=None, commit="2" * 40):
        import hashlib
        import http.server
        import re
        import threading
        self.requests = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, body):
                m = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", self.path)
                mirror.requests.append((self.command, self.path, self.headers.get("Authorization")))
                repo, name = (m.group(1), m.group(3)) if m else (None, None)
                if repo not in repos or repo in private and self.headers.get("Authorization") != f"Bearer {token}":
                    self.send_response(401 if repo in private else 404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = repos[repo].get(name)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", commit)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self.answer(False)

            def do_GET(self):
                self.answer(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_hf_endpoint_and_hf_token_are_honoured(tmp_path):
    """Online through a mirror (HF_ENDPOINT) into a fresh cache (HF_HOME): a private repo is
    fetched with HF_TOKEN sent on every request, and refused without it with an error naming
    the repo and the mirror. huggingface_hub's own code does the requests."""
    folder = save_hf_model(make_hf_model("tiny", seed=4), tmp_path / "model")
    files = {name: Path(path).read_bytes() for name, path in hub_model_files(folder).items()}
    token = "hf_" + "t" * 30
    mirror = Mirror({"someone/private-gpt2": files}, private={"someone/private-gpt2"}, token=token)
    code = ("import json\nfrom model_utils import resolve_model\n"
            "try:\n    p = resolve_model('someone/private-gpt2')\n    print('OK', p)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    try:
        with_token = run_python(code, {**env, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": mirror.url,
                                       "HF_TOKEN": token})
        asked = list(mirror.requests)
        mirror.requests.clear()
        without = run_python(code, {**env, "HF_HOME": str(tmp_path / "hf2"), "HF_ENDPOINT": mirror.url})
    finally:
        mirror.close()
    assert with_token.returncode == 0 and without.returncode == 0, with_token.stderr + without.stderr
    print(f"\nwith HF_TOKEN: {with_token.stdout.strip()}\n  {len(asked)} requests to {mirror.url}: "
          + ", ".join(f"{m} {p.rsplit('/', 1)[1]}{'' if a else ' (no token)'}" for m, p, a in asked)
          + f"\nwithout: {without.stdout.strip()}")
    snapshot = Path(with_token.stdout.split(maxsplit=1)[1].strip())
    assert with_token.stdout.startswith("OK ") and snapshot.is_relative_to(tmp_path / "hf" / "hub")
    # what resolve_model asks for (config, weights, tokenizer files), byte for byte; the repo has
    # no tokenizer.json (a 404 that is no error) and generation_config.json is not needed
    wanted = {name: data for name, data in files.items() if name != "generation_config.json"}
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == wanted
    # (huggingface_hub 2.4 also asks the endpoint for /api/agent-harnesses, with no token)
    asked = [a for a in asked if "/resolve/" in a[1]]
    assert asked and all(auth == f"Bearer {token}" for _, _, auth in asked)
    assert {p.rsplit("/", 1)[1] for m, p, _ in asked if m == "GET"} == set(wanted)
    assert ("HEAD", "/someone/private-gpt2/resolve/main/tokenizer.json", f"Bearer {token}") in asked
    assert without.stdout.startswith(f"RuntimeError someone/private-gpt2: could not be fetched from the Hugging "
                                     f"Face hub ({mirror.url}); a private or gated repo needs a token: set "
                                     f"HF_TOKEN"), without.stdout


def test_a_sharded_repo_is_fetched_shard_by_shard(tmp_path):
    """A repo whose weights are model.safetensors.index.json + shards: resolve_model fetches the
    index and every shard it names (offline, from a hub-layout cache); the model loads them
    with the weights of the single file. A cache missing one shard is an error naming it."""
    hf = make_hf_model("tiny", seed=5)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    files = hub_model_files(tmp_path / "sharded")
    shards = sorted(n for n in files if n.startswith("model-"))
    write_hub_cache(tmp_path / "hf" / "hub", "someone/sharded-gpt2", files)
    write_hub_cache(tmp_path / "hf" / "hub", "someone/broken-gpt2", {k: v for k, v in files.items() if k != shards[0]})
    save_hf_model(hf, tmp_path / "one")
    code = ("import numpy as np\nfrom GPT2_jittor import GPT\nfrom model_utils import resolve_model\n"
            f"one = GPT.from_pretrained({str(tmp_path / 'one')!r})\n"
            "m = GPT.from_pretrained('someone/sharded-gpt2')\n"
            "print(sorted(p.name for p in resolve_model('someone/sharded-gpt2').iterdir()))\n"
            "print(max(float(np.abs(a.numpy() - b.numpy()).max()) for a, b in zip(one.parameters(), m.parameters())))\n"
            "try:\n    resolve_model('someone/broken-gpt2')\nexcept FileNotFoundError as e:\n    print(e)\n")
    r = run_python(code, offline_env(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-3000:]
    listed, diff, error = r.stdout.strip().splitlines()[-3:]
    print(f"\n{len(shards)} shards fetched; max |weight diff| to the single file {diff}\n{error}")
    assert ast.literal_eval(listed) == sorted(files) and float(diff) == 0.0  # the snapshot: what the cache holds
    assert error.startswith(f"someone/broken-gpt2: {shards[0]}, a shard that model.safetensors.index.json names, "
                            f"is missing")
