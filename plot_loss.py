"""Plot training/validation loss curves of one or more training runs into an image.

Each RUN_DIR is a training output folder with `train_loss.txt` and, optionally,
`val_loss.txt`: one record per line, `step<TAB>loss`; `#` header lines and blank
lines are skipped; a line with a single number is a loss whose step is its 1-based
index among the data lines (how the old seed script wrote it).

    python plot_loss.py checkpoints/run1 -o curves.png
    python plot_loss.py checkpoints/r4 checkpoints/r16 -o curves.png --labels "rank 4,rank 16" --smooth 0.95
    python plot_loss.py checkpoints/run1 -o curves.svg --title "GPT-2 LoRA on SQuAD"

Headless: draws with matplotlib's Agg canvas (no pyplot, no display needed).
"""
import argparse
import math
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from model_utils import atomic_write

X_LABEL = "optimizer step"
Y_LABEL = "loss (answer tokens, nats)"


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
    out_path = Path(out_path)
    fmt = out_path.suffix.lstrip(".").lower() or "png"

    # Read everything first, so a bad file fails before any drawing.
    runs = []
    for d in run_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: run folder not found")
        train = read_loss_file(d / "train_loss.txt")
        if not train[0]:
            raise ValueError(f"{d / 'train_loss.txt'}: no loss records")
        val_file = d / "val_loss.txt"
        runs.append((train, read_loss_file(val_file) if val_file.is_file() else ([], [])))

    fig = Figure(figsize=(9, 5.5), dpi=120, layout="constrained")
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ValueError(f"{out_path}: unsupported image format '.{fmt}' (use .png, .svg or .pdf)")
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Plot train/validation loss curves of training runs.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="training output folder holding train_loss.txt (and optionally val_loss.txt)")
    parser.add_argument("-o", "--out", required=True,
                        help="output image; the format follows the suffix (.png, .svg, .pdf)")
    parser.add_argument("--smooth", type=float, default=0.9,
                        help="EMA weight for the smoothed training curve, in [0, 1); 0 = no smoothed curve")
    parser.add_argument("--labels", default=None,
                        help="comma-separated legend names, one per RUN_DIR (default: folder names)")
    parser.add_argument("--title", default=None, help="title above the plot")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels is not None else None
    try:
        plot_runs(args.run_dirs, args.out, smooth=args.smooth, labels=labels, title=args.title)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out} ({len(args.run_dirs)} run{'s' if len(args.run_dirs) > 1 else ''})")
