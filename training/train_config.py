"""The settings of a training run, shared by train_default_lora.py (Jittor) and
train_pytorch_lora.py (the PyTorch reference): TrainConfig, the command line generated
from it, and the learning-rate schedule. No Jittor and no PyTorch here.
"""
import argparse
import json
import math
import re
import textwrap
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
    model: str = option("gpt2", "base GPT-2: a folder with config.json + model.safetensors (the seed's ./gpt2), "
                                "or a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, "
                                "openai-community/..., any GPT-2 repo) fetched into the Hugging Face cache")
    revision: str = option(None, "hub revision of --model: a branch, tag or commit (unset: main)")
    model_dropout: float = option(None, "GPT-2's own dropout (resid_pdrop, embd_pdrop, attn_pdrop) while training "
                                        "(unset: the base model's config.json, 0.1 for GPT-2)")
    train_file: str = option(None, "SQuAD v1.1 JSON to train on (unset: data/train-v1.1.json, downloaded "
                                   "when online)")
    eval_file: str = option(None, "SQuAD v1.1 JSON for the held-out loss and EM/F1 (unset: data/dev-v1.1.json, "
                                  "downloaded when online; with --demo: a fifth of the training file's articles)")
    output_dir: str = option("checkpoints/gpt2_lora_squad", "where logs, checkpoints, the adapter and predictions go")
    # LoRA
    r: int = option(8, "LoRA rank")
    alpha: float = option(16, "LoRA alpha: scaling = alpha / r")
    dropout: float = option(0.1, "dropout on the LoRA input (0 = off)")
    targets: str = option("c_attn,c_proj,c_fc", "which modules get LoRA: comma-separated "
                                                "names (PEFT's suffix rule), or a regular expression that must "
                                                "match a whole PEFT name such as transformer.h.0.attn.c_attn")
    # which modules, beyond --targets (PEFT's LoraConfig fields of these names; lora_targets() below)
    exclude_modules: str = option("", "modules never adapted: comma-separated names (suffix rule) or a regular "
                                      "expression (full match)")
    layers_to_transform: str = option("", "adapt only these blocks, comma-separated indices, e.g. 0,1 "
                                          "(with comma-separated --targets)")
    layers_pattern: str = option("", "the module list holding the blocks (GPT-2: h); unset: the first numbered "
                                     "part of a name")
    modules_to_save: str = option("", "whole modules trained and saved beside the adapter, comma-separated "
                                      "(PEFT's rule: every module whose name ends so), e.g. ln_f")
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
    report_to: str = option("none", "also log the scalars for TensorBoard into OUTPUT_DIR/runs (the HF "
                                    "Trainer's flag; needs `pip install tensorboard`)")


# What --demo changes: a model small enough to train in well under a minute on 2 CPU cores.
# initializer_range 0.1 instead of GPT-2's 0.02: with the frozen random embeddings of a
# 0.02 init, the tied LM head cannot produce confident logits and the loss stays near ln(V).
DEMO_OVERRIDES = dict(random_base="n_layer=2,n_head=4,n_embd=128,n_positions=512,initializer_range=0.1",
                      train_file="data/squad_sample.json", output_dir="checkpoints/demo", r=32, alpha=64,
                      dropout=0.0, lr=5e-3, epochs=40, batch_size=8, warmup_steps=10, max_length=256,
                      eval_interval=20, save_interval=60, eval_examples=64, gen_eval_examples=16,
                      train_gen_eval_examples=16, max_new_tokens=12)
# batch_size and grad_accum may change with the number of processes; the global batch
# (batch_size x grad_accum x processes) must stay, which resuming checks against the checkpoint.
RESUME_MAY_CHANGE = {"device", "report_to", "max_steps", "adapter_steps", "epochs", "eval_interval", "save_interval",
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
           "loss_on": ("answer", "all"), "device": DEVICES, "precision": PRECISIONS,
           "report_to": ("none", "tensorboard")}
# What the targets may name: GPT-2's projections, alone or with their parents (PEFT's suffix
# rule), e.g. c_attn, mlp.c_proj, h.0.attn.c_attn.
TARGET_NAME = re.compile(r"(transformer\.)?((h\.)?\d+\.)?(((attn\.)?c_attn)|((attn|mlp)\.)?c_proj|((mlp\.)?c_fc))")
# name -> (accepted?, the range in words); floats must also be finite.
RANGES = {
    **{name: (lambda v: v >= 1, "at least 1") for name in AT_LEAST_ONE},
    **{name: (lambda v: v >= 0, ">= 0") for name in ("warmup_steps", "weight_decay", "clip", "max_steps",
                                                     "max_train_examples", "keep_checkpoints",
                                                     "gen_eval_examples", "train_gen_eval_examples")},
    "alpha": (lambda v: v > 0, "> 0"),
    "lr": (lambda v: v > 0, "> 0"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
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
    if not is_regex(cfg.targets) and not all(TARGET_NAME.fullmatch(t.strip()) for t in cfg.targets.split(",")):
        bad("targets", "a comma-separated list of GPT-2 projections (c_attn, c_proj, c_fc, attn.c_proj, "
                       "mlp.c_proj, optionally with a layer, e.g. h.0.attn.c_attn) or a regular expression", cfg.targets)
    for name in ("targets", "exclude_modules"):
        if is_regex(getattr(cfg, name)):
            try:
                re.compile(getattr(cfg, name))
            except re.error as e:
                bad(name, f"a valid regular expression ({e})", getattr(cfg, name))
    if cfg.layers_to_transform and not re.fullmatch(r"\d+(,\d+)*", cfg.layers_to_transform.replace(" ", "")):
        bad("layers_to_transform", "comma-separated block indices (e.g. 0,1)", cfg.layers_to_transform)
    if (cfg.layers_to_transform or cfg.layers_pattern) and is_regex(cfg.targets):
        raise UsageError("--layers-to-transform / --layers-pattern need comma-separated --targets, not a regular "
                         "expression (PEFT's rule)")
    if cfg.layers_pattern and not cfg.layers_to_transform:
        raise UsageError("--layers-pattern needs --layers-to-transform")
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


# A --targets / --exclude-modules value with one of these is a regular expression (PEFT: a str);
# without, a comma-separated list of names (PEFT: a list). "." belongs to names (attn.c_proj).
REGEX_CHARS = set("*+?()[]{}|^$\\")


def is_regex(text):
    """Whether a command-line value is meant as a regular expression (lora_models checks that
    an adapter_config.json pattern compiles: compiles_as_regex)."""
    return bool(REGEX_CHARS & set(text))


def names_or_regex(text):
    """A command-line value as PEFT takes it: a regular expression (str), a list of names, or None."""
    if not text:
        return None
    return text if is_regex(text) else [t.strip() for t in text.split(",") if t.strip()]


def lora_targets(cfg):
    """The which-modules fields of both LoRA configs (ours and PEFT's LoraConfig take these names)."""
    return dict(target_modules=names_or_regex(cfg.targets), exclude_modules=names_or_regex(cfg.exclude_modules),
                layers_to_transform=[int(i) for i in cfg.layers_to_transform.split(",")] if cfg.layers_to_transform else None,
                layers_pattern=cfg.layers_pattern or None,
                modules_to_save=[m.strip() for m in cfg.modules_to_save.split(",") if m.strip()] or None)


def adapter_steps(cfg):
    """The optimizer steps after which the adapter is written (--adapter-steps), as a set."""
    steps = {int(s) for s in cfg.adapter_steps.split(",") if s.strip()}
    if any(s < 1 for s in steps):
        raise ValueError(cfg.adapter_steps)
    return steps


# ----------------------------------------------------------------------------
# The command line, group by group, in --help's order: field -> its spellings. The first is
# the one --help shows and docs/usage.md documents: PEFT's names for LoRA (lora_r,
# lora_alpha, target_modules, ...) and the HF Trainer's for the rest (learning_rate,
# max_grad_norm, num_train_epochs, eval_steps, save_steps, report_to, ...). The others stay
# accepted, so published commands keep working: "--" + the field name (the seed's --r,
# --lr, --clip, ...) always, and every spelling's underscore twin (--lora_r, --learning_rate).
CLI_GROUPS = {
    "model": {"model": ("--model", "--model-name-or-path"), "revision": (), "model_dropout": (),
              "random_base": (), "demo": ()},
    "LoRA": {"r": ("--lora-r",), "alpha": ("--lora-alpha",), "dropout": ("--lora-dropout",),
             "targets": ("--target-modules",), "qv_only": (), "init": ("--init-lora-weights",),
             "rslora": ("--use-rslora",), "exclude_modules": (), "layers_to_transform": (), "layers_pattern": (),
             "modules_to_save": (), "use_dora": ("--use-dora",), "loraplus_lr_ratio": ("--loraplus-lr-ratio",)},
    "data": {"train_file": (), "eval_file": ("--eval-file", "--validation-file"),
             "max_length": ("--max-length", "--max-seq-length"),
             "max_train_examples": ("--max-train-examples", "--max-train-samples"), "loss_on": (),
             "bucket": ("--group-by-length", "--bucket"), "skip_bad": ()},
    "optimisation": {"lr": ("--learning-rate",), "epochs": ("--num-train-epochs",),
                     "batch_size": ("--batch-size", "--per-device-train-batch-size"),
                     "grad_accum": ("--gradient-accumulation-steps", "--grad-accum"), "warmup_steps": (),
                     "schedule": ("--lr-scheduler-type", "--schedule"), "weight_decay": (),
                     "clip": ("--max-grad-norm",), "max_steps": (), "seed": ()},
    "evaluation": {"eval_interval": ("--eval-steps",), "eval_examples": ("--eval-examples", "--max-eval-samples"),
                   "gen_eval_examples": (), "train_gen_eval_examples": (), "max_new_tokens": ()},
    "output and resume": {"output_dir": (), "save_interval": ("--save-steps",),
                          "keep_checkpoints": ("--save-total-limit",), "adapter_steps": (), "report_to": ()},
    "device and processes": {"device": (), "precision": ()},
}


def spellings(name):
    """Every flag accepted for field `name`, the documented one first."""
    first = list(next(g[name] for g in CLI_GROUPS.values() if name in g)) or ["--" + name.replace("_", "-")]
    flags = first + ["--" + name.replace("_", "-")]
    flags += ["--" + f[2:].replace("-", "_") for f in flags]
    return list(dict.fromkeys(flags))


class HelpFormatter(argparse.HelpFormatter):
    """--help lists one spelling per option (the documented one) and its choices; the other
    spellings are listed once at the end (the epilog)."""
    def _format_action_invocation(self, action):
        if not action.option_strings or action.dest == "help":
            return super()._format_action_invocation(action)
        flag = action.option_strings[0]
        if action.nargs == 0:
            return f"{flag} / --no-{flag[2:]}" if isinstance(action, argparse.BooleanOptionalAction) else flag
        return f"{flag} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action):
        return action.help  # defaults are written into the help text by parse_args

    def _split_lines(self, text, width):  # never break a flag such as --max-grad-norm at a hyphen
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def build_parser(description):
    """The grouped parser of TrainConfig's fields, plus --resume, --config and --debug."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    assert sorted(n for g in CLI_GROUPS.values() for n in g) == sorted(by_name), "every field in one group"
    aliases = []
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False,
                                usage="%(prog)s [options]  (grouped below; --help lists one spelling per option)")
    groups = {title: p.add_argument_group(title) for title in CLI_GROUPS}
    for title, names in CLI_GROUPS.items():
        for name in names:
            f, flags = by_name[name], spellings(name)
            default = f.default if f.default not in ("", None) else "none" if f.default == "" else None
            text = f.metadata["help"] + (f" (default: {default})" if default is not None else "")
            if f.type is bool:  # --x / --no-x, so that a saved True can be turned off on --resume
                groups[title].add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                           help=text)
            else:
                metavar = "{" + ",".join(CHOICES[name]) + "}" if name in CHOICES else \
                    {int: "N", float: "X"}.get(f.type, flags[0][2:].upper().replace("-", "_"))
                groups[title].add_argument(*flags, dest=name, type=f.type, default=None, help=text, metavar=metavar)
            aliases += [f"{a} = {flags[0]}" for a in flags[1:] if "_" not in a]
    run = groups["output and resume"]
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    run.add_argument("--config", metavar="FILE", help="read the options from this JSON file of TrainConfig fields "
                     "(a run's own config.json works); options given on the command line override it")
    run.add_argument("--debug", action="store_true", help="show the full traceback of an error "
                     "(or set GPT2_LORA_DEBUG=1)")
    p.epilog = ("Other spellings accepted (the seed's names and the HF / PEFT ones), each also with "
                "underscores (--lora_r, --learning_rate): " + "; ".join(aliases) + ".")
    return p


def parse_args(argv=None, description="Fine-tune GPT-2 with LoRA on SQuAD v1.1 (loss on the answer tokens only)."):
    """(TrainConfig, resume) from the command line.

    Options given win over --config FILE, which wins over the run's saved config.json (with
    --resume), which wins over --demo's settings, which win over the defaults. Every
    option's argparse default is None, so "not given" is None and nothing else: a 0, 0.0,
    "" or False given is kept. --debug is read by the scripts' main().
    """
    args = build_parser(description).parse_args(argv)
    own = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if v is not None and k in own}
    from_file = read_saved_config(Path(args.config)) if args.config else {}
    demo = given.get("demo", from_file.get("demo"))
    base = DEMO_OVERRIDES if demo else {}
    if args.resume:  # continue with the run's own settings; options given now override them
        out = given.get("output_dir", from_file.get("output_dir", base.get("output_dir", TrainConfig.output_dir)))
        saved = Path(out) / "config.json"
        if saved.is_file():
            base = read_saved_config(saved)
    return TrainConfig(**{**base, **from_file, **given}), args.resume


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
        raise ValueError(f"{path}: unknown settings {unknown}; the keys are TrainConfig's fields, as in a run's "
                         f"config.json (written by another version of this script?)")
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
