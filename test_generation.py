"""Answer SQuAD v1.1 questions with GPT-2 (+ a LoRA adapter) in Jittor, and score them.

    python test_generation.py                                   # a few questions of data/squad_sample.json
    python test_generation.py --adapter checkpoints/demo/adapter \\
        --context "The Velka River rises in the Orn hills." --question "Where does the Velka rise?"
    python test_generation.py --adapter ADAPTER_DIR --data ../shared/data/squad/dev-v1.1.json --limit 200
    python test_generation.py --model MERGED_DIR --data ../shared/data/squad/dev-v1.1.json --output dev_predictions.json
    python model_utils.py evaluate ../shared/data/squad/dev-v1.1.json predictions.json   # re-score a file

--model is a GPT-2 folder (config.json + model.safetensors; default ./gpt2, downloaded
if missing and online), or a merged export (LoRAGPT.export_merged). --adapter is a LoRA
adapter folder in PEFT's format, saved by us or by PEFT (any target selection, modules_to_save);
in a folder of several adapters (PEFT's layout: "default" at its root, others in subfolders
named after them) --adapter-name picks one.

The prompt is the training prompt, "Context: ...\\nQuestion: ...\\nAnswer:"
(gpt2_lora_dataset.encode_prompt, which cuts a long context to fit --max-length); the
answer is the generated text up to the first <|endoftext|> or newline. Predictions are
written in the official format {question_id: answer} and scored with the official
SQuAD v1.1 metric (model_utils.evaluate_squad).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from gpt2_lora_dataset import SquadExample, encode_prompt, load_squad_json, read_squad
from backend.mixed_precision import DEVICES, PRECISIONS
from model_utils import EOS_ID, atomic_write_json, ensure_gpt2, evaluate_squad, load_tokenizer
from training.train_config import MIN_PROMPT_TOKENS

SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "squad_sample.json"  # the project's own questions
DEMO_BASE = Path("checkpoints/demo/base_model")   # written by `python train_default_lora.py --demo`
DEMO_ADAPTER = Path("checkpoints/demo/adapter")


# ----------------------------------------------------------------------------
# Loading

def load_model(model_dir="gpt2", adapter_dir=None, device="auto", precision="auto", adapter_name="default"):
    """(model, tokenizer): GPT-2 from `model_dir`, with the LoRA adapter in `adapter_dir` if given
    (adapter_name: which one of a multi-adapter folder), on `device` in `precision` (runtime.prepare).

    Errors (missing folder, bad checkpoint, adapter made for another model) are
    FileNotFoundError / ValueError / RuntimeError whose message names the file.
    """
    # Jittor is imported here, not at the top, so that --help and the data checks stay fast.
    from backend import runtime
    from GPT2_jittor import GPT
    from lora_models import LoRAGPT
    model_dir = ensure_gpt2(model_dir)
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


def default_model():
    """(model dir, adapter dir, is the demo's random model) when no --model is given, or None."""
    if (Path("gpt2") / "config.json").is_file():  # not just the folder: a failed download leaves it empty
        return Path("gpt2"), None, False
    if (DEMO_BASE / "config.json").is_file() and DEMO_ADAPTER.is_dir():
        return DEMO_BASE, DEMO_ADAPTER, True
    return None


def fail(message):
    """One line on stderr and exit status 1 (a data error: a missing or malformed model, adapter
    or data file; the library's errors already name the file). Usage errors exit 2 (argparse)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def snippet(text, n=160):
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " ..."


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Answer SQuAD v1.1 questions with GPT-2 (+ LoRA) and score them.")
    parser.add_argument("--model", default=None,
                        help="GPT-2 folder (config.json + model.safetensors) or a merged export; default ./gpt2 "
                             "(downloaded if missing); with no question given and no ./gpt2, the model of "
                             "`make demo` in checkpoints/demo")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder in PEFT's format (ours or PEFT's)")
    parser.add_argument("--adapter-name", default="default",
                        help="in a folder of several adapters (PEFT's layout), the one to use: its subfolder's name "
                             "(default: the one at the folder's root)")
    parser.add_argument("--context", default=None, help="answer one question about this text (with --question)")
    parser.add_argument("--question", default=None, help="the question about --context")
    parser.add_argument("--data", default=None, help="SQuAD v1.1 JSON file: answer all its questions and score them")
    parser.add_argument("--limit", type=int, default=None,
                        help="answer only the first N questions of --data (scored over those N only)")
    parser.add_argument("--output", default="predictions.json",
                        help="where --data writes its predictions {question_id: answer}")
    parser.add_argument("--scores", default=None,
                        help="where --data writes EM/F1 as JSON; default: --output with suffix .scores.json")
    parser.add_argument("--batch-size", type=int, default=8, help="questions generated together")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens")
    parser.add_argument("--max-length", type=int, default=512,
                        help="prompt + answer tokens; longer contexts are cut (keeping their start)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto (CUDA when a usable GPU is there), cpu or cuda")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="fp32, tf32 (CUDA), bf16 or fp16 (frozen weights in half); auto: fp32 on the CPU, "
                             "bf16 on CUDA")
    args = parser.parse_args()
    if (args.context is None) != (args.question is None):
        parser.error("--context and --question go together")
    if args.data is not None and args.context is not None:
        parser.error("give either --data or --context/--question, not both")
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
    demo_mode = args.data is None and args.context is None
    gen = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    # --- which model ---------------------------------------------------------
    model_dir, adapter_dir, random_demo = args.model, args.adapter, False
    if model_dir is None and adapter_dir is None and demo_mode:
        found = default_model()
        if found is None:
            fail("no model found: run `make demo` (writes checkpoints/demo), put GPT-2 in ./gpt2, "
                 "or pass --model DIR")
        model_dir, adapter_dir, random_demo = found
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
        else:
            examples = demo_examples()
        model, tokenizer = load_model(model_dir, adapter_dir, args.device, args.precision, args.adapter_name)
    except (OSError, ValueError, RuntimeError) as e:
        fail(e)
    print(f"model: {model_dir}" + (f" + adapter {adapter_dir}" if adapter_dir else "") +
          (f" ({args.adapter_name})" if adapter_dir and args.adapter_name != "default" else "") +
          f"; {runtime.describe(model)}", file=sys.stderr)
    gen["max_length"] = min(args.max_length, model.config.n_positions)  # what answer_questions uses; recorded

    try:  # a question too long for --max-length, a failed write: one line, exit 1
        # --- one question ----------------------------------------------------------
        if args.context is not None:
            print(answer_questions(model, tokenizer, examples, progress=False, **gen)["question"])

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
