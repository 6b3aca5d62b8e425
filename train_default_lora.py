"""Fine-tune GPT-2 with LoRA on SQuAD v1.1 in Jittor: loss on the answer tokens only.

Ready to paste:
    python train_default_lora.py --demo                       # offline, small random GPT-2 (`make demo`)
    python train_default_lora.py                              # GPT-2 124M + official SQuAD (downloads when online)
    python train_default_lora.py --model gpt2-medium --train-file TRAIN.json --eval-file DEV.json \
        --output-dir checkpoints/run1
    python train_default_lora.py --output-dir checkpoints/run1 --resume     # continue after a stop
    OMP_NUM_THREADS=1 mpirun -np 2 python train_default_lora.py --demo       # 2 processes (README: MPI)

Writes into --output-dir: config.json (this run's settings), train_loss.txt / val_loss.txt
(step<TAB>loss), metrics.jsonl, adapter-step0/ (the starting adapter; adapter-step<N>/ after
the steps of --adapter-steps), checkpoint-<step>/
(PEFT adapter + optimizer state, written atomically, with checksums), adapter/ (the final
PEFT-format adapter), base_model/ (with --random-base), predictions.json and scores.json
(SQuAD EM/F1 by greedy generation), curves.png; .lock while it runs.

A run killed at any moment continues with --resume and ends with exactly the adapter and
logs of an uninterrupted run; --resume after training finished redoes only the final phase.
Ctrl-C / SIGTERM save a checkpoint at the end of the step and stop. Exit codes: 0 done,
1 data error (a missing, malformed or damaged file; a failed write; the folder in use),
2 usage error (a value out of range, --resume with nothing to resume or other settings),
130 / 143 stopped by SIGINT / SIGTERM. See train_state.py for how.

train() runs three phases: prepare() (checks, model, data, optimizer, restore), train_loop()
(one flat loop: data, lr, forward/backward, log, eval, checkpoint) and finish() (the final
adapter, EM/F1, curves).

Under mpirun every process (rank) trains on its share of each global batch of
--batch-size x --grad-accum x processes examples and the gradients are summed once per
step (distributed.py); the result is the same as one process with the same global batch.
Only rank 0 writes files (and holds the lock) and prints.
"""
# ----------------------------------------------------------------------------
# Imports. --help first answers without Jittor (whose first import on a machine compiles
# its core for minutes). Then Jittor comes in once, here, through jittor_env (CPU or CUDA,
# oneDNN found offline), which says so before a first compile.
import json
import math
import os
import signal
import sys
import time
import traceback

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    from training.train_config import parse_args
    parse_args(description=__doc__.split("\n")[0])  # prints the help and exits
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from backend.jittor_env import jt
from backend import distributed
from GPT2_jittor import GPT
from gpt2_config import parse_shape
from training.init_weights import base_model_dir, save_random_gpt2
from LoRA import LoRAConfig
from lora_models import LoRAGPT
from backend.mixed_precision import LossScaler
from backend import runtime
from gpt2_lora_dataset import Data, batches, collate, count_supervised, load_data, rank_share
from model_utils import IGNORE_INDEX, atomic_write_json, load_tokenizer
from plot_loss import plot_runs
from test_generation import answer_questions, score_run
from training.tensorboard_log import NoLog, TensorBoardLog
from training.train_config import (DEMO_OVERRIDES, RESUME_MAY_CHANGE, TrainConfig, UsageError, adapter_steps, check,
                          learning_rate, lora_targets, parse_args, read_saved_config, set_learning_rate, total_steps)
from training.train_state import (LOGS, RunLock, StopSignals, Stopped, append_line, checkpoint_path, clear_folder,
                         latest_checkpoint, list_checkpoints, load_into, prune_checkpoints, read_checkpoint,
                         remove_leftovers, restore_checkpoint, save_checkpoint, stop_at, truncate_log, write_folder,
                         writing)

# ----------------------------------------------------------------------------
# Small pieces

def log(msg):
    if distributed.is_main:  # one process speaks for all
        tqdm.write(msg, file=sys.stderr)  # above the progress bar, not through it


def evaluate_loss(model, batches_):
    """Token-weighted mean answer loss over the given batches, dropout off. Under MPI rank r
    takes batches r, r + W, ... and the sums are added over the ranks: the same batches and
    the same mean as one process."""
    model.eval()
    total, count = 0.0, 0
    with jt.no_grad():
        for b in batches_[distributed.rank::distributed.world_size]:
            n = int((b["targets"] != IGNORE_INDEX).sum())
            _, loss = model(jt.array(b["input_ids"]), jt.array(b["targets"]), attention_mask=jt.array(b["attention_mask"]))
            total, count = total + loss.item() * n, count + n
    model.train()
    total, count = distributed.sum_over_ranks([total, count])
    return total / max(count, 1)


# ----------------------------------------------------------------------------
# Phase 1: prepare a run

@dataclass
class Run:
    """What the phases share: the model, optimizer and data, and where the run stands."""
    cfg: TrainConfig
    out: Path                 # the output folder
    model: LoRAGPT
    tokenizer: object
    opt: object               # jt.optim.AdamW over the LoRA tensors
    data: Data
    total: int                # optimizer steps of the whole run
    global_batch: int         # examples per optimizer step: batch_size x grad_accum x processes
    scaler: LossScaler = None # fp16: dynamic loss scaling (None in other precisions)
    report: object = None     # TensorBoardLog (--report-to tensorboard, rank 0) or NoLog
    step: int = 0             # optimizer steps done
    epoch: int = 0            # the epoch the next step is in (0-based)
    batches: int = 0          # global batches of that epoch done
    stop: StopSignals = field(default_factory=StopSignals)  # set by Ctrl-C / SIGTERM while train() runs


def prepare(cfg, resume):
    """Everything the first step needs (cfg checked, the folder locked); a resumed run continues
    from its newest good checkpoint."""
    out = Path(cfg.output_dir)
    if distributed.is_main:
        open_output_dir(cfg, resume)
    distributed.barrier()  # the folder is ready (or rank 0 stopped with a message, and mpirun stops all)
    model, base_dir = build_model(cfg, out)
    if cfg.max_length > model.config.n_positions:
        raise UsageError(f"--max-length must be at most the base model's n_positions = {model.config.n_positions}, "
                         f"not {cfg.max_length}")
    tokenizer = load_tokenizer(base_dir)
    data = load_data(cfg, tokenizer)
    if distributed.is_main:
        model.print_trainable_parameters()
    # torch.optim.AdamW semantics (decoupled decay, eps outside the sqrt): checked against
    # PyTorch step by step in tests/test_lora_peft.py. LoRA+: PEFT's two groups (A; B and
    # DoRA's magnitude at lr x ratio), tests/test_lora_variants.py.
    params = (model.loraplus_param_groups(cfg.lr, cfg.loraplus_lr_ratio, cfg.weight_decay)
              if cfg.loraplus_lr_ratio else model.trainable_parameters())
    opt = jt.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-8,
                         betas=(0.9, 0.999))
    global_batch = cfg.batch_size * cfg.grad_accum * distributed.world_size
    per_epoch = math.ceil(len(data.train_features) / global_batch)
    total = total_steps(cfg, per_epoch)
    log(f"global batch: {global_batch} examples per optimizer step (--batch-size {cfg.batch_size} x "
        f"--gradient-accumulation-steps {cfg.grad_accum} x {distributed.world_size} process(es)); "
        f"{per_epoch} steps per epoch")
    log(run_size(cfg, data, total, per_epoch, model))
    scaler = LossScaler() if runtime.precision_of(model) == "fp16" else None
    run = Run(cfg, out, model, tokenizer, opt, data, total, global_batch, scaler)
    restore(run, resume)
    # TensorBoard (rank 0): a resumed run first drops the events from its first redone step on
    run.report = TensorBoardLog(out / "runs", purge_step=run.step + 1 if resume else None) \
        if cfg.report_to == "tensorboard" and distributed.is_main else NoLog()
    distributed.check_same_on_all_ranks(model.trainable_parameters(), "LoRA weights")
    if run.step == 0 and distributed.is_main:  # the starting point, to compare with train_pytorch_lora.py's
        write_folder(out / "adapter-step0", model.save_lora_weights)
    return run


def run_size(cfg, data, total, per_epoch, model):
    """The run's size in one line, before its first step: examples, epochs, optimizer steps,
    held-out evaluations, checkpoints and their disk use, tokens."""
    n = len(data.train_features)
    evals = 1 + total // cfg.eval_interval + (total % cfg.eval_interval != 0)  # + the one at step 0
    ckpts = total // cfg.save_interval + (total % cfg.save_interval != 0)
    kept = min(ckpts, cfg.keep_checkpoints) if cfg.keep_checkpoints else ckpts
    # a checkpoint holds the LoRA tensors and AdamW's two moments, in float32
    ckpt_mb = 3 * 4 * sum(int(math.prod(p.shape)) for p in model.trainable_parameters()) / 1e6
    tokens = sum(len(f.input_ids) for f in data.train_features) * total / per_epoch
    epochs = f"{total / per_epoch:.3g} epochs (--max-steps {cfg.max_steps})" if total < per_epoch * cfg.epochs \
        else f"{cfg.epochs} epoch(s)"
    return (f"this run: {n:,d} training examples x {epochs} = {total:,d} optimizer steps, ~{tokens:,.0f} "
            f"tokens; {evals:,d} held-out evaluations ({len(data.eval_batches)} batches each, every "
            f"{cfg.eval_interval} steps); {ckpts:,d} checkpoint(s) (every {cfg.save_interval} steps, "
            f"{kept} kept, ~{ckpt_mb:.3g} MB each, ~{kept * ckpt_mb:.3g} MB on disk)")


def time_left(seconds):
    """3 d 4 h, 2 h 05 min, 4 min 10 s."""
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s"


def restore(run, resume):
    """Resuming: the weights, AdamW moments and data position of the newest good checkpoint
    (damaged ones are reported and skipped), and in fp16 the loss scale. Either way the logs
    are left holding only the steps done (a resumed run re-does later ones). Under MPI rank 0
    verifies the checkpoints, moves damaged ones aside and chooses; every other rank loads the
    one it chose."""
    state = None
    if resume:
        if distributed.is_main:
            state = restore_checkpoint(run.out, run.model, run.opt, log, run.scaler)
        chosen = distributed.all_gather(state and state["step"])[0]  # rank 0's choice (None: no checkpoint)
        if not distributed.is_main and chosen is not None:
            tensors, state = read_checkpoint(checkpoint_path(run.out, chosen), run.model)
            load_into(run.model, run.opt, tensors)
            if run.scaler is not None:
                run.scaler.load_state_dict(state["loss_scaler"])
    if state is not None:
        # The data position counts global batches of the epoch; the epoch's global batches are
        # the same only for the same global batch size (split any way into micro-batches and processes).
        if state["global_batch"] != run.global_batch:
            raise UsageError(f"{run.out}: the run trained with a global batch of {state['global_batch']} examples "
                             f"and this one has {run.global_batch} (--batch-size {run.cfg.batch_size} x --grad-accum "
                             f"{run.cfg.grad_accum} x {distributed.world_size} process(es)); resume with the same "
                             f"global batch, split any way")
        run.step, run.epoch, run.batches = state["step"], state["epoch"], state["batches"]
    elif resume:
        log(f"{run.out}: no checkpoint yet; starting again from step 0")
    if not distributed.is_main:
        return
    for name in LOGS:
        if run.step == 0:
            with writing(run.out / name):
                (run.out / name).unlink(missing_ok=True)
        else:
            truncate_log(run.out / name, run.step, is_json=name.endswith(".jsonl"), warn=log)
    stop_at("restored", run.step)


def open_output_dir(cfg, resume):
    """The (locked) output folder with this run's config.json; a resumed run must be the same
    run, and a new run must not mix with an old run's checkpoints."""
    out = Path(cfg.output_dir)
    if cfg.demo and not resume and out == Path(DEMO_OVERRIDES["output_dir"]):
        clear_folder(out)  # `make demo` twice: the demo always starts afresh in its own folder
    remove_leftovers(out)
    config_file = out / "config.json"
    if resume:
        old = read_saved_config(config_file)
        changed = {k for k, v in asdict(cfg).items() if k not in RESUME_MAY_CHANGE and old.get(k) != v}
        if changed:
            raise UsageError(f"{config_file}: --resume with different settings "
                             f"({', '.join(f'{k}: {old.get(k)} -> {getattr(cfg, k)}' for k in sorted(changed))})")
    if not resume and list_checkpoints(out):
        raise UsageError(f"{out} already holds checkpoints: pass --resume to continue, or another --output-dir")
    with writing(config_file):
        atomic_write_json(config_file, asdict(cfg))
    return out


def build_model(cfg, out):
    """(LoRAGPT, base model folder): GPT-2 from --model, or a random one (--random-base), with adapters."""
    # a random base is drawn once, by rank 0, before any rank loads it
    save = save_base_model if distributed.is_main else (lambda *args: None)
    base_dir = base_model_dir(cfg, out, log, save=save)
    distributed.barrier()
    lora_cfg = LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, **lora_targets(cfg),
                          init=cfg.init, use_rslora=cfg.rslora, use_dora=cfg.use_dora,
                          qkv=(True, False, True) if cfg.qv_only else (True, True, True))
    # A drawn from NumPy by (--seed, module name): the same start as train_pytorch_lora.py's,
    # and the same on every rank
    dropout = {} if cfg.model_dropout is None else \
        {k: cfg.model_dropout for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}  # GPT-2's own
    model = LoRAGPT(GPT.from_pretrained(base_dir, **dropout), lora_cfg, seed=cfg.seed)
    # device, precision, and the fused CPU kernels where they run
    model = runtime.prepare(model, cfg.device, cfg.precision)
    log(runtime.describe(model))
    # the name the user gave (a hub id stays a hub id, as in PEFT's adapter_config.json)
    model.base_model_name_or_path = str(base_dir) if cfg.random_base else cfg.model
    return model, base_dir


def save_base_model(base_dir, config, seed):
    """--random-base: the random GPT-2 (init_weights, NumPy), written whole or not at all."""
    write_folder(base_dir, lambda tmp: save_random_gpt2(tmp, config, seed), stop="base_model")


# ----------------------------------------------------------------------------
# Phase 2: the training loop

ETA_AFTER = 5  # the time to finish is estimated after this many steps


def train_loop(run, stop_after=None, progress=True):
    """Optimizer steps from run.step to run.total. Returns False when stop_after (a step
    number) cut the run short, as if interrupted, True when it ran to the end."""
    cfg, model, out, data = run.cfg, run.model, run.out, run.data
    main = distributed.is_main  # the one rank that writes logs and checkpoints
    save_adapter_at = adapter_steps(cfg)
    if run.step == 0:  # the starting point of the held-out curve
        val = evaluate_loss(model, data.eval_batches)
        if main:
            append_line(out / "val_loss.txt", f"0\t{val:.6f}")
            run.report.scalars(0, {"eval/loss": val})
    model.train()
    t_start, tokens_seen, loss_ema, order, order_epoch = time.time(), 0, None, None, None
    first_step, t_second = run.step, time.time()
    with tqdm(total=run.total, initial=run.step, desc="train", unit="step", disable=not (progress and main),
              dynamic_ncols=True) as bar:
        while run.step < run.total and run.epoch < cfg.epochs:
            # --- data: the next global batch (all micro-batches of all ranks). Every epoch has its
            # own order, fixed by (seed, epoch) and the global batch size only, so a resumed run
            # skips to exactly the batches it would have seen, with any number of processes.
            if order_epoch != run.epoch:
                order, order_epoch = batches(data.train_features, run.global_batch, cfg.seed, run.epoch,
                                             bucket=cfg.bucket), run.epoch
            batch = order[run.batches]

            # --- learning rate
            lr = learning_rate(run.step, cfg, run.total)
            set_learning_rate(run.opt, lr)

            # --- forward / backward, one AdamW step
            t0 = time.time()
            loss, n_tok = optimizer_step(run, batch)
            run.step, run.batches = run.step + 1, run.batches + 1
            stop_at("step", run.step)

            # --- log (tokens: real tokens of the global batch)
            dt, tokens_seen = time.time() - t0, tokens_seen + n_tok
            loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
            if run.step - first_step == ETA_AFTER and main:
                per_step = (time.time() - t_second) / max(1, run.step - first_step - 1)
                log(f"{per_step:.3g} s per step over steps {first_step + 2}-{run.step}: the {run.total - run.step:,d} "
                    f"steps left take about {time_left(per_step * (run.total - run.step))} (+ evaluations)")
            if run.step == first_step + 1:
                t_second = time.time()  # the first step compiles: the estimate starts after it
            if main:
                run.report.scalars(run.step, {"train/loss": loss, "train/learning_rate": lr,
                                              "train/tokens_per_s": n_tok / dt})
                append_line(out / "train_loss.txt", f"{run.step}\t{loss:.6f}")
                append_line(out / "metrics.jsonl", json.dumps({
                    "step": run.step, "epoch": run.epoch + 1, "loss": round(loss, 6), "lr": lr,
                    "tokens_per_s": round(n_tok / dt, 1), "elapsed_s": round(time.time() - t_start, 2)}))
            bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / (time.time() - t_start):.0f}")
            bar.update(1)

            # --- held-out loss, then the checkpoint (which records where the next step starts)
            if run.step % cfg.eval_interval == 0 or run.step == run.total:
                val = evaluate_loss(model, data.eval_batches)
                if main:
                    append_line(out / "val_loss.txt", f"{run.step}\t{val:.6f}")
                    run.report.scalars(run.step, {"eval/loss": val})
                log(f"step {run.step}: train loss {loss_ema:.4f}, held-out loss {val:.4f}")
            if main and run.step in save_adapter_at:  # for step-by-step comparisons (--adapter-steps)
                write_folder(out / f"adapter-step{run.step}", model.save_lora_weights)
            if run.batches >= len(order):  # end of the epoch
                run.epoch, run.batches = run.epoch + 1, 0
            # Ctrl-C / SIGTERM during this step, on any rank: checkpoint it, then stop. Under MPI
            # the ranks agree on the step (a signal seen by one rank stops all of them here).
            stop = distributed.max_over_ranks(run.stop.signum or 0)
            if main and (run.step % cfg.save_interval == 0 or run.step == run.total or stop):
                ckpt = save_checkpoint(out, model, run.opt, {"step": run.step, "epoch": run.epoch, "batches": run.batches,
                                                             "global_batch": run.global_batch}, run.scaler)
                prune_checkpoints(out, cfg.keep_checkpoints, ckpt)  # only now that the new one is verified
            if stop:
                distributed.barrier()  # no rank exits (and mpirun kills the job) before the checkpoint is written
                raise Stopped(stop, f"stopped by {signal.Signals(stop).name} after step {run.step} of {run.total}; "
                                    f"{checkpoint_path(out, run.step)} holds it. Continue with: python "
                                    f"train_default_lora.py --output-dir {out} --resume")
            if stop_after is not None and run.step >= stop_after:
                return False
    return True


def optimizer_step(run, batch):
    """Forward/backward over this rank's micro-batches of the global batch `batch` (example
    indices), the gradients summed over the ranks once, clipping, one AdamW step. Returns
    (the step's loss, real tokens of the global batch).

    The step's loss is the sum of the token losses over every supervised token of the global
    batch divided by their number, however the batch is split into micro-batches and
    processes (transformers' num_items_in_batch): each micro-batch's mean loss is weighted by
    its share of those tokens, and the ranks' gradients are summed. In fp16 the loss is
    scaled and a step whose gradients are not finite is skipped (run.scaler,
    torch.amp.GradScaler's rule)."""
    cfg, model, opt, scaler, features = run.cfg, run.model, run.opt, run.scaler, run.data.train_features
    n_total = count_supervised([features[i] for i in batch])  # every rank sees the whole global batch
    mine = [idx for idx in rank_share(batch, distributed.world_size, distributed.rank, cfg.grad_accum) if idx]
    # Dropout masks: a seed per step, so a resumed run draws what an uninterrupted one draws,
    # keyed by (step seed, example, position) on the fused and the plain path alike
    # (token_dropout.py): the same in every micro-batch and rank.
    step_seed = (cfg.seed * 100_003 + run.step) % 2 ** 31  # Jittor's seeds are 31-bit
    jt.set_global_seed(step_seed)
    loss_sum = 0.0
    with distributed.no_sync():  # accumulate here; one all-reduce below
        for idx in mine:
            b = collate([features[i] for i in idx])
            n = int((b["targets"] != IGNORE_INDEX).sum())
            with runtime.dropout_keys(model, idx, b["attention_mask"], step_seed):
                _, loss = model(jt.array(b["input_ids"]), jt.array(b["targets"]),
                                attention_mask=jt.array(b["attention_mask"]))
            part = loss * (n / n_total)
            opt.backward(part if scaler is None else scaler.scale_loss(part))
            materialise_grads(opt, loss)
            loss_sum += loss.item() * n
        if not mine:  # a short last batch left this rank nothing: it adds zero gradients
            opt.backward(sum(p.sum() for p in model.trainable_parameters()) * 0.0)
    loss_sum, = distributed.all_reduce_grads(opt, [loss_sum])
    loss = loss_sum / n_total
    if not math.isfinite(loss):  # the same value on every rank: they all stop here
        raise SystemExit(f"loss is {loss} at step {run.step + 1} (epoch {run.epoch + 1}); stopping. "
                         f"The last good checkpoint is {latest_checkpoint(run.out) or 'none'}; try a lower --lr.")
    # on the summed gradient, the same on every rank; fp16: the gradients / scale, all finite
    if scaler is None or scaler.unscale_(opt):
        if cfg.clip > 0:
            clip_grad_norm(opt, cfg.clip)
        # Jittor counts backward() calls in n_step; AdamW's bias correction must count
        # optimizer steps taken (as torch does), which differ under gradient accumulation and
        # after steps the loss scaler skipped.
        opt.n_step = run.step + 1 - (scaler.skipped_steps if scaler else 0)
    else:
        log(f"step {run.step + 1}: gradients not finite at loss scale {scaler.scale:g}: step skipped")
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)  # skipped when a gradient was not finite
        scaler.update()
    return loss, sum(len(features[i].input_ids) for i in batch)


def materialise_grads(opt, *also):
    """Run the backward of the micro-batch just given to opt.backward() now. Jittor's gradients
    are lazy: opt.backward() only records `grad += this micro-batch's gradient`, and each
    pending sum keeps its micro-batch's whole graph (activations included) alive until
    opt.step(), so memory grew with --grad-accum (loss.item() runs only the forward; Jittor
    issue 602). The same operations run, only earlier (Jittor fuses them differently, so the
    gradients can differ in float32 rounding: tests/test_gpu_path.py measures it)."""
    jt.sync([*also, *(g for pg in opt.param_groups for g in pg.get("grads", ()))])


def clip_grad_norm(opt, max_norm):
    """Scale the gradients of `opt` so that their global 2-norm is at most max_norm: torch's
    clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), at most 1), with the squares summed
    in float64. Jittor's Optimizer.clip_grad_norm sums them in one float32 running sum, over
    1.2 million LoRA gradients for GPT-2 124M at r=8: ~1e-3 off, which does not change AdamW's
    first step (it divides the scale out) but weighs every later step's gradient against the
    earlier ones wrongly by as much. The alignment run against PyTorch found it."""
    grads = [g for pg in opt.param_groups for p, g in zip(pg["params"], pg["grads"]) if not p.is_stop_grad()]
    if not grads:
        return
    norm = jt.sqrt(sum((g.float64() * g.float64()).sum() for g in grads))
    coef = jt.minimum(max_norm / (norm + 1e-6), 1.0).float32()
    for g in grads:
        g.update(g * coef)


# ----------------------------------------------------------------------------
# Phase 3: finish

def finish(run):
    """The final adapter, SQuAD EM/F1 by greedy generation, the loss curves (files: rank 0)."""
    out = run.out
    run.model.eval()
    if distributed.is_main:
        write_folder(out / "adapter", run.model.save_lora_weights, stop="finish:adapter")  # whole or not at all
    log(f"adapter saved to {out / 'adapter'} (PEFT format)")
    final_scores(run)
    if distributed.is_main:
        stop_at("finish:curves")
        try:
            plot_runs([out], out / "curves.png")
            log(f"loss curves: {out / 'curves.png'}")
        except Exception as e:  # a plotting problem must not cost the finished run
            log(f"warning: could not plot the curves ({e})")
    distributed.barrier()  # no rank ends before rank 0's files are written
    log(f"done: {out}/ holds adapter/ (PEFT format), checkpoint-*/, train_loss.txt, val_loss.txt, "
        f"metrics.jsonl, config.json, predictions.json, scores.json, curves.png")


def final_scores(run):
    """SQuAD EM/F1 by greedy generation (test_generation.score_run), each file written
    atomically. Under MPI each rank answers every W-th batch and rank 0 gathers the answers:
    the same batches, so the same answers, as one process."""
    cfg = run.cfg

    def answer(examples):  # None on the ranks that do not write
        mine = answer_questions(run.model, run.tokenizer, examples, batch_size=cfg.batch_size,
                                max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                                shard=(distributed.rank, distributed.world_size), progress=distributed.is_main)
        answers = {k: v for part in distributed.all_gather(mine) for k, v in part.items()}
        return {ex.id: answers[ex.id] for ex in examples} if distributed.is_main else None

    def save(path, obj):
        stop_at("finish:scores" if path.name == "scores.json" else "finish:predictions")
        with writing(path):
            atomic_write_json(path, obj)
        if path.name == "scores.json":  # eval/exact_match ..., train/f1 at the last step
            run.report.scalars(run.step, {f"{'eval' if split == 'heldout' else 'train'}/{k}": v
                                          for split, s in obj.items() for k, v in s.items() if k != "questions"})
    score_run(run.model, run.tokenizer, cfg, run.data, run.out, save=save, answer=answer)


# ----------------------------------------------------------------------------

def train(cfg, resume=False, stop_after=None, progress=True):
    """Run training; returns the output folder. stop_after=N stops after optimizer step N
    as if interrupted (used by the resume tests)."""
    check(cfg)
    if cfg.random_base:
        try:  # a bad shape is a usage error, found before anything is written
            parse_shape(cfg.random_base)
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:  # the device and precision can run here (tf32 needs CUDA, --device cuda a usable GPU)
        runtime.resolve(cfg.device, cfg.precision)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    out = Path(cfg.output_dir)
    if resume and not (out / "config.json").is_file():
        raise UsageError(f"{out}: nothing to resume (no config.json of a run there); leave out --resume to start one")
    with RunLock(out, log=log) if distributed.is_main else nullcontext():  # one lock for all ranks
        run = prepare(cfg, resume)
        try:
            with run.stop:
                done = train_loop(run, stop_after, progress)
            if done:
                finish(run)
        finally:
            run.report.close()
    return run.out


def stop_now(signum, frame):
    """SIGINT / SIGTERM outside the training loop (which saves a checkpoint first): stop at once."""
    raise Stopped(signum, f"stopped by {signal.Signals(signum).name}; the checkpoints are intact and --resume "
                          f"continues from the newest (after training, it redoes the final phase)")


def main(argv=None):
    """The command line; returns the exit code (see the module doc): one line on stderr for
    every error, and its full traceback with --debug (or GPT2_LORA_DEBUG=1)."""
    saved = {s: signal.signal(s, stop_now) for s in (signal.SIGINT, signal.SIGTERM)}
    debug = "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("GPT2_LORA_DEBUG") == "1"
    try:
        cfg, resume = parse_args(argv, description=__doc__.split("\n")[0])
        train(cfg, resume=resume)
    except Stopped as e:
        distributed.say(str(e))
        return e.exit_code
    except UsageError as e:
        distributed.say(traceback.format_exc().rstrip() if debug else f"error: {e}")
        return 2
    except (OSError, ValueError, RuntimeError) as e:  # data errors, failed writes, the folder in use
        distributed.say(traceback.format_exc().rstrip() if debug else f"error: {e}")
        return 1
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(distributed.run_main(main))  # under mpirun: an error on one rank stops them all
