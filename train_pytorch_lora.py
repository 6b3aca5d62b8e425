"""The PyTorch reference of train_default_lora.py: the same LoRA fine-tuning of GPT-2 on SQuAD
v1.1, on transformers' GPT2LMHeadModel + PEFT (LoraConfig, get_peft_model) + torch.optim.AdamW.

Ready to paste (the same options as train_default_lora.py; dropout off on both sides, so the
two runs compute the same numbers up to float rounding):
    python train_default_lora.py --random-base "n_layer=2,n_head=4,n_embd=128,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0" \\
        --dropout 0 --max-steps 50 --output-dir checkpoints/align-jittor
    python train_pytorch_lora.py --random-base "n_layer=2,n_head=4,n_embd=128,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0" \\
        --dropout 0 --max-steps 50 --output-dir checkpoints/align-pytorch
    python plot_loss.py checkpoints/align-jittor checkpoints/align-pytorch --align

What is the same as in train_default_lora.py, by construction:
- the command line (train_config.TrainConfig: one definition), the schedule (learning_rate),
  clipping (torch.nn.utils.clip_grad_norm_, the formula of train_default_lora.clip_grad_norm) and
  AdamW's settings (betas 0.9 / 0.999, eps 1e-8, decoupled weight decay);
- the data: gpt2_lora_dataset.load_data, batches and collate (the same examples, batch
  order, answer-only targets, bucketing, held-out batches);
- the start: the random base (--random-base) is drawn from NumPy by init_weights.py into
  OUTPUT_DIR/base_model (the same bytes for the same --seed and shape), and every lora_A is
  replaced by init_weights.lora_A (B stays zero), so adapter-step0/ holds the same tensors;
- the loss: the token losses of the whole global batch / their number, however it is cut
  into micro-batches (train_default_lora.optimizer_step); the held-out loss token-weighted;
- the answers: test_generation.answer_questions (prompts, batching, answer rule) driving
  Hugging Face's generate with greedy decoding.
The dropout masks are PyTorch's own, so with dropout on the two runs differ by their masks.

Writes into --output-dir (by default the Jittor script's folder + "-pytorch", so a reference
run never overwrites ours): config.json, train_loss.txt, val_loss.txt, metrics.jsonl,
adapter-step0/, adapter-step<N>/ (--adapter-steps) and adapter/ (PEFT's save_pretrained),
base_model/ (with --random-base), predictions.json and scores.json, curves.png. It writes
no checkpoints, so it has no --resume; --qv-only is refused (PEFT cannot train q and v
slices of the fused c_attn alone).

--dtype float64 (this script's own option) runs the same training in double precision: the
yardstick that tells float32 rounding from a real difference between the two float32 runs
(README: 与 PyTorch 对齐).

PyTorch, transformers and PEFT are this project's test and reference dependencies, not
runtime ones: `pip install -r requirements-test.txt`.
"""
import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from tqdm import tqdm

try:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from peft.tuners.lora import LoraLayer
    from transformers import GPT2LMHeadModel
except ImportError as e:
    torch, MISSING = None, e.name

from gpt2_lora_dataset import batches, collate, count_supervised, load_data, rank_share
from training.init_weights import base_model_dir, is_residual_init, lora_A, residual_init
from model_utils import IGNORE_INDEX, atomic_write_json, load_tokenizer
from plot_loss import plot_runs
from test_generation import score_run
from gpt2_config import parse_shape
from training.train_config import (DEMO_OVERRIDES, TrainConfig, UsageError, adapter_steps, check, learning_rate, parse_args,
                          lora_targets, set_learning_rate, total_steps)

INSTALL = ("train_pytorch_lora.py is the PyTorch reference run and needs PyTorch, transformers and PEFT "
           "(test dependencies of this project, not runtime ones): pip install -r requirements-test.txt "
           "(or: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && "
           "pip install peft==0.21.2)")
PEFT_PREFIX = "base_model.model.transformer."   # PeftModel -> LoraModel -> GPT2LMHeadModel


def log(msg):
    tqdm.write(msg, file=sys.stderr)


# ----------------------------------------------------------------------------
# Model, loss, generation

def build_model(cfg, out, dtype="float32"):
    """(PEFT model, base model folder): GPT2LMHeadModel from the base folder train_default_lora.py
    would use, LoRA by PEFT, every lora_A replaced by the NumPy draw train_default_lora.py makes,
    all in `dtype` (float64: --dtype, see the module doc).

    --use-dora: PEFT's DoRA (its magnitude starts at ||W||, whatever A is). --init pissa:
    PEFT's own PiSSA. --init pissa_niter_N / olora: A0, B0 and the residual base from
    init_weights.residual_init, as train_default_lora.py computes them (PEFT's randomised SVD
    draws from torch's generator; PEFT's olora_init fails on GPT-2's Conv1D), on a PEFT
    model built with the plain init."""
    base_dir = base_model_dir(cfg, out, log)
    dropout = {} if cfg.model_dropout is None else \
        {k: cfg.model_dropout for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}  # GPT-2's own
    base = GPT2LMHeadModel.from_pretrained(str(base_dir), dtype=getattr(torch, dtype), **dropout)
    ours_init = cfg.init == "olora" or cfg.init.startswith("pissa_niter_")
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, fan_in_fan_out=True,
                          **lora_targets(cfg),
                          use_rslora=cfg.rslora, use_dora=cfg.use_dora,
                          init_lora_weights=True if cfg.init == "kaiming" or ours_init else cfg.init,
                          task_type="CAUSAL_LM")
    model = get_peft_model(base, peft_cfg)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            A, B, ours = module.lora_A["default"].weight, module.lora_B["default"].weight, name[len(PEFT_PREFIX):]
            if ours_init:
                W = module.get_base_layer().weight
                A0, B0, residual = residual_init(W.float().numpy(), cfg.r, module.scaling["default"], cfg.init,
                                                 cfg.seed, ours)
                for var, value in ((A, A0), (B, B0), (W, residual)):
                    var.copy_(torch.from_numpy(value))
            elif not is_residual_init(cfg.init):
                A.copy_(torch.from_numpy(lora_A(cfg.seed, ours, tuple(A.shape), cfg.r, cfg.init)))
    if is_residual_init(cfg.init):  # PEFT's recipe: the initial adapter, saved with init_lora_weights=True
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(str(out / "adapter-initial"))
    return model, base_dir


def save_adapter(model, cfg, path):
    """PEFT's save_pretrained; after PiSSA / OLoRA with path_initial_model_for_weight_conversion
    (a plain LoRA for the original base, as train_default_lora.py saves it)."""
    initial = Path(cfg.output_dir) / "adapter-initial"
    model.save_pretrained(str(path), **({"path_initial_model_for_weight_conversion": str(initial)}
                                        if is_residual_init(cfg.init) else {}))


def make_optimizer(model, cfg):
    """torch.optim.AdamW as train_default_lora.py's; LoRA+: PEFT's create_loraplus_optimizer
    (loraplus_weight_decay = --weight-decay), each group's multiple of --lr kept as "lr_ratio"."""
    hp = dict(betas=(0.9, 0.999), eps=1e-8)
    if not cfg.loraplus_lr_ratio:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay, **hp)
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                    loraplus_weight_decay=cfg.weight_decay, **hp)
    for group in opt.param_groups:
        group["lr_ratio"] = group["lr"] / cfg.lr
    return opt


def batch_loss(model, batch):
    """Mean cross-entropy over the supervised tokens of a collated batch.

    targets[b, t] is the token after input_ids[b, t] (already shifted), so the loss is taken
    on the logits at the supervised positions as they are (transformers' `labels` would shift
    once more). transformers computes the LM head at those positions only (logits_to_keep,
    a boolean mask: (N, vocab) logits in row-major order), as train_default_lora.py does.
    """
    supervised = batch["targets"] != IGNORE_INDEX
    logits = model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                   attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                   logits_to_keep=torch.from_numpy(supervised)).logits
    return torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["targets"][supervised]).long())


def evaluate_loss(model, batches_):
    """Token-weighted mean answer loss over the given batches, dropout off."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches_:
            n = int((b["targets"] != IGNORE_INDEX).sum())
            total, count = total + batch_loss(model, b).item() * n, count + n
    model.train()
    return total / max(count, 1)


class GreedyGenerator:
    """What test_generation.answer_questions asks of a model, on a PEFT model: greedy decoding by
    Hugging Face's generate on left-padded prompts, (B, T + new) token ids as numpy."""

    def __init__(self, model):
        self.peft_model, self.config = model, model.config   # config.n_positions caps the prompt

    def eval(self):
        self.peft_model.eval()
        return self

    def train(self):
        self.peft_model.train()
        return self

    def generate(self, ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, seed=None):
        if temperature != 0.0:
            raise ValueError("the PyTorch reference generates greedily only")
        with torch.no_grad():
            out = self.peft_model.generate(input_ids=torch.from_numpy(ids).long(),
                                           attention_mask=torch.from_numpy(attention_mask).long(),
                                           max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                           eos_token_id=eos_token_id, pad_token_id=eos_token_id)
        return out.numpy()


# ----------------------------------------------------------------------------
# The run

def open_output_dir(cfg):
    """The output folder with this run's config.json; the logs of an earlier run there are removed."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train_loss.txt", "val_loss.txt", "metrics.jsonl"):
        (out / name).unlink(missing_ok=True)
    atomic_write_json(out / "config.json", asdict(cfg))
    return out


def reference_config(cfg):
    """cfg for this script: the Jittor script's default folders get a "-pytorch" twin."""
    if cfg.output_dir in (TrainConfig.output_dir, DEMO_OVERRIDES["output_dir"]):
        cfg = replace(cfg, output_dir=cfg.output_dir + "-pytorch")
    if cfg.qv_only:
        raise UsageError("--qv-only: PEFT has no adapter on the q and v slices of GPT-2's fused c_attn alone; "
                         "the PyTorch reference trains full c_attn adapters only")
    if cfg.device == "cuda" or cfg.precision not in ("auto", "fp32"):
        raise UsageError("the PyTorch reference runs on the CPU in fp32 (the alignment setting); "
                         "leave out --device cuda and --precision")
    if cfg.random_base:
        try:
            parse_shape(cfg.random_base)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return cfg


def train(cfg, progress=True, dtype="float32"):
    """The whole run, as train_default_lora.train (no checkpoints); returns the output folder.
    dtype: float32 (the alignment setting) or float64 (the rounding yardstick, --dtype)."""
    if torch is None:
        raise RuntimeError(f"no module named {MISSING!r}. {INSTALL}")
    check(cfg)
    cfg = reference_config(cfg)
    out = open_output_dir(cfg)
    model, base_dir = build_model(cfg, out, dtype)
    tokenizer = load_tokenizer(base_dir)
    data = load_data(cfg, tokenizer)
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, cfg)
    global_batch = cfg.batch_size * cfg.grad_accum  # one process
    total = total_steps(cfg, math.ceil(len(data.train_features) / global_batch))
    save_adapter(model, cfg, out / "adapter-step0")
    save_adapter_at = adapter_steps(cfg)

    # --- the loop of train_default_lora.train_loop, step for step
    append_line(out / "val_loss.txt", f"0\t{evaluate_loss(model, data.eval_batches):.6f}")
    model.train()
    step, epoch, done = 0, 0, 0  # done: global batches of the epoch
    t_start, tokens_seen, loss_ema, order, order_epoch = time.time(), 0, None, None, None
    with tqdm(total=total, desc="train (pytorch)", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        while step < total and epoch < cfg.epochs:
            if order_epoch != epoch:
                order, order_epoch = batches(data.train_features, global_batch, cfg.seed, epoch,
                                             bucket=cfg.bucket), epoch
            batch = order[done]
            lr = learning_rate(step, cfg, total)
            set_learning_rate(opt, lr)
            torch.manual_seed(cfg.seed * 100_003 + step)  # dropout masks (PyTorch's own)

            t0 = time.time()
            # the step's loss: the token losses of the whole global batch / their number,
            # however it is cut into micro-batches (as train_default_lora.optimizer_step)
            n_total = count_supervised([data.train_features[i] for i in batch])
            loss_sum, n_tok = 0.0, sum(len(data.train_features[i].input_ids) for i in batch)
            for idx in filter(None, rank_share(batch, 1, 0, cfg.grad_accum)):
                b = collate([data.train_features[i] for i in idx])
                n = int((b["targets"] != IGNORE_INDEX).sum())
                loss = batch_loss(model, b)
                (loss * (n / n_total)).backward()
                loss_sum += loss.item() * n
            loss_sum /= n_total
            if not math.isfinite(loss_sum):
                raise SystemExit(f"loss is {loss_sum} at step {step + 1} (epoch {epoch + 1}); stopping; "
                                 f"try a lower --lr.")
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step, done = step + 1, done + 1

            dt, tokens_seen = time.time() - t0, tokens_seen + n_tok
            loss_ema = loss_sum if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_sum
            append_line(out / "train_loss.txt", f"{step}\t{loss_sum:.6f}")
            append_line(out / "metrics.jsonl", json.dumps({
                "step": step, "epoch": epoch + 1, "loss": round(loss_sum, 6), "lr": lr,
                "tokens_per_s": round(n_tok / dt, 1), "elapsed_s": round(time.time() - t_start, 2)}))
            bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / (time.time() - t_start):.0f}")
            bar.update(1)

            if step % cfg.eval_interval == 0 or step == total:
                val = evaluate_loss(model, data.eval_batches)
                append_line(out / "val_loss.txt", f"{step}\t{val:.6f}")
                log(f"step {step}: train loss {loss_ema:.4f}, held-out loss {val:.4f}")
            if step in save_adapter_at:  # for step-by-step comparisons (--adapter-steps)
                save_adapter(model, cfg, out / f"adapter-step{step}")
            if done >= len(order):
                epoch, done = epoch + 1, 0

    # --- finish: the adapter, EM/F1, the curves
    model.eval()
    save_adapter(model, cfg, out / "adapter")
    log(f"adapter saved to {out / 'adapter'} (PEFT format)")
    score_run(GreedyGenerator(model), tokenizer, cfg, data, out)
    plot_runs([out], out / "curves.png")
    log(f"done: {out}/ holds adapter-step0/, adapter/, train_loss.txt, val_loss.txt, metrics.jsonl, "
        f"config.json, predictions.json, scores.json, curves.png")
    return out


def append_line(path, text):
    with open(path, "a") as f:
        f.write(text + "\n")


def parse_dtype(argv):
    """(dtype, the other arguments): --dtype is this script's own option."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args, rest = p.parse_known_args(argv)
    return args.dtype, rest


if __name__ == "__main__":
    dtype, argv = parse_dtype(sys.argv[1:])
    cfg, resume = parse_args(argv, description=__doc__.split("\n")[0] + " Also: --dtype float32 (default) or "
                             "float64: the same run in double precision, the yardstick for float32 rounding.")
    if torch is None:
        print(f"error: no module named {MISSING!r}. {INSTALL}", file=sys.stderr)
        sys.exit(2)
    if resume:
        print("error: the PyTorch reference writes no checkpoints and cannot --resume; run it again "
              "from the start", file=sys.stderr)
        sys.exit(2)
    try:
        train(cfg, dtype=dtype)
    except UsageError as e:  # exit codes as train_default_lora.py: 2 usage, 1 data
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
