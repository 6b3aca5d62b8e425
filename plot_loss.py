"""Plot training/validation loss curves of one or more training runs into an image.

Each RUN_DIR is a training output folder with `train_loss.txt` and, optionally,
`val_loss.txt`: one record per line, `step<TAB>loss`; `#` header lines and blank
lines are skipped; a line with a single number is a loss whose step is its 1-based
index among the data lines (how the old seed script wrote it).

    python plot_loss.py                                   # every run under checkpoints/ -> checkpoints/curves.png
    python plot_loss.py checkpoints/run1 -o curves.png
    python plot_loss.py checkpoints/r4 checkpoints/r16 -o curves.png --labels "rank 4,rank 16" --smooth 0.95
    python plot_loss.py checkpoints/run1 -o curves.svg --title "GPT-2 LoRA on SQuAD"
    python plot_loss.py checkpoints/align-jittor checkpoints/align-pytorch --align -o docs/alignment.png

--align compares two runs of the same training (train_default_lora.py and its PyTorch
reference train_pytorch_lora.py): both curves overlaid, a panel with the per-step relative
difference |a - b| / max(|a|, |b|), and a printed summary (max / median relative difference
of the training and held-out losses, the relative difference of the step-0 and final
adapters, each run's training time from metrics.jsonl). With
dropout on (the run's config.json: --dropout > 0, or base-model dropouts > 0) the two runs
draw different dropout masks, so the panel compares the EMA-smoothed training curves and
says so.

Headless: draws with matplotlib's Agg canvas (no pyplot, no display needed).
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gpt2_config import GPTConfig, parse_shape
from model_utils import atomic_write, load_safetensors

X_LABEL = "optimizer step"
Y_LABEL = "loss (answer tokens, nats)"
RUNS_ROOT = Path("checkpoints")   # where the training scripts put their runs by default
ZERO_FLOOR = 1e-9                 # a relative difference of 0 is drawn here on the log axis


def read_loss_file(path):
    """(steps, losses) from a loss file; ValueError naming file and line if malformed.

    Every record ends with a newline, so a last line without one is torn (a power cut or a
    full disk mid-write, or a run writing it right now): skipped with a warning on stderr.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    steps, losses = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                print(f"warning: {path}:{lineno}: torn last line {line!r} skipped", file=sys.stderr)
                break
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            try:
                if len(fields) == 1:
                    step, loss = len(losses) + 1, float(fields[0])
                elif len(fields) == 2:
                    step, loss = int(fields[0]), float(fields[1])
                else:
                    raise ValueError(f"{len(fields)} fields")
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'step<TAB>loss' or 'loss', "
                                 f"got {line.rstrip()!r}") from None
            steps.append(step)
            losses.append(loss)
    return steps, losses


def smooth_ema(values, weight):
    """Exponential moving average with bias correction (as TensorBoard's smoothing).

    Without the correction the curve starts near 0, since the average starts empty.
    Non-finite values (a diverged step) are skipped so they do not poison the rest.
    """
    out, ema, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            ema = weight * ema + (1 - weight) * v
            n += 1
        out.append(ema / (1 - weight ** n) if n else float("nan"))
    return out


def read_run(d):
    """((steps, losses) of training, (steps, losses) of held-out evaluation) of a run folder."""
    d = Path(d)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: run folder not found")
    train = read_loss_file(d / "train_loss.txt")
    if not train[0]:
        raise ValueError(f"{d / 'train_loss.txt'}: no loss records")
    val_file = d / "val_loss.txt"
    return train, read_loss_file(val_file) if val_file.is_file() else ([], [])


def image_format(fig, out_path):
    fmt = Path(out_path).suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ValueError(f"{out_path}: unsupported image format '.{fmt}' (use .png, .svg or .pdf)")
    return fmt


def plot_runs(run_dirs, out_path, smooth=0.9, labels=None, title=None):
    """Draw every run's losses into one image at out_path (format from its suffix); returns
    the matplotlib Figure, so a caller (or a test) can read what was drawn."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("no run folder given")
    if labels is None:
        labels = [d.resolve().name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run folders")
    if not 0 <= smooth < 1:
        raise ValueError(f"--smooth must be in [0, 1), got {smooth}")
    runs = [read_run(d) for d in run_dirs]  # everything read first: a bad file fails before any drawing

    fig = Figure(figsize=(9, 5.5), dpi=120, layout="constrained")
    fmt = image_format(fig, out_path)
    ax = fig.add_subplot()
    for i, ((steps, losses), (val_steps, val_losses)) in enumerate(runs):
        color = f"C{i % 10}"
        ax.plot(steps, losses, color=color, linewidth=0.8, alpha=0.3)
        if smooth > 0:
            ax.plot(steps, smooth_ema(losses, smooth), color=color, linewidth=1.8)
        if val_steps:
            ax.plot(val_steps, val_losses, color=color, linestyle="--", linewidth=1.2,
                    marker="o", markersize=4)

    # Legend: colour = run, line style = kind of curve; one entry each, not runs x kinds.
    handles = [Line2D([], [], color=f"C{i % 10}", linewidth=2.5, label=label)
               for i, label in enumerate(labels)]
    handles.append(Line2D([], [], color="gray", linewidth=0.8, alpha=0.5, label="train (raw)"))
    if smooth > 0:
        handles.append(Line2D([], [], color="gray", linewidth=1.8, label=f"train (EMA {smooth:g})"))
    if any(val[0] for _, val in runs):
        handles.append(Line2D([], [], color="gray", linestyle="--", marker="o", markersize=4,
                              label="validation"))
    ax.legend(handles=handles, loc="upper right", framealpha=0.9)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    atomic_write(out_path, lambda f: fig.savefig(f, format=fmt), mode="wb")
    return fig


# ----------------------------------------------------------------------------
# Two runs of the same training, compared (--align)

def relative_difference(a, b):
    """|a - b| / max(|a|, |b|), 0 where both are 0."""
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale else 0.0


def dropout_on(run_dir):
    """Whether a run trained with any dropout (LoRA's or the base model's own), from its
    config.json; None when that cannot be told (no config.json, base model not found)."""
    config_file = Path(run_dir) / "config.json"
    if not config_file.is_file():
        return None
    cfg = json.loads(config_file.read_text())
    if cfg.get("dropout", 0) > 0:
        return True
    if cfg.get("random_base"):
        base = GPTConfig(**parse_shape(cfg["random_base"]))
        base = {"resid_pdrop": base.resid_pdrop, "embd_pdrop": base.embd_pdrop, "attn_pdrop": base.attn_pdrop}
    else:  # a pretrained base: its own config.json (GPT-2's has 0.1 everywhere)
        base_config = Path(cfg.get("model", "gpt2")) / "config.json"
        if not base_config.is_file():
            return None
        base = json.loads(base_config.read_text())
    return any(base.get(k, 0.1) > 0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))


def training_time(run_dir):
    """Seconds from the first to the last training step's log line (metrics.jsonl elapsed_s:
    the loop with its held-out evaluations), or None without metrics.jsonl."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return None
    records = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return records[-1]["elapsed_s"] if records else None


def compare(curve_a, curve_b):
    """(steps both curves have, their relative differences) of two (steps, values) curves."""
    b = dict(zip(*curve_b))
    common = [(s, v) for s, v in zip(*curve_a) if s in b]
    return [s for s, _ in common], [relative_difference(v, b[s]) for s, v in common]


def adapter_line(run_a, run_b, name):
    """How far the two runs' adapters in <run>/<name>/ are apart: the largest over tensors of
    ||a - b|| / ||b|| (0 for equal tensors), or None when a run has no such adapter."""
    files = [Path(r) / name / "adapter_model.safetensors" for r in (run_a, run_b)]
    if not all(f.is_file() for f in files):
        return None
    a, b = (load_safetensors(f) for f in files)
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return f"{name}/: the two adapters hold different tensors"
    a = {k: v.astype(np.float64) for k, v in a.items()}  # a float64 reference run is compared too
    b = {k: v.astype(np.float64) for k, v in b.items()}
    rel = {k: float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), np.finfo(np.float32).tiny)) for k in a}
    worst = max(rel, key=rel.get)
    largest = max(float(np.abs(a[k] - b[k]).max(initial=0.0)) for k in a)
    return (f"{name}/: max ||a - b|| / ||b|| over {len(rel)} tensors {rel[worst]:.2e} ({worst}); "
            f"largest element difference {largest:.2e}")


def adapter_folders(run_a, run_b):
    """The adapter folders both runs have, in step order: adapter-step0/, adapter-step<N>/
    (--adapter-steps), adapter/ (the end)."""
    def steps(run):
        return {int(p.name[len("adapter-step"):]) for p in Path(run).glob("adapter-step*")
                if p.name[len("adapter-step"):].isdigit()}
    return [f"adapter-step{s}" for s in sorted(steps(run_a) & steps(run_b))] + ["adapter"]


def summary_line(what, steps, diffs):
    if not diffs:
        return f"{what}: no common steps"
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return (f"{what} ({len(diffs)} common steps): max relative difference {diffs[worst]:.2e} "
            f"(step {steps[worst]}), median {statistics.median(diffs):.2e}")


def align_runs(run_a, run_b, out_path, smooth=0.9, labels=None, title=None):
    """Overlay two runs' curves with a panel of their per-step relative difference; write the
    image to out_path. Returns (Figure, summary lines to print)."""
    run_a, run_b = Path(run_a), Path(run_b)
    labels = labels or [run_a.resolve().name, run_b.resolve().name]
    if len(labels) != 2:
        raise ValueError(f"{len(labels)} labels for 2 run folders")
    if not 0 < smooth < 1:
        raise ValueError(f"--smooth must be in (0, 1) with --align, got {smooth}")
    (train_a, val_a), (train_b, val_b) = read_run(run_a), read_run(run_b)
    dropout = [dropout_on(run_a), dropout_on(run_b)]
    masks_differ = any(d is not False for d in dropout)
    if masks_differ:  # masks differ: compare the trend, not the step-to-step noise of the masks
        train_a = (train_a[0], smooth_ema(train_a[1], smooth))
        train_b = (train_b[0], smooth_ema(train_b[1], smooth))
    steps, diffs = compare(train_a, train_b)
    val_steps, val_diffs = compare(val_a, val_b)
    kind = f"training loss, EMA {smooth:g}" if masks_differ else "training loss"
    lines = []
    if masks_differ:
        why = "dropout on" if True in dropout else "dropout settings unknown (no config.json or base model)"
        lines.append(f"{why}: the two runs draw different dropout masks, so the training curves are compared "
                     f"after EMA smoothing ({smooth:g})")
    lines += [summary_line(kind, steps, diffs), summary_line("held-out loss", val_steps, val_diffs)]
    lines += [line for line in (adapter_line(run_a, run_b, n) for n in adapter_folders(run_a, run_b)) if line]
    times = [training_time(d) for d in (run_a, run_b)]
    lines.append("training time (metrics.jsonl elapsed_s, held-out evaluations included): " + ", ".join(
        f"{label} {'unknown' if t is None else f'{t:.1f} s'}" for label, t in zip(labels, times)))

    fig = Figure(figsize=(9, 8), dpi=120, layout="constrained")
    fmt = image_format(fig, out_path)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    for (train, val), label, style in (((train_a, val_a), labels[0], dict(color="C0", linewidth=2.2)),
                                        ((train_b, val_b), labels[1], dict(color="C1", linewidth=1.0,
                                                                           linestyle="--"))):
        top.plot(*train, label=f"{label}: {kind}", **style)
        if val[0]:
            top.plot(*val, label=f"{label}: held-out", marker="o", markersize=4, **{**style, "linestyle": ":"})
    top.set_ylabel(Y_LABEL)
    top.legend(loc="upper right", framealpha=0.9)
    top.grid(True, alpha=0.3)
    top.set_title(title or f"{labels[0]} vs {labels[1]}")
    bottom.plot(steps, [max(d, ZERO_FLOOR) for d in diffs], color="C2", linewidth=1.0, label=kind)
    if val_diffs:
        bottom.plot(val_steps, [max(d, ZERO_FLOOR) for d in val_diffs], color="C3", marker="o", markersize=4,
                    linestyle=":", label="held-out loss")
    bottom.set_yscale("log")
    bottom.set_ylabel("relative difference |a - b| / max(|a|, |b|)")
    bottom.set_xlabel(X_LABEL)
    bottom.grid(True, alpha=0.3, which="both")
    bottom.legend(loc="upper left", framealpha=0.9)
    bottom.set_title("dropout on: different masks on the two sides; EMA-smoothed curves compared"
                     if masks_differ else f"per step (0 drawn at {ZERO_FLOOR:g})", fontsize=9)
    atomic_write(out_path, lambda f: fig.savefig(f, format=fmt), mode="wb")
    return fig, lines


# ----------------------------------------------------------------------------
# No run named: every run under checkpoints/

def find_runs(root=RUNS_ROOT):
    """Run folders directly under root that hold training records, oldest first (by the
    time of their last training record)."""
    runs = []
    for f in Path(root).glob("*/train_loss.txt"):
        try:
            if read_loss_file(f)[0]:
                runs.append(f.parent)
        except ValueError:
            continue  # a file that is not a loss log (a run being written, or something else)
    return sorted(runs, key=lambda d: (d / "train_loss.txt").stat().st_mtime)


def plot_checkpoints(out_path=None, smooth=0.9, root=RUNS_ROOT):
    """Every run under root in one figure, the newest named in the title (the bare
    `python plot_loss.py`). Returns (Figure, run folders, image path); FileNotFoundError
    saying how to make a run when there is none."""
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no training runs under {root}/ (folders holding train_loss.txt). Make one with "
                                f"`make demo` (python train_default_lora.py --demo, a few minutes on a CPU), "
                                f"then run python plot_loss.py again.")
    out_path = out_path or Path(root) / "curves.png"
    title = f"{len(runs)} run{'s' if len(runs) > 1 else ''} under {root}/ (newest: {runs[-1].name})"
    return plot_runs(runs, out_path, smooth=smooth, title=title), runs, out_path


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Plot train/validation loss curves of training runs; with no "
                                                 "RUN_DIR, every run under checkpoints/.")
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                        help="training output folder holding train_loss.txt (and optionally val_loss.txt); "
                             "none: every such folder under checkpoints/")
    parser.add_argument("-o", "--out", default=None,
                        help="output image; the format follows the suffix (.png, .svg, .pdf). Default: "
                             "checkpoints/curves.png with no RUN_DIR, alignment.png with --align, else curves.png")
    parser.add_argument("--align", action="store_true",
                        help="compare exactly two runs of the same training (e.g. train_default_lora.py and "
                             "train_pytorch_lora.py): per-step relative difference, printed max / median")
    parser.add_argument("--smooth", type=float, default=0.9,
                        help="EMA weight for the smoothed training curve, in [0, 1); 0 = no smoothed curve")
    parser.add_argument("--labels", default=None,
                        help="comma-separated legend names, one per RUN_DIR (default: folder names)")
    parser.add_argument("--title", default=None, help="title above the plot")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels is not None else None
    if args.align and len(args.run_dirs) != 2:
        fail(f"--align compares two runs: give RUN_A RUN_B ({len(args.run_dirs)} given)")
    out, run_dirs = args.out or ("alignment.png" if args.align else "curves.png"), args.run_dirs
    try:
        if args.align:
            _, lines = align_runs(*run_dirs, out, smooth=args.smooth, labels=labels, title=args.title)
            print("\n".join(lines))
        elif run_dirs:
            plot_runs(run_dirs, out, smooth=args.smooth, labels=labels, title=args.title)
        else:
            _, run_dirs, out = plot_checkpoints(args.out, smooth=args.smooth)
    except (OSError, ValueError) as e:
        fail(e)
    print(f"wrote {out} ({len(run_dirs)} run{'s' if len(run_dirs) > 1 else ''}: "
          f"{', '.join(str(d) for d in run_dirs)})")
