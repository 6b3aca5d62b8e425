"""The settings of a training run, shared by train_default_lora.py (Jittor) and
train_pytorch_lora.py (the PyTorch reference): TrainConfig, the command line generated
from it, and the learning-rate schedule. No Jittor and no PyTorch here.
"""
import argparse
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from backend.mixed_precision import DEVICES, PRECISIONS

# ----------------------------------------------------------------------------
# Configuration: the seed's defaults (r=8, alpha=16, dropout 0.1, lr 5e-4, 3 epochs,
# c_attn/c_proj/c_fc, eval every 50 steps, save every 100) plus what a real run needs.
# Each field carries its --help text; the command line is generated from the fields.


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = option("gpt2", "base GPT-2 folder with config.json + model.safetensors; "
                                "'gpt2' downloads it into ./gpt2 when online")
    train_file: str = option(None, "SQuAD v1.1 JSON to train on (unset: data/train-v1.1.json, downloaded "
                                   "when online)")
    eval_file: str = option(None, "SQuAD v1.1 JSON for the held-out loss and EM/F1 (unset: data/dev-v1.1.json, "
                                  "downloaded when online; with --demo: a fifth of the training file's articles)")
    output_dir: str = option("checkpoints/gpt2_lora_squad", "where logs, checkpoints, the adapter and predictions go")
    # LoRA
    r: int = option(8, "LoRA rank")
    alpha: float = option(16, "LoRA alpha: scaling = alpha / r")
    dropout: float = option(0.1, "dropout on the LoRA input (0 = off)")
    targets: str = option("c_attn,c_proj,c_fc", "comma-separated module names (PEFT suffix rule)")
    qv_only: bool = option(False, "on c_attn, adapt only the q and v slices (loralib-style), like the seed's qv_only")
    init: str = option("kaiming", "LoRA init (PEFT's init_lora_weights): kaiming (PEFT default), gaussian (the "
                                  "seed's), or pissa, pissa_niter_<N>, olora: A, B from W's top-r part, the base "
                                  "keeps the residual, the adapter is saved for the original base "
                                  "(docs/lora_variants.md)")
    rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r)")
    # LoRA variants (docs/lora_variants.md); with --init above
    use_dora: bool = option(False, "DoRA: train a magnitude per output column too (PEFT's use_dora)")
    loraplus_lr_ratio: float = option(0.0, "LoRA+: lora_B (and DoRA's magnitude) train at this x --lr, as "
                                           "PEFT's create_loraplus_optimizer groups them (0 = off; e.g. 16)")
    # optimisation
    lr: float = option(5e-4, "peak learning rate")
    epochs: int = option(3, "passes over the training set")
    batch_size: int = option(4, "examples per micro-batch, per process under mpirun (an optimizer step "
                                "trains on batch_size x grad_accum x processes examples)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    warmup_steps: int = option(0, "optimizer steps of linear warm-up from 0")
    schedule: str = option("cosine", "after warm-up: cosine or linear decay to 0, or constant")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay (torch.optim.AdamW semantics)")
    clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    max_steps: int = option(0, "stop after this many optimizer steps (0 = all epochs)")
    max_train_examples: int = option(0, "use only the first N training questions (0 = all; the seed used 100)")
    seed: int = option(42, "seed for data order, LoRA init and dropout")
    # where it runs (mixed_precision.py)
    device: str = option("auto", "auto (CUDA when a usable GPU is there, else the CPU), cpu or cuda")
    precision: str = option("auto", "fp32; tf32 (CUDA); bf16 or fp16: frozen base weights in half, LoRA, AdamW, "
                                    "LayerNorm, softmax and loss in float32, fp16 with dynamic loss scaling; "
                                    "auto: fp32 on the CPU, bf16 on CUDA")
    # data
    max_length: int = option(512, "longest example in tokens; longer contexts are cut around the answer")
    loss_on: str = option("answer", "'answer': loss on answer tokens only; 'all': on every token (the seed's way)")
    bucket: bool = option(False, "batch examples of similar length together (less padding, faster)")
    skip_bad: bool = option(False, "skip malformed questions (and report how many) instead of stopping")
    # evaluation and checkpoints
    eval_interval: int = option(50, "optimizer steps between held-out loss evaluations")
    eval_examples: int = option(200, "held-out examples used for the validation loss")
    save_interval: int = option(100, "optimizer steps between checkpoints")
    adapter_steps: str = option("", "also write the adapter (PEFT format) after these optimizer steps, e.g. 1,10,100: "
                                    "OUTPUT_DIR/adapter-step<N>/, to compare two runs step by step (plot_loss.py --align)")
    keep_checkpoints: int = option(3, "how many checkpoint-* folders to keep; older ones are deleted (0 = all)")
    gen_eval_examples: int = option(200, "held-out questions answered at the end for SQuAD EM/F1 (0 = skip)")
    train_gen_eval_examples: int = option(0, "training questions answered at the end for EM/F1 "
                                             "(a memorisation check; 0 = skip)")
    max_new_tokens: int = option(32, "longest generated answer, in tokens")
    random_base: str = option(None, "build a RANDOM-initialised GPT-2 of this shape (GPTConfig fields, "
                                    "e.g. n_layer=4,n_head=4,n_embd=256) in OUTPUT_DIR/base_model instead of "
                                    "loading --model: for experiments without pretrained weights")
    demo: bool = option(False, "offline demo: a small random-initialised GPT-2 on data/squad_sample.json")


# What --demo changes: a model small enough to train in about a minute on 2 CPU cores.
# initializer_range 0.1 instead of GPT-2's 0.02: with the frozen random embeddings of a
# 0.02 init, the tied LM head cannot produce confident logits and the loss stays near ln(V).
DEMO_OVERRIDES = dict(random_base="n_layer=2,n_head=4,n_embd=128,n_positions=512,initializer_range=0.1",
                      train_file="data/squad_sample.json", output_dir="checkpoints/demo", r=32, alpha=64,
                      dropout=0.0, lr=5e-3, epochs=40, batch_size=8, warmup_steps=10, max_length=256,
                      eval_interval=20, save_interval=60, eval_examples=64, gen_eval_examples=16,
                      train_gen_eval_examples=16, max_new_tokens=12)
# batch_size and grad_accum may change with the number of processes; the global batch
# (batch_size x grad_accum x processes) must stay, which resuming checks against the checkpoint.
RESUME_MAY_CHANGE = {"device", "max_steps", "adapter_steps", "epochs", "eval_interval", "save_interval",
                     "keep_checkpoints", "gen_eval_examples", "train_gen_eval_examples", "eval_examples", "max_new_tokens",
                     "batch_size", "grad_accum"}
AT_LEAST_ONE = ("epochs", "batch_size", "grad_accum", "eval_interval", "save_interval", "max_length",
                "max_new_tokens", "r", "eval_examples")


# ----------------------------------------------------------------------------
# Accepted values. check() refuses anything else with one line that names the option and
# the accepted range. Exit codes of the scripts: 2 for a usage error (UsageError: a value or
# a combination of options that cannot work), 1 for a data error (a file that is missing,
# malformed or damaged, a failed write).

class UsageError(ValueError):
    """A command-line value or combination of options that cannot work (exit code 2)."""


# Tokens of the shortest possible training example: "Context:" (2) + one context token +
# "\nQuestion: <one token>\nAnswer:" (7) = a 10-token prompt, then one answer token (the
# eos is only a target). tests/test_config_checks.py measures both with the tokenizer.
MIN_PROMPT_TOKENS = 10
MIN_MAX_LENGTH = MIN_PROMPT_TOKENS + 1
CHOICES = {"schedule": ("cosine", "linear", "constant"),
           "loss_on": ("answer", "all"), "device": DEVICES, "precision": PRECISIONS}
# What the targets may name: GPT-2's projections, alone or with their parents (PEFT's suffix
# rule), e.g. c_attn, mlp.c_proj, h.0.attn.c_attn.
TARGET_NAME = re.compile(r"((h\.)?\d+\.)?(((attn\.)?c_attn)|((attn|mlp)\.)?c_proj|((mlp\.)?c_fc))")
# name -> (accepted?, the range in words); floats must also be finite.
RANGES = {
    **{name: (lambda v: v >= 1, "at least 1") for name in AT_LEAST_ONE},
    **{name: (lambda v: v >= 0, ">= 0") for name in ("warmup_steps", "weight_decay", "clip", "max_steps",
                                                     "max_train_examples", "keep_checkpoints",
                                                     "gen_eval_examples", "train_gen_eval_examples")},
    "alpha": (lambda v: v > 0, "> 0"),
    "lr": (lambda v: v > 0, "> 0"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "init": (lambda v: v in ("kaiming", "gaussian", "pissa", "olora") or re.fullmatch(r"pissa_niter_\d+", v),
             "kaiming, gaussian, pissa, pissa_niter_<N> or olora"),
    "loraplus_lr_ratio": (lambda v: v >= 0, ">= 0 (0 = off)"),
    # Jittor's seed is 31 bits and the loop reseeds with seed * 100003 + step (mod 2^31).
    "seed": (lambda v: 0 <= v < 2 ** 31, "in [0, 2^31)"),
}


def check(cfg):
    """Raise UsageError (one line: the option, the accepted range, the value given) unless
    every value of `cfg` can work. Runs before anything is read or written."""
    def bad(name, accepted, value):
        raise UsageError(f"--{name.replace('_', '-')} must be {accepted}, not {value!r}")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and f.default is None:
            continue
        if f.type is float and not isinstance(value, bool) and isinstance(value, (int, float)):
            if not math.isfinite(value):
                bad(f.name, "a finite number", value)
        elif not isinstance(value, f.type) or (f.type is int and isinstance(value, bool)):
            bad(f.name, f"of type {f.type.__name__}", value)
        if f.name in RANGES and not RANGES[f.name][0](value):
            bad(f.name, RANGES[f.name][1], value)
        if f.name in CHOICES and value not in CHOICES[f.name]:
            bad(f.name, " or ".join(CHOICES[f.name]), value)
    targets = [t.strip() for t in cfg.targets.split(",")]
    if not all(TARGET_NAME.fullmatch(t) for t in targets):
        bad("targets", "a comma-separated list of GPT-2 projections (c_attn, c_proj, c_fc, attn.c_proj, "
                       "mlp.c_proj, optionally with a layer, e.g. h.0.attn.c_attn)", cfg.targets)
    if cfg.init not in ("kaiming", "gaussian") and (cfg.qv_only or cfg.use_dora):
        raise UsageError(f"--init {cfg.init} decomposes whole weights and is saved as PEFT's conversion to a plain "
                         f"LoRA, which has no q/v-only form and drops DoRA's magnitude: leave out "
                         f"{'--qv-only' if cfg.qv_only else '--use-dora'}")
    if cfg.max_length < MIN_MAX_LENGTH:
        bad("max_length", f"at least {MIN_MAX_LENGTH} (the shortest prompt + answer)", cfg.max_length)
    if (cfg.gen_eval_examples or cfg.train_gen_eval_examples) \
            and cfg.max_new_tokens > cfg.max_length - MIN_PROMPT_TOKENS:
        bad("max_new_tokens", f"at most --max-length - {MIN_PROMPT_TOKENS} = {cfg.max_length - MIN_PROMPT_TOKENS} "
                              f"(room for the shortest prompt)", cfg.max_new_tokens)
    if not cfg.output_dir:
        bad("output_dir", "a folder name", cfg.output_dir)
    try:
        adapter_steps(cfg)
    except ValueError:
        bad("adapter_steps", "comma-separated step numbers of at least 1 (e.g. 1,10,100)", cfg.adapter_steps)


def adapter_steps(cfg):
    """The optimizer steps after which the adapter is written (--adapter-steps), as a set."""
    steps = {int(s) for s in cfg.adapter_steps.split(",") if s.strip()}
    if any(s < 1 for s in steps):
        raise ValueError(cfg.adapter_steps)
    return steps


def parse_args(argv=None, description="Fine-tune GPT-2 with LoRA on SQuAD v1.1 (loss on the answer tokens only)."):
    """(TrainConfig, resume) from the command line.

    Options given win over the run's saved config.json (with --resume), which wins over
    --demo's settings, which win over the defaults. Every option's argparse default is None,
    so "not given" is None and nothing else: a 0, 0.0, "" or False given is kept.
    """
    p = argparse.ArgumentParser(description=description)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else "")
        if f.type is bool:  # --x / --no-x, so that a saved True can be turned off on --resume
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, type=f.type, default=None, help=text)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    base = DEMO_OVERRIDES if args.demo else {}
    if args.resume:  # continue with the run's own settings; options given now override them
        out = given["output_dir"] if "output_dir" in given else base.get("output_dir", TrainConfig.output_dir)
        saved = Path(out) / "config.json"
        if saved.is_file():
            base = read_saved_config(saved)
    return TrainConfig(**{**base, **given}), args.resume


def read_saved_config(path):
    """A run's config.json as a dict of TrainConfig fields; ValueError naming the file otherwise."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot be read as this run's settings ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a JSON object of settings")
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown} (written by another version of this script?)")
    return saved


# ----------------------------------------------------------------------------
# The learning-rate schedule

def total_steps(cfg, steps_per_epoch):
    """Optimizer steps of the whole run: --epochs passes of steps_per_epoch (the training
    examples / the global batch, rounded up), or --max-steps when that comes first."""
    return min(cfg.max_steps, steps_per_epoch * cfg.epochs) if cfg.max_steps else steps_per_epoch * cfg.epochs


def set_learning_rate(opt, lr):
    """Give every param group of `opt` (Jittor's or torch's optimizer) this step's lr; LoRA+
    groups carry their multiple of it as "lr_ratio"."""
    opt.lr = lr
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


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
