"""--report-to tensorboard, read back with TensorBoard's own event reader: a run stopped and
resumed draws the same curves as one uninterrupted run, each step once; no PyTorch needed."""
import json
import sys

import numpy as np
import pytest

from helpers import measured, tensorboard_scalars, write_sample_split
from train_default_lora import train
from training.tensorboard_log import TensorBoardLog
from training.train_config import TrainConfig

TINY = "n_layer=2,n_head=2,n_embd=32,n_positions=256,initializer_range=0.1"  # test_train.py's shape


def cfg_for(tmp_path, out):
    train_file, eval_file = write_sample_split(tmp_path)
    return TrainConfig(random_base=TINY, train_file=str(train_file), eval_file=str(eval_file), output_dir=str(out),
                       max_length=192, batch_size=4, max_steps=6, eval_interval=2, save_interval=3, eval_examples=8,
                       gen_eval_examples=0, lr=3e-3, keep_checkpoints=0, report_to="tensorboard")


def test_resumed_run_continues_the_same_curves(tmp_path):
    full = train(cfg_for(tmp_path, tmp_path / "full"), progress=False)
    cfg = cfg_for(tmp_path, tmp_path / "cut")
    train(cfg, stop_after=5, progress=False)  # logs steps 1-5; its last checkpoint is step 3
    train(cfg, resume=True, progress=False)   # redoes 4-6
    a, b = tensorboard_scalars(full / "runs"), tensorboard_scalars(tmp_path / "cut" / "runs")
    for tag in ("train/loss", "train/learning_rate", "eval/loss"):
        steps = [s for s, _ in b[tag]]
        assert steps == sorted(set(steps)) == [s for s, _ in a[tag]], (tag, steps)
    diff = max(abs(x - y) for tag in ("train/loss", "eval/loss") for (_, x), (_, y) in zip(a[tag], b[tag]))
    measured(f"TensorBoard curves, resumed run vs uninterrupted: same steps, loss max difference {diff:.1e}")
    assert diff == 0.0  # resume is exact (tests/test_train.py), so the scalars are too
    metrics = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert np.allclose([v for _, v in a["train/loss"]], metrics, rtol=1e-5)
    assert [s for s, _ in a["eval/loss"]] == [0, 2, 4, 6]


def test_writer_needs_no_torch_and_says_when_tensorboard_is_missing(tmp_path, monkeypatch):
    import subprocess
    code = ("import sys\nfrom training.tensorboard_log import TensorBoardLog\n"
            f"log = TensorBoardLog({str(tmp_path / 'a')!r})\nlog.scalars(1, {{'train/loss': 2.5}})\nlog.close()\n"
            "print('torch' in sys.modules, 'jittor' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr
    assert tensorboard_scalars(tmp_path / "a") == {"train/loss": [(1, 2.5)]}
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard"] + ["tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(RuntimeError, match="--report-to tensorboard needs TensorBoard: pip install tensorboard"):
        TensorBoardLog(tmp_path / "b")
