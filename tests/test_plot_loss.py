"""plot_loss.py: loss-file parsing, the curves it draws (the Figure's lines and legend, the
PNG's pixels), the comparison of two runs (--align), the bare command (every run under
checkpoints/), and its error messages.

    .venv/bin/python -m pytest tests/test_plot_loss.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex, to_rgb
from matplotlib.image import imread

from plot_loss import align_runs, dropout_on, plot_checkpoints, plot_runs, read_loss_file, smooth_ema

REPO = Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def curves(n=40, val_every=10):
    """(train, val) as make_run writes them: lists of (step, loss), losses at 4 decimals."""
    train = [(s, float(f"{3.0 / s ** 0.3:.4f}")) for s in range(1, n + 1)]
    val = [(s, float(f"{3.2 / s ** 0.3:.4f}")) for s in range(val_every, n + 1, val_every)] if val_every else []
    return train, val


def make_run(root, name, n=40, val_every=10, header=True):
    d = root / name
    d.mkdir()
    head = "# step\tloss\n" if header else ""
    train, val = curves(n, val_every)
    (d / "train_loss.txt").write_text(head + "".join(f"{s}\t{v:.4f}\n" for s, v in train))
    if val_every:
        (d / "val_loss.txt").write_text(head + "".join(f"{s}\t{v:.4f}\n" for s, v in val))
    return d


def ema_by_hand(values, w):
    """TensorBoard's smoothing: EMA from 0, divided by 1 - w^n (no pull towards 0 at the start)."""
    out, ema = [], 0.0
    for n, v in enumerate(values, start=1):
        ema = w * ema + (1 - w) * v
        out.append(ema / (1 - w ** n))
    return out


def expected_lines(runs, smooth):
    """[(colour, line style, x, y)] in drawing order: per run the raw training curve, its EMA, validation."""
    lines = []
    for i, (train, val) in enumerate(runs):
        colour, steps, losses = to_hex(f"C{i}"), [s for s, _ in train], [v for _, v in train]
        lines.append((colour, "-", steps, losses))
        if smooth:
            lines.append((colour, "-", steps, ema_by_hand(losses, smooth)))
        if val:
            lines.append((colour, "--", [s for s, _ in val], [v for _, v in val]))
    return lines


def drawn_lines(fig):
    (ax,) = fig.axes
    return [(to_hex(l.get_color()), l.get_linestyle(), list(l.get_xdata()), list(l.get_ydata()))
            for l in ax.get_lines()]


def assert_same_lines(got, expected):
    assert [g[:3] for g in got] == [e[:3] for e in expected]  # colour, style, steps
    worst = max(np.abs(np.subtract(g[3], e[3])).max() for g, e in zip(got, expected))
    print(f"\n{len(got)} lines drawn; max |y drawn - y expected| = {worst:.1e}")
    assert worst <= 1e-12


def legend_texts(fig):
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def colour_pixels(png, colour):
    """Number of pixels of the PNG in `colour` (antialiased edges excluded)."""
    rgb = imread(str(png))[..., :3]
    return int((np.abs(rgb - np.array(to_rgb(colour))).max(-1) < 0.02).sum())


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "plot_loss.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    assert 10_000 < len(data) < 5_000_000  # a real plot, not an empty canvas
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 400


# ----------------------------------------------------------------------------
# Parsing

def test_read_two_columns_header_blank(tmp_path):
    f = tmp_path / "train_loss.txt"
    f.write_text("# step\tloss\n\n10\t2.5\n  \n20\t2.25\r\n30 2.0\n")
    assert read_loss_file(f) == ([10, 20, 30], [2.5, 2.25, 2.0])


def test_read_single_column_uses_data_line_index(tmp_path):
    f = tmp_path / "train_loss.txt"
    f.write_text("# old seed format\n3.5\n\n3.0\n2.5\n")
    assert read_loss_file(f) == ([1, 2, 3], [3.5, 3.0, 2.5])


def test_read_empty_file(tmp_path):
    f = tmp_path / "val_loss.txt"
    f.write_text("# step\tloss\n")
    assert read_loss_file(f) == ([], [])


@pytest.mark.parametrize("bad", ["10\tabc", "1.5\t2.0", "1\t2\t3", "loss"])
def test_read_malformed_names_file_and_line(tmp_path, bad):
    f = tmp_path / "train_loss.txt"
    f.write_text(f"# header\n1\t2.0\n{bad}\n")
    with pytest.raises(ValueError, match=rf"train_loss.txt:3: .*{bad.split()[0]}"):
        read_loss_file(f)


def test_smooth_ema_bias_correction():
    # constant input must stay constant: the bias correction removes the pull towards 0
    assert smooth_ema([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)
    # by hand: ema1 = 0.1*1 -> /0.1 = 1; ema2 = 0.09 + 0.1*3 = 0.39 -> /0.19
    assert smooth_ema([1.0, 3.0], 0.9) == pytest.approx([1.0, 0.39 / 0.19])
    assert smooth_ema([1.0, float("nan"), 1.0], 0.5) == pytest.approx([1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------
# Drawing

def test_cli_two_runs_png(tmp_path):
    a = make_run(tmp_path, "run_a")
    b = make_run(tmp_path, "run_b", n=30, val_every=0, header=False)  # no val_loss.txt
    out = tmp_path / "plots" / "curves.png"
    r = run_cli(a, b, "-o", out, "--smooth", "0.8", "--title", "test", "--labels", "A,B")
    assert r.returncode == 0, r.stderr
    assert_png(out)
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary behind
    # the curves are in the image: far more pixels of each run's colour than its legend line
    # holds (measured: 152 with the curves off the axes; 1,188 and 1,898 with them)
    counts = {c: colour_pixels(out, c) for c in ("C0", "C1")}
    print(f"\npixels in run A's colour {counts['C0']}, run B's {counts['C1']}")
    assert min(counts.values()) > 500


def test_plot_runs_draws_every_curve_and_a_legend_entry_per_run(tmp_path):
    a = make_run(tmp_path, "run_a")
    b = make_run(tmp_path, "run_b", n=30, val_every=0, header=False)
    fig = plot_runs([a, b], tmp_path / "c.png", smooth=0.8, labels=["A", "B"], title="test")
    assert_png(tmp_path / "c.png")
    assert_same_lines(drawn_lines(fig), expected_lines([curves(), curves(30, 0)], 0.8))
    assert legend_texts(fig) == ["A", "B", "train (raw)", "train (EMA 0.8)", "validation"]
    assert fig.axes[0].get_title() == "test"


def test_plot_runs_without_smoothing_or_validation(tmp_path):
    fig = plot_runs([make_run(tmp_path, "run_a", val_every=0)], tmp_path / "c.png", smooth=0.0)
    assert_same_lines(drawn_lines(fig), expected_lines([curves(val_every=0)], 0.0))
    assert legend_texts(fig) == ["run_a", "train (raw)"]


def test_plot_runs_svg(tmp_path):
    plot_runs([make_run(tmp_path, "run_a")], tmp_path / "c.svg")
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


# ----------------------------------------------------------------------------
# Errors: exit 2, a message naming the culprit, no traceback

def assert_fails(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert str(needle) in r.stderr, r.stderr


def test_cli_missing_run_dir(tmp_path):
    assert_fails(run_cli(tmp_path / "nope", "-o", tmp_path / "c.png"), tmp_path / "nope", "not found")


def test_cli_run_dir_without_train_loss(tmp_path):
    (tmp_path / "empty_run").mkdir()
    assert_fails(run_cli(tmp_path / "empty_run", "-o", tmp_path / "c.png"),
                 tmp_path / "empty_run" / "train_loss.txt", "not found")


def test_cli_malformed_line(tmp_path):
    d = make_run(tmp_path, "run_a")
    (d / "val_loss.txt").write_text("# step\tloss\n10\t2.0\n20\toops\n")
    r = run_cli(d, "-o", tmp_path / "c.png")
    assert_fails(r, f"{d / 'val_loss.txt'}:3", "oops")
    assert not (tmp_path / "c.png").exists()


def test_cli_bad_options(tmp_path):
    d = make_run(tmp_path, "run_a")
    assert_fails(run_cli(d, "-o", tmp_path / "c.png", "--labels", "x,y"), "2 labels for 1 run")
    assert_fails(run_cli(d, "-o", tmp_path / "c.png", "--smooth", "1"), "--smooth")
    assert_fails(run_cli(d, "-o", tmp_path / "c.xyz"), "c.xyz", "unsupported")


# ----------------------------------------------------------------------------
# --align: two runs of the same training

NO_DROPOUT = {"dropout": 0.0, "random_base": "n_layer=2,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"}


def make_twin(root, name, factor, config, n=40, val_every=10):
    """A run whose losses are those of curves() times `factor` (a relative difference of
    |factor - 1| / max(factor, 1) at every step), with the given config.json."""
    d = root / name
    d.mkdir()
    train, val = curves(n, val_every)
    (d / "train_loss.txt").write_text("".join(f"{s}\t{v * factor:.6f}\n" for s, v in train))
    (d / "val_loss.txt").write_text("".join(f"{s}\t{v * factor:.6f}\n" for s, v in val))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "elapsed_s": 1.5 * s}) + "\n" for s, _ in train))
    (d / "config.json").write_text(json.dumps(config))
    return d


def relative_differences(a_dir, b_dir, name, smooth=None):
    (_, a), (_, b) = read_loss_file(a_dir / name), read_loss_file(b_dir / name)
    if smooth:
        a, b = ema_by_hand(a, smooth), ema_by_hand(b, smooth)
    a, b = np.array(a), np.array(b)
    return np.abs(a - b) / np.maximum(np.abs(a), np.abs(b))


def test_align_prints_and_draws_the_relative_differences(tmp_path):
    a = make_twin(tmp_path, "jittor", 1.0, NO_DROPOUT)
    b = make_twin(tmp_path, "pytorch", 1.0 + 3e-4, NO_DROPOUT)
    r = run_cli(a, b, "--align", "-o", tmp_path / "a.png")
    print("\n" + r.stdout)
    assert r.returncode == 0, r.stderr
    assert_png(tmp_path / "a.png")
    train, val = relative_differences(a, b, "train_loss.txt"), relative_differences(a, b, "val_loss.txt")
    lines = r.stdout.splitlines()
    assert lines[0] == (f"training loss (40 common steps): max relative difference {train.max():.2e} "
                        f"(step {int(train.argmax()) + 1}), median {np.median(train):.2e}")
    assert lines[1] == (f"held-out loss (4 common steps): max relative difference {val.max():.2e} "
                        f"(step {10 * (int(val.argmax()) + 1)}), median {np.median(val):.2e}")
    assert lines[2] == "training time (metrics.jsonl elapsed_s, held-out evaluations included): jittor 60.0 s, pytorch 60.0 s"
    # the figure: both curves in the top panel, their differences in the bottom one
    fig, _ = align_runs(a, b, tmp_path / "b.png")
    top, bottom = fig.axes
    assert [l.get_label() for l in top.get_lines()] == ["jittor: training loss", "jittor: held-out",
                                                        "pytorch: training loss", "pytorch: held-out"]
    drawn = [np.asarray(l.get_ydata()) for l in bottom.get_lines()]
    assert np.abs(drawn[0] - train).max() <= 1e-15 and np.abs(drawn[1] - val).max() <= 1e-15
    assert bottom.get_yscale() == "log"


def test_align_with_dropout_compares_the_smoothed_curves_and_says_why(tmp_path):
    noisy = lambda s: 1.0 + 0.01 * ((s * 7919) % 13 - 6)  # per-step noise, as different masks give
    a = make_twin(tmp_path, "jittor", 1.0, {"dropout": 0.1, "random_base": "n_layer=2"})
    b = tmp_path / "pytorch"
    b.mkdir()
    train, val = curves()
    (b / "train_loss.txt").write_text("".join(f"{s}\t{v * noisy(s):.6f}\n" for s, v in train))
    (b / "val_loss.txt").write_text((a / "val_loss.txt").read_text())
    (b / "config.json").write_text((a / "config.json").read_text())
    fig, lines = align_runs(a, b, tmp_path / "a.png", smooth=0.9)
    print("\n" + "\n".join(lines))
    assert lines[0].startswith("dropout on: the two runs draw different dropout masks")
    smoothed = relative_differences(a, b, "train_loss.txt", smooth=0.9)
    raw = relative_differences(a, b, "train_loss.txt")
    assert lines[1] == (f"training loss, EMA 0.9 (40 common steps): max relative difference {smoothed.max():.2e} "
                        f"(step {int(smoothed.argmax()) + 1}), median {np.median(smoothed):.2e}")
    print(f"median relative difference: raw {np.median(raw):.2e}, EMA-smoothed {np.median(smoothed):.2e}")
    assert np.median(smoothed) < np.median(raw) / 2  # the smoothing is what makes the comparison meaningful
    assert "different masks" in fig.axes[1].get_title()
    assert "training time" in lines[-1] and "unknown" in lines[-1]  # the runs have no metrics.jsonl here


@pytest.mark.parametrize("config,expected", [
    ({"dropout": 0.0, "random_base": "n_layer=2,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"}, False),
    ({"dropout": 0.1, "random_base": "n_layer=2,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"}, True),
    ({"dropout": 0.0, "random_base": "n_layer=2,resid_pdrop=0,embd_pdrop=0"}, True),  # attn_pdrop: 0.1 by default
    ({"dropout": 0.0, "random_base": None, "model": "no/such/folder"}, None),  # the base's dropouts unknown
    (None, None),  # no config.json
])
def test_dropout_on_reads_the_run_config(tmp_path, config, expected):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    assert dropout_on(tmp_path) is expected


def test_align_needs_two_runs(tmp_path):
    assert_fails(run_cli(make_run(tmp_path, "run_a"), "--align"), "--align compares two runs", "(1 given)")


# ----------------------------------------------------------------------------
# The bare command: every run under checkpoints/

def test_bare_command_plots_every_run_under_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    old, new = make_run(root, "old"), make_run(root, "new", n=30)
    (root / "not_a_run").mkdir()  # no train_loss.txt: not a run
    os.utime(old / "train_loss.txt", (1_000_000, 1_000_000))  # `old` finished long before `new`
    r = run_cli(cwd=tmp_path)
    print("\n" + r.stdout.strip())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "wrote checkpoints/curves.png (2 runs: checkpoints/old, checkpoints/new)"
    assert_png(root / "curves.png")
    fig, runs, out = plot_checkpoints(root=root)
    assert runs == [old, new] and out == root / "curves.png"
    assert fig.axes[0].get_title() == f"2 runs under {root}/ (newest: new)"
    assert_same_lines(drawn_lines(fig), expected_lines([curves(), curves(30)], 0.9))


def test_bare_command_without_runs_says_how_to_make_one(tmp_path):
    r = run_cli(cwd=tmp_path)
    print("\n" + r.stderr.strip())
    assert_fails(r, "no training runs under checkpoints/", "make demo")
    assert not (tmp_path / "checkpoints").exists()
