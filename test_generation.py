"""Answer SQuAD v1.1 questions with GPT-2 (+ a LoRA adapter) in Jittor, and score them.

    python test_generation.py                                   # the newest run under checkpoints/, a few questions
    python test_generation.py --interactive                     # paste a context, ask questions, watch the answers
    python test_generation.py --model gpt2-medium --adapter none --context "..." --question "..."
    python test_generation.py --adapter checkpoints/demo/adapter \\
        --context "The Velka River rises in the Orn hills." --question "Where does the Velka rise?"
    python test_generation.py --adapter ADAPTER_DIR --data data/dev-v1.1.json --limit 200
    python test_generation.py --model MERGED_DIR --data data/dev-v1.1.json --output dev_predictions.json
    python model_utils.py evaluate data/dev-v1.1.json predictions.json   # re-score a file

With neither --model nor --adapter, the newest finished run under checkpoints/ answers
(its adapter/ and the base model its config.json names; it says which), else the untuned
base model gpt2. --model is a GPT-2 folder (config.json + model.safetensors), a hub id
(gpt2-medium, openai-community/gpt2-large, ...: model_utils.resolve_model) or a merged export
(LoRAGPT.export_merged). --adapter is a LoRA adapter folder in PEFT's format, saved by us or
by PEFT (any target selection, modules_to_save); in a folder of several adapters (PEFT's
layout: "default" at its root, others in subfolders named after them) --adapter-name picks
one; `--adapter none`: the base model alone.

The prompt is the training prompt, "Context: ...\\nQuestion: ...\\nAnswer:"
(gpt2_lora_dataset.encode_prompt, which cuts a long context to fit --max-length); the
answer is the generated text up to the first <|endoftext|> or newline. Predictions are
written in the official format {question_id: answer} and scored with the official
SQuAD v1.1 metric (model_utils.evaluate_squad).
"""
import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

import numpy as np

from gpt2_lora_dataset import SquadExample, encode_prompt, load_squad_json, read_squad
from backend.mixed_precision import DEVICES, PRECISIONS
from model_utils import EOS_ID, atomic_write_json, evaluate_squad, load_tokenizer, resolve_model
from training.train_config import MIN_PROMPT_TOKENS

SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "squad_sample.json"  # the project's own questions
RUNS = Path("checkpoints")  # where training runs write (train_config.TrainConfig.output_dir)


# ----------------------------------------------------------------------------
# Loading

def load_model(model_dir="gpt2", adapter_dir=None, device="auto", precision="auto", revision=None,
               adapter_name="default"):
    """(model, tokenizer): GPT-2 from `model_dir`, with the LoRA adapter in `adapter_dir` if given
    (adapter_name: which one of a multi-adapter folder), on `device` in `precision` (runtime.prepare).

    Errors (missing folder, bad checkpoint, adapter made for another model) are
    FileNotFoundError / ValueError / RuntimeError whose message names the file.
    """
    # Jittor is imported here, not at the top, so that --help and the data checks stay fast.
    from backend import runtime
    from GPT2_jittor import GPT
    from lora_models import LoRAGPT
    model_dir = resolve_model(model_dir, revision)
    model = GPT.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = LoRAGPT.from_pretrained(model, adapter_dir, dropout=0.0, adapter_name=adapter_name)
    return runtime.prepare(model, device, precision).eval(), load_tokenizer(model_dir)


# ----------------------------------------------------------------------------
# Generation

def left_pad(prompts, pad_id=EOS_ID):
    """(ids, attention_mask), both (B, T) int32, prompts aligned on the RIGHT.

    generate() appends new tokens at the right end of every row, so the prompts must end
    in the same column; the mask keeps the pads out of attention and out of positions.
    """
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), T), dtype=np.int32)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


def decode_answer(tokenizer, new_ids):
    """The answer in generated token ids: up to the first <|endoftext|>, then up to the first newline.

    Training ends every answer with <|endoftext|>; a model that has not learnt that (or an
    untrained one) tends to go on with a new "Question:" line instead, hence the newline cut.
    """
    new_ids = list(new_ids)
    if EOS_ID in new_ids:
        new_ids = new_ids[:new_ids.index(EOS_ID)]
    return tokenizer.decode(new_ids).split("\n")[0].strip()


def answer_questions(model, tokenizer, examples, batch_size=8, max_new_tokens=32, max_length=512,
                     temperature=0.0, top_k=None, top_p=None, seed=None, progress=True, shard=(0, 1)):
    """{example.id: answer text} for SquadExample-like objects (.id, .context, .question).

    Greedy by default. Prompts are sorted by length before batching, so a batch holds
    similar lengths and little left padding (with greedy decoding the answers do not
    depend on the batching). max_length is capped at the model's n_positions. The model
    is run in eval mode (no dropout) and put back in training mode afterwards if it was.
    shard=(i, n): answer only batches i, i + n, ... of those batches (process i of n; the
    union over i is the whole answer, batch for batch).
    """
    from tqdm import tqdm
    max_length = min(max_length, model.config.n_positions)
    prompts, n_cut = [], 0
    for ex in examples:
        ids, truncated = encode_prompt(tokenizer, ex.context, ex.question, max_length, max_new_tokens)
        prompts.append(ids)
        n_cut += truncated
    if n_cut and progress:
        print(f"{n_cut} of {len(examples)} contexts cut to fit max_length={max_length} "
              f"(prompt + answer tokens)", file=sys.stderr)
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))  # stable: ties keep file order
    base = getattr(model, "model", model)  # LoRAGPT wraps the GPT whose modules hold the flag
    was_training = getattr(base, "is_train", False)
    model.eval()
    answers = {}
    try:
        for b in tqdm(range(shard[0], math.ceil(len(order) / batch_size), shard[1]), desc="generating",
                      unit="batch", disable=not progress):
            batch = order[b * batch_size:(b + 1) * batch_size]
            ids, mask = left_pad([prompts[i] for i in batch])
            # one seed per batch: batches must not all replay the same random stream
            out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 eos_token_id=EOS_ID, attention_mask=mask,
                                 seed=None if seed is None else seed + b)
            for i, row in zip(batch, out[:, ids.shape[1]:]):
                answers[examples[i].id] = decode_answer(tokenizer, row)
    finally:
        if was_training:
            model.train()
    return {ex.id: answers[ex.id] for ex in examples if ex.id in answers}  # back in the caller's order


# ----------------------------------------------------------------------------
# Data

def score_run(model, tokenizer, cfg, data, out, save=atomic_write_json, answer=None):
    """SQuAD EM/F1 of a training run's model (a train_config.TrainConfig and a
    gpt2_lora_dataset.Data) by greedy generation on its first cfg.gen_eval_examples held-out
    and cfg.train_gen_eval_examples training questions; writes predictions.json,
    predictions_train.json and scores.json into `out` with save(path, obj).
    answer(examples) -> {id: answer}, or None where nothing is to be written (an MPI rank
    other than 0); default: answer_questions with the run's settings."""
    if answer is None:
        def answer(examples):
            return answer_questions(model, tokenizer, examples, batch_size=cfg.batch_size,
                                    max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length)
    scores = {}
    for name, examples, path, n in (("heldout", data.eval_examples, data.eval_path, cfg.gen_eval_examples),
                                    ("train", data.train_examples, data.train_path, cfg.train_gen_eval_examples)):
        if not n:
            continue
        preds = answer(examples[:n])
        if preds is None:
            continue
        s = evaluate_squad(subset_dataset(load_squad_json(path), set(preds)), preds)
        scores[name] = {**s, "questions": len(preds)}
        save(out / ("predictions.json" if name == "heldout" else "predictions_train.json"), preds)
        print(f"{name} SQuAD EM {s['exact_match']:.2f}  F1 {s['f1']:.2f}  on {len(preds)} questions", file=sys.stderr)
    if scores:
        save(out / "scores.json", scores)


def subset_dataset(data, ids):
    """The raw SQuAD `data` list keeping only the questions in `ids` (and the articles and
    paragraphs that still hold one), so that evaluate_squad scores exactly those questions."""
    ids = set(ids)
    out = []
    for article in data:
        paragraphs = []
        for para in article["paragraphs"]:
            qas = [qa for qa in para["qas"] if qa["id"] in ids]
            if qas:
                paragraphs.append({**para, "qas": qas})
        if paragraphs:
            out.append({**article, "paragraphs": paragraphs})
    return out


def demo_examples(path=SAMPLE_DATA, n=4):
    """The first question of each of the first n articles of the project's sample file."""
    examples, _ = read_squad(path)
    picked, titles = [], set()
    for ex in examples:
        if ex.title not in titles:
            titles.add(ex.title)
            picked.append(ex)
    return picked[:n]


def newest_run(root=RUNS):
    """(base model, revision, adapter folder, is a random-initialised base) of the newest
    finished run under `root` (the one whose final adapter/ was written last), or None.

    The base is the run's own base_model/ (--random-base, --demo), else the --model (and
    --revision) its config.json names."""
    adapters = [a for a in Path(root).glob("*/adapter") if (a / "adapter_model.safetensors").is_file()]
    if not adapters:
        return None
    adapter = max(adapters, key=lambda a: (a / "adapter_model.safetensors").stat().st_mtime)
    if (adapter.parent / "base_model" / "config.json").is_file():
        return adapter.parent / "base_model", None, adapter, True
    try:
        cfg = json.loads((adapter.parent / "config.json").read_text(encoding="utf-8"))
        return cfg.get("model", "gpt2"), cfg.get("revision"), adapter, False
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{adapter.parent / 'config.json'}: cannot tell the run's base model ({e})") from None


def interactive(model, tokenizer, gen, lines=sys.stdin, out=sys.stdout):
    """Paste a context (ended by an empty line), then ask questions one after another, each
    answer printed token by token as it is generated (KV cache; greedy or sampled as `gen`
    says). An empty question asks for a new context; Ctrl-D (end of input) leaves."""
    lines = iter(lines)

    def ask(prompt):
        print(prompt, end="", file=out, flush=True)
        return next(lines, None)

    while True:
        print("Paste a context, then an empty line (Ctrl-D: quit):", file=out, flush=True)
        paragraph = []
        while (line := next(lines, None)) is not None and line.strip():
            paragraph.append(line.rstrip("\n"))
        if not paragraph:
            return
        context = "\n".join(paragraph)
        while (question := ask("question (empty: new context)> ")) is not None and question.strip():
            stream_answer(model, tokenizer, context, question.strip(), gen, out)
        if question is None:
            print(file=out)
            return


def stream_answer(model, tokenizer, context, question, gen, out):
    """One answer, printed as generated; the text is decode_answer's (up to the first
    <|endoftext|> or newline), so equal to answer_questions' for the same settings."""
    ids, _ = encode_prompt(tokenizer, context, question, gen["max_length"], gen["max_new_tokens"])
    new, shown = [], ""

    def on_token(nxt):
        nonlocal shown
        new.append(int(nxt[0]))
        text = decode_answer(tokenizer, new)
        raw = tokenizer.decode(new)
        if text.startswith(shown):  # a token can end in half a character: print only what is whole
            print(text[len(shown):] if not text.endswith("\ufffd") else "", end="", file=out, flush=True)
            shown = text if not text.endswith("\ufffd") else shown
        return EOS_ID in new or "\n" in raw  # the answer is over (decode_answer cuts there)
    model.generate(np.array([ids], dtype=np.int32), gen["max_new_tokens"], temperature=gen["temperature"],
                   top_k=gen["top_k"], top_p=gen["top_p"], eos_token_id=EOS_ID, seed=gen["seed"], on_token=on_token)
    print(decode_answer(tokenizer, new)[len(shown):], file=out, flush=True)


def snippet(text, n=160):
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " ..."


def build_parser():
    from training.train_config import HelpFormatter
    parser = argparse.ArgumentParser(description="Answer SQuAD v1.1 questions with GPT-2 (+ LoRA) and score them.",
                                     formatter_class=HelpFormatter, allow_abbrev=False)
    add = parser.add_argument_group("model").add_argument
    add("--model", default=None,
        help="GPT-2 folder (config.json + model.safetensors), hub id (gpt2-medium, ...) or merged export "
             "(default: the newest finished run's base model, else gpt2)")
    add("--revision", default=None, help="hub revision of --model: branch, tag or commit (default: main)")
    add("--adapter", default=None, help="LoRA adapter folder in PEFT's format (ours or PEFT's); 'none': the base "
                                        "model alone (default: the newest finished run's adapter/ under checkpoints/)")
    add("--adapter-name", default="default",
        help="in a folder of several adapters (PEFT's layout), the one to use: its subfolder's name "
             "(default: the one at the folder's root)")
    add = parser.add_argument_group("questions").add_argument
    add("--context", default=None, help="answer one question about this text (with --question)")
    add("--question", default=None, help="the question about --context")
    add("--interactive", action="store_true", help="paste a context, ask questions one after another, answers "
                                                   "printed as they are generated; Ctrl-D quits")
    add("--data", default=None, help="SQuAD v1.1 JSON file: answer all its questions and score them")
    add("--limit", type=int, default=None, help="answer only the first N questions of --data (scored over those "
                                                "N only; default: all)")
    add("--output", default="predictions.json", help="where --data writes its predictions {question_id: answer} "
                                                     "(default: predictions.json)")
    add("--scores", default=None, help="where --data writes EM/F1 as JSON (default: --output with suffix .scores.json)")
    add = parser.add_argument_group("generation").add_argument
    add("--batch-size", type=int, default=8, help="questions generated together (default: 8)")
    add("--max-new-tokens", type=int, default=32, help="longest answer, in tokens (default: 32)")
    add("--max-length", type=int, default=512,
        help="prompt + answer tokens; longer contexts are cut (keeping their start) (default: 512)")
    add("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (default: 0)")
    add("--top-k", type=int, default=None, help="sample only among the k most likely tokens (default: all)")
    add("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass (default: 1)")
    add("--seed", type=int, default=None, help="seed for sampling (temperature > 0) (default: none, random)")
    add = parser.add_argument_group("device and output").add_argument
    add("--device", choices=DEVICES, default="auto", metavar="{" + ",".join(DEVICES) + "}",
        help="auto (CUDA when a usable GPU is there), cpu or cuda (default: auto)")
    add("--precision", choices=PRECISIONS, default="auto", metavar="{" + ",".join(PRECISIONS) + "}",
        help="fp32, tf32 (CUDA), bf16 or fp16 (frozen weights in half); auto: fp32 on the CPU, bf16 on CUDA "
             "(default: auto)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--debug", action="store_true", help="show the full traceback of an error (or set GPT2_LORA_DEBUG=1)")
    return parser


def fail(message):
    """One line on stderr and exit status 1 (a data error: a missing or malformed model, adapter
    or data file; the library's errors already name the file); with --debug the traceback too.
    Usage errors exit 2 (argparse)."""
    if DEBUG and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


DEBUG = os.environ.get("GPT2_LORA_DEBUG") == "1"

if __name__ == "__main__":
    parser = build_parser()
    args = parser.parse_args()
    DEBUG = DEBUG or args.debug
    if (args.context is None) != (args.question is None):
        parser.error("--context and --question go together")
    if args.data is not None and args.context is not None:
        parser.error("give either --data or --context/--question, not both")
    if args.interactive and (args.data is not None or args.context is not None):
        parser.error("--interactive reads its contexts and questions from the terminal: no --data or --context")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size and --max-new-tokens must be at least 1")
    if args.max_length < MIN_PROMPT_TOKENS + args.max_new_tokens:
        parser.error(f"--max-length must be at least {MIN_PROMPT_TOKENS} (the shortest prompt) + --max-new-tokens "
                     f"= {MIN_PROMPT_TOKENS + args.max_new_tokens}, not {args.max_length}")
    if not (args.temperature >= 0 and np.isfinite(args.temperature)):
        parser.error(f"--temperature must be a finite number >= 0 (0 = greedy), not {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be at least 1, not {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 31:
        parser.error(f"--seed must be in [0, 2^31), not {args.seed}")
    from backend import runtime  # imports Jittor: after the checks that need none
    try:  # tf32 needs CUDA, --device cuda a usable GPU: usage errors (exit 2), before any file is read
        runtime.resolve(args.device, args.precision)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    demo_mode = args.data is None and args.context is None and not args.interactive
    gen = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    # --- which model: the newest finished run unless told otherwise ------------
    model_dir, revision, adapter_dir, random_demo = args.model, args.revision, args.adapter, False
    if model_dir is None and adapter_dir is None:
        try:
            found = newest_run()
        except ValueError as e:
            fail(e)
        if found is not None:
            model_dir, revision, adapter_dir, random_demo = found
            chosen = (f"answering with the newest finished run under {RUNS}/: {adapter_dir} on {model_dir} "
                      f"(--adapter none: the base model alone)")
        else:
            chosen = (f"no finished run under {RUNS}/ (train one: `make demo`, or train_default_lora.py): answering "
                      f"with the untuned base model gpt2")
    else:
        chosen = None
    if adapter_dir is not None and str(adapter_dir).lower() == "none":
        adapter_dir = None
    model_dir = "gpt2" if model_dir is None else model_dir

    # --- questions (checked before the model loads: a bad file fails fast) ---
    data = None
    try:
        if args.data is not None:
            examples, n_bad = read_squad(args.data, skip_bad=True)
            data = load_squad_json(args.data)
            if n_bad:
                print(f"{args.data}: {n_bad} malformed questions skipped; they are not answered", file=sys.stderr)
            n_all = len(examples)
            if args.limit is not None:
                examples = examples[:args.limit]
        elif args.context is not None:
            examples = [SquadExample("question", "", args.context, args.question, [], -1)]
        elif demo_mode:
            examples = demo_examples()
        model, tokenizer = load_model(model_dir, adapter_dir, args.device, args.precision, revision, args.adapter_name)
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"no model found: run `make demo` (writes checkpoints/demo) or pass --model; {e}"
             if args.model is None and adapter_dir is None and model_dir == "gpt2" else e)
    if chosen:  # said once the model is there (an error stays one line)
        print(chosen, file=sys.stderr)
    print(f"model: {model_dir}" + (f" + adapter {adapter_dir}" if adapter_dir else "") +
          (f" ({args.adapter_name})" if adapter_dir and args.adapter_name != "default" else "") +
          f"; {runtime.describe(model)}", file=sys.stderr)
    gen["max_length"] = min(args.max_length, model.config.n_positions)  # what answer_questions uses; recorded

    try:  # a question too long for --max-length, a failed write: one line, exit 1
        # --- one question ----------------------------------------------------------
        if args.context is not None:
            print(answer_questions(model, tokenizer, examples, progress=False, **gen)["question"])

        # --- talk to it -----------------------------------------------------------
        elif args.interactive:
            interactive(model, tokenizer, gen)

        # --- the demo questions ----------------------------------------------------
        elif demo_mode:
            if random_demo:
                print(f"Note: {model_dir} is the demo's random-initialised base model (no GPT-2 weights here), "
                      f"so these answers demonstrate the pipeline, not question answering.\n")
            answers = answer_questions(model, tokenizer, examples, progress=False, **gen)
            for ex in examples:
                print(f"context:  {snippet(ex.context)}")
                print(f"question: {ex.question}")
                print(f"model:    {answers[ex.id]!r}")
                print(f"gold:     {ex.answers}\n")

        # --- a whole file: predictions + official EM/F1 ----------------------------
        else:
            predictions = answer_questions(model, tokenizer, examples, progress=not args.no_progress, **gen)
            output = Path(args.output)
            scores_path = Path(args.scores) if args.scores else output.with_suffix(".scores.json")
            atomic_write_json(output, predictions)
            subset = len(examples) < n_all
            # With --limit, score over the answered questions only: over the whole file the
            # unanswered ones would count 0 and the numbers would mean nothing.
            scores = evaluate_squad(subset_dataset(data, predictions) if subset else data, predictions)
            report = {**scores, "questions": len(examples), "questions_in_file": n_all, "data": str(args.data),
                      "model": str(model_dir), "adapter": None if adapter_dir is None else str(adapter_dir),
                      "predictions": str(output), "runtime": runtime.describe(model), **gen}
            atomic_write_json(scores_path, report)
            if subset:
                print(f"scored over the first {len(examples)} of {n_all} questions only (--limit), not the whole file")
            print(json.dumps(scores))
            print(f"wrote {output} and {scores_path}", file=sys.stderr)
    except (OSError, ValueError, RuntimeError) as e:
        fail(e)
