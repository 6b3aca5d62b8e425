"""Fine-tune GPT-2 with LoRA on SQuAD v1.1 in Jittor: loss on the answer tokens only.

Ready to paste:
    python train_default_lora.py --demo                       # offline, small random GPT-2, ~2 min
    python train_default_lora.py                              # ./gpt2 + official SQuAD (downloads when online)
    python train_default_lora.py --train-file ../shared/data/squad/dev-v1.1-train-split.json \
        --eval-file ../shared/data/squad/dev-v1.1-heldout-split.json --output-dir checkpoints/run1
    python train_default_lora.py --output-dir checkpoints/run1 --resume     # continue after a stop

Writes into --output-dir: config.json (this run's settings), train_loss.txt / val_loss.txt
(step<TAB>loss), metrics.jsonl, checkpoint-<step>/ (PEFT adapter + optimizer state, written
atomically), adapter/ (the final PEFT-format adapter), predictions.json and scores.json
(SQuAD EM/F1 by greedy generation), curves.png.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# ----------------------------------------------------------------------------
# Configuration: the seed's defaults (r=8, alpha=16, dropout 0.1, lr 5e-4, 3 epochs,
# c_attn/c_proj/c_fc, eval every 50 steps, save every 100) plus what a real run needs.


@dataclass
class TrainConfig:
    model: str = "gpt2"                 # base GPT-2 folder (downloaded into ./gpt2 when online)
    train_file: str = None              # SQuAD v1.1 JSON; default: data/train-v1.1.json (downloaded)
    eval_file: str = None               # SQuAD v1.1 JSON; default: data/dev-v1.1.json (downloaded)
    output_dir: str = "checkpoints/gpt2_lora_squad"
    # LoRA
    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    targets: str = "c_attn,c_proj,c_fc"
    qv_only: bool = False               # c_attn adapters on q and v only (the seed's option)
    init: str = "kaiming"
    rslora: bool = False
    # optimisation
    lr: float = 5e-4
    epochs: int = 3
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 0               # linear warm-up from 0
    schedule: str = "cosine"            # after warm-up: cosine or linear decay to 0, or constant
    weight_decay: float = 0.01
    clip: float = 1.0                   # max global gradient norm; 0 = off
    max_steps: int = 0                  # 0 = run all epochs
    max_train_examples: int = 0         # 0 = all; the seed trained on a 100-example subset
    seed: int = 42
    # data
    max_length: int = 512
    loss_on: str = "answer"             # "answer" (ours) or "all" (the seed: every token)
    bucket: bool = False                # group similar lengths into a batch (less padding)
    skip_bad: bool = False
    # evaluation and checkpoints
    eval_interval: int = 50
    eval_examples: int = 200            # held-out examples for the validation loss
    save_interval: int = 100
    keep_checkpoints: int = 3           # older checkpoint-* folders are deleted; 0 = keep all
    gen_eval_examples: int = 200        # held-out questions answered at the end for EM/F1; 0 = skip
    train_gen_eval_examples: int = 0    # training questions answered at the end (memorisation check)
    max_new_tokens: int = 32
    random_base: str = None             # e.g. "n_layer=4,n_head=4,n_embd=256": a random GPT-2 instead of --model
    demo: bool = False


HELP = {
    "model": "base GPT-2 folder with config.json + model.safetensors; 'gpt2' downloads it into ./gpt2 when online",
    "train_file": "SQuAD v1.1 JSON to train on (default: data/train-v1.1.json, downloaded when online)",
    "eval_file": "SQuAD v1.1 JSON for held-out loss and EM/F1 (default: data/dev-v1.1.json)",
    "output_dir": "where logs, checkpoints, the adapter and predictions go",
    "r": "LoRA rank (0 = no adapter)", "alpha": "LoRA alpha: scaling = alpha / r",
    "dropout": "dropout on the LoRA input", "targets": "comma-separated module names (PEFT suffix rule)",
    "qv_only": "on c_attn, adapt only the q and v slices (loralib-style), like the seed's qv_only",
    "init": "LoRA A init: kaiming (PEFT default) or gaussian (the seed's)",
    "rslora": "rank-stabilised scaling alpha / sqrt(r)",
    "lr": "peak learning rate", "epochs": "passes over the training set",
    "batch_size": "examples per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "warmup_steps": "optimizer steps of linear warm-up", "schedule": "decay after warm-up",
    "weight_decay": "AdamW decoupled weight decay (torch.optim.AdamW semantics)",
    "clip": "clip the global gradient norm to this (0 = off)",
    "max_steps": "stop after this many optimizer steps (0 = all epochs)",
    "max_train_examples": "use only the first N training questions (0 = all)",
    "seed": "seed for data order, LoRA init and dropout",
    "max_length": "longest example in tokens; longer contexts are cut around the answer",
    "loss_on": "'answer': loss on answer tokens only; 'all': on every token (the seed's way)",
    "bucket": "batch examples of similar length together (less padding, faster)",
    "skip_bad": "skip malformed questions (and report how many) instead of stopping",
    "eval_interval": "optimizer steps between held-out loss evaluations",
    "eval_examples": "held-out examples used for the validation loss",
    "save_interval": "optimizer steps between checkpoints",
    "keep_checkpoints": "how many checkpoint-* folders to keep (0 = all)",
    "gen_eval_examples": "held-out questions answered at the end for SQuAD EM/F1 (0 = skip)",
    "train_gen_eval_examples": "training questions answered at the end for EM/F1 (memorisation check)",
    "max_new_tokens": "longest generated answer, in tokens",
    "random_base": "build a RANDOM-initialised GPT-2 of this shape (GPTConfig fields, comma-separated "
                   "key=value) in OUTPUT_DIR/base_model instead of loading --model: for experiments "
                   "without pretrained weights",
    "demo": "offline demo: a small random-initialised GPT-2 on data/squad_sample.json",
}

# What --demo changes: a model small enough to train in about a minute on 2 CPU cores.
# initializer_range 0.1 instead of GPT-2's 0.02: with the frozen random embeddings of a
# 0.02 init, the tied LM head cannot produce confident logits and the loss stays near ln(V).
DEMO_OVERRIDES = dict(random_base="n_layer=2,n_head=4,n_embd=128,n_positions=512,initializer_range=0.1",
                      train_file="data/squad_sample.json", output_dir="checkpoints/demo", r=32, alpha=64,
                      dropout=0.0, lr=5e-3, epochs=40, batch_size=8, warmup_steps=10, max_length=256,
                      eval_interval=20, save_interval=60, eval_examples=64, gen_eval_examples=16,
                      train_gen_eval_examples=16, max_new_tokens=12)
RESUME_MAY_CHANGE = {"max_steps", "epochs", "eval_interval", "save_interval", "keep_checkpoints",
                     "gen_eval_examples", "train_gen_eval_examples", "eval_examples", "max_new_tokens"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:  # --x / --no-x, so that a saved True can be turned off on --resume
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=HELP[f.name] + f" (default: {f.default})")
        else:
            kind = {"int": int, "float": float}.get(getattr(f.type, "__name__", str(f.type)), str)
            p.add_argument(flag, type=kind, default=None, help=HELP[f.name] + f" (default: {f.default})")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = p.parse_args(argv)
    # Every option defaults to None, so "not given" is None and nothing else: 0, 0.0, "" and
    # False given on the command line are kept (0 == False in Python).
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    base = DEMO_OVERRIDES if args.demo else {}
    if args.resume:  # continue with the run's own settings; flags given now override them
        out = given["output_dir"] if "output_dir" in given else base.get("output_dir", TrainConfig.output_dir)
        saved = Path(out) / "config.json"
        if saved.is_file():
            base = json.loads(saved.read_text())
    return TrainConfig(**{**base, **given}), args.resume


# ----------------------------------------------------------------------------
# Small pieces of the loop

def learning_rate(step, cfg, total_steps):
    """lr for optimizer step `step` (0-based): linear warm-up, then cosine/linear decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def evaluate_loss(model, batches_):
    """Token-weighted mean answer loss over the given batches, dropout off."""
    from jittor_env import jt
    from model_utils import IGNORE_INDEX
    model.eval()
    total, count = 0.0, 0
    with jt.no_grad():
        for b in batches_:
            n = int((b["targets"] != IGNORE_INDEX).sum())
            _, loss = model(jt.array(b["input_ids"]), jt.array(b["targets"]), attention_mask=jt.array(b["attention_mask"]))
            total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


def append_line(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")


def truncate_log(path, last_step, is_json=False):
    """Drop log records after `last_step` (a resumed run re-does those steps)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            keep.append(line)
            continue
        step = json.loads(line)["step"] if is_json else int(line.split()[0])
        if step <= last_step:
            keep.append(line)
    path.write_text("".join(l + "\n" for l in keep))


# ----------------------------------------------------------------------------
# Checkpoints: PEFT-format adapter + everything needed to resume bit-exactly, written to a
# temporary folder and renamed into place, so a crash never leaves a half checkpoint.

def save_checkpoint(out, model, opt, state):
    from model_utils import atomic_save_safetensors, atomic_write_json
    final = out / f"checkpoint-{state['step']:06d}"
    tmp = out / f".tmp-checkpoint-{state['step']:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_lora_weights(tmp)
    tensors = {}
    for (name, p), m, v in zip(model.lora_state_dict().items(), opt.param_groups[0]["m"], opt.param_groups[0]["values"]):
        tensors[f"param/{name}"], tensors[f"exp_avg/{name}"], tensors[f"exp_avg_sq/{name}"] = p.numpy(), m.numpy(), v.numpy()
    atomic_save_safetensors(tmp / "trainer_state.safetensors", tensors)
    atomic_write_json(tmp / "trainer_state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(out):
    done = sorted(p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path, model, opt):
    from jittor_env import jt
    from model_utils import load_safetensors
    tensors = load_safetensors(path / "trainer_state.safetensors")
    for (name, p), m, v in zip(model.lora_state_dict().items(), opt.param_groups[0]["m"], opt.param_groups[0]["values"]):
        for key, var in ((f"param/{name}", p), (f"exp_avg/{name}", m), (f"exp_avg_sq/{name}", v)):
            if key not in tensors or tuple(tensors[key].shape) != tuple(var.shape):
                raise ValueError(f"{path}: trainer state does not match this model ({key})")
            var.update(jt.array(tensors[key]))
    return json.loads((path / "trainer_state.json").read_text())


def prune_checkpoints(out, keep):
    if keep > 0:
        for old in sorted(out.glob("checkpoint-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------
# Setup: data, model

def load_data(cfg, tokenizer, log):
    from gpt2_lora_dataset import encode_dataset, ensure_squad, read_squad, split_by_article
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
    return train_ex, eval_ex, train_f, eval_f, train_path, eval_path


def parse_shape(text):
    """'n_layer=2,n_embd=128' -> {"n_layer": 2, "n_embd": 128}, checked against GPTConfig."""
    from GPT2_jittor import GPTConfig
    known = {f.name: f.type for f in fields(GPTConfig)}
    shape = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known or not value:
            raise ValueError(f"--random-base: {item!r} is not a GPTConfig field=value "
                             f"(fields: {', '.join(known)})")
        shape[key] = known[key](value)
    return shape


def build_model(cfg, out, log):
    from GPT2_jittor import GPT, GPTConfig
    from LoRA import LoRAConfig
    from lora_models import LoRAGPT
    from model_utils import ensure_gpt2
    if cfg.random_base:
        base_dir = out / "base_model"
        shape = parse_shape(cfg.random_base)
        if not (base_dir / "model.safetensors").is_file():
            from jittor_env import jt
            jt.set_global_seed(cfg.seed)
            GPT(GPTConfig(**shape)).save_pretrained(base_dir)
        log(f"NOTE: the base model in {base_dir} is a RANDOM-initialised GPT-2 ({cfg.random_base}), "
            f"not pretrained GPT-2: this run shows the pipeline working end to end; it cannot "
            f"answer questions the way a pretrained GPT-2 + LoRA does.")
    else:
        base_dir = ensure_gpt2(cfg.model)
    lora_cfg = LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.targets,
                          init=cfg.init, use_rslora=cfg.rslora,
                          qkv=(True, False, True) if cfg.qv_only else (True, True, True))
    model = LoRAGPT(GPT.from_pretrained(base_dir), lora_cfg)
    model.base_model_name_or_path = str(base_dir)
    return model, base_dir


# ----------------------------------------------------------------------------

def train(cfg, resume=False, stop_after=None, progress=True):
    """Run training; returns the output folder. stop_after=N stops after optimizer step N
    as if interrupted (used by the resume test)."""
    from tqdm import tqdm
    from jittor_env import jt
    from gpt2_lora_dataset import batches, collate, count_tokens
    from model_utils import atomic_write_json, load_tokenizer

    out = Path(cfg.output_dir)
    if cfg.demo and not resume and out == Path(DEMO_OVERRIDES["output_dir"]) and out.exists():
        shutil.rmtree(out)  # `make demo` twice: the demo always starts afresh in its own folder
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        tqdm.write(msg, file=sys.stderr)

    # --- config: a resumed run must be the same run ---
    config_file = out / "config.json"
    ckpt = latest_checkpoint(out) if resume else None
    if resume and config_file.is_file():
        old = json.loads(config_file.read_text())
        changed = {k for k, v in asdict(cfg).items() if k not in RESUME_MAY_CHANGE and old.get(k) != v}
        if changed:
            raise SystemExit(f"{config_file}: --resume with different settings "
                             f"({', '.join(f'{k}: {old.get(k)} -> {getattr(cfg, k)}' for k in sorted(changed))})")
    if not resume and latest_checkpoint(out):
        raise SystemExit(f"{out} already holds checkpoints: pass --resume to continue, or another --output-dir")
    atomic_write_json(config_file, asdict(cfg))

    jt.set_global_seed(cfg.seed)  # LoRA A init
    model, base_dir = build_model(cfg, out, log)
    tokenizer = load_tokenizer(base_dir)
    train_ex, eval_ex, train_f, eval_f, train_path, eval_path = load_data(cfg, tokenizer, log)
    model.print_trainable_parameters()

    params = model.trainable_parameters()
    # torch.optim.AdamW semantics (decoupled decay, eps outside the sqrt): checked against
    # PyTorch step by step in tests/test_lora_peft.py.
    opt = jt.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-8, betas=(0.9, 0.999))
    per_epoch = math.ceil(len(batches(train_f, cfg.batch_size, cfg.seed, 0, bucket=cfg.bucket)) / cfg.grad_accum)
    total = per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, per_epoch * cfg.epochs)
    eval_batches = [collate([eval_f[i] for i in b]) for b in batches(eval_f, cfg.batch_size, 0, 0, shuffle=False)]

    step, epoch, micro = 0, 0, 0  # optimizer steps done; position in the data
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        step, epoch, micro = state["step"], state["epoch"], state["micro"]
        log(f"resumed from {ckpt} (step {step}, epoch {epoch + 1})")
    for name in ("train_loss.txt", "val_loss.txt", "metrics.jsonl"):
        if step == 0:
            (out / name).unlink(missing_ok=True)
        else:
            truncate_log(out / name, step, is_json=name.endswith(".jsonl"))

    if step == 0:  # the starting point of the held-out curve
        append_line(out / "val_loss.txt", f"0\t{evaluate_loss(model, eval_batches):.6f}")
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    t_start, tokens_seen, loss_ema = time.time(), 0, None
    while step < total and epoch < cfg.epochs:
        order = batches(train_f, cfg.batch_size, cfg.seed, epoch, bucket=cfg.bucket)
        while micro < len(order) and step < total:
            t0 = time.time()
            # Dropout masks come from Jittor's RNG: reseeding per step makes a resumed run
            # draw exactly the masks an uninterrupted run draws.
            jt.set_global_seed(cfg.seed * 100_003 + step)
            lr = learning_rate(step, cfg, total)
            opt.lr = lr
            group, loss_sum, n_tok = order[micro:micro + cfg.grad_accum], 0.0, 0
            for idx in group:
                b = collate([train_f[i] for i in idx])
                _, loss = model(jt.array(b["input_ids"]), jt.array(b["targets"]), attention_mask=jt.array(b["attention_mask"]))
                opt.backward(loss / len(group))  # mean over micro-batches
                loss_val = loss.item()
                if not math.isfinite(loss_val):
                    bar.close()
                    last = latest_checkpoint(out)
                    raise SystemExit(f"loss is {loss_val} at step {step + 1} (epoch {epoch + 1}); stopping. "
                                     f"The last good checkpoint is {last or 'none'}; try a lower --lr.")
                loss_sum += loss_val / len(group)
                n_tok += count_tokens(b)
            if cfg.clip > 0:
                opt.clip_grad_norm(cfg.clip)
            # Jittor counts backward() calls in n_step; AdamW's bias correction must count
            # optimizer steps (as torch does), which differ under gradient accumulation.
            opt.n_step = step + 1
            opt.step()
            step, micro = step + 1, micro + len(group)
            dt = time.time() - t0
            tokens_seen += n_tok
            loss_ema = loss_sum if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_sum
            append_line(out / "train_loss.txt", f"{step}\t{loss_sum:.6f}")
            append_line(out / "metrics.jsonl", json.dumps({"step": step, "epoch": epoch + 1, "loss": round(loss_sum, 6),
                        "lr": lr, "tokens_per_s": round(n_tok / dt, 1), "elapsed_s": round(time.time() - t_start, 2)}))
            bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / (time.time() - t_start):.0f}")
            bar.update(1)

            if step % cfg.eval_interval == 0 or step == total:
                val = evaluate_loss(model, eval_batches)
                append_line(out / "val_loss.txt", f"{step}\t{val:.6f}")
                log(f"step {step}: train loss {loss_ema:.4f}, held-out loss {val:.4f}")
            if micro >= len(order):
                epoch, micro = epoch + 1, 0
            if step % cfg.save_interval == 0 or step == total:
                save_checkpoint(out, model, opt, {"step": step, "epoch": epoch, "micro": micro})
                prune_checkpoints(out, cfg.keep_checkpoints)
            if stop_after is not None and step >= stop_after:
                bar.close()
                return out
            if micro == 0:
                break  # a new epoch: the outer loop draws its own order
    bar.close()

    model.eval()
    model.save_lora_weights(out / "adapter")
    log(f"adapter saved to {out / 'adapter'} (PEFT format)")
    final_scores(cfg, model, tokenizer, (train_ex, train_path), (eval_ex, eval_path), out, log)
    try:
        from plot_loss import plot_runs
        plot_runs([out], out / "curves.png")
        log(f"loss curves: {out / 'curves.png'}")
    except Exception as e:  # a plotting problem must not cost the finished run
        log(f"warning: could not plot the curves ({e})")
    log(f"done: {out}/ holds adapter/ (PEFT format), checkpoint-*/, train_loss.txt, val_loss.txt, "
        f"metrics.jsonl, config.json, predictions.json, scores.json, curves.png")
    return out


def final_scores(cfg, model, tokenizer, train, heldout, out, log):
    """SQuAD EM/F1 by greedy generation on held-out (and optionally training) questions."""
    from gpt2_lora_dataset import load_squad_json
    from model_utils import atomic_write_json, evaluate_squad
    from test_generation import answer_questions, subset_dataset
    scores = {}
    for name, (examples, path), n in (("heldout", heldout, cfg.gen_eval_examples),
                                      ("train", train, cfg.train_gen_eval_examples)):
        if not n:
            continue
        chosen = examples[:n]
        preds = answer_questions(model, tokenizer, chosen, batch_size=cfg.batch_size,
                                 max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length)
        data = subset_dataset(load_squad_json(path), set(preds))
        s = evaluate_squad(data, preds)
        scores[name] = {**s, "questions": len(preds)}
        atomic_write_json(out / ("predictions.json" if name == "heldout" else "predictions_train.json"), preds)
        log(f"{name} SQuAD EM {s['exact_match']:.2f}  F1 {s['f1']:.2f}  on {len(preds)} questions")
    if scores:
        atomic_write_json(out / "scores.json", scores)


if __name__ == "__main__":
    cfg, resume = parse_args()
    try:
        train(cfg, resume=resume)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
