"""tools/jittor_cuda_fix.py on a small copy of the installed Jittor 1.3.11 (the files it patches):
what it changes per CUDA version, that a second run changes nothing, and that it refuses text it
does not know. That the patched Jittor compiles with CUDA 13 is `make gpu-rehearsal`'s part
(it downloads the toolkit): docs/gpu.md."""
import ast
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import jittor_cuda_fix as fix  # noqa: E402

FILES = sorted({p.file for p in fix.PATCHES})


@pytest.fixture
def tree(tmp_path):
    """The patched files copied from the installed (stock) Jittor, plus its __init__.py's version."""
    installed = Path(list(importlib.util.find_spec("jittor").submodule_search_locations)[0])
    root = tmp_path / "jittor"
    for f in FILES:
        text = (installed / f).read_text(encoding="utf-8")
        assert fix.MARK not in text, f"the installed Jittor's {f} is already patched: the suite needs a stock one"
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(text, encoding="utf-8")
    (root / "__init__.py").write_text(f"__version__ = '{fix.JITTOR_VERSION}'\n")
    return root


def snapshot(root):
    return {f: (root / f).read_bytes() for f in FILES}


def code_lines(text):
    return [line.split("#")[0] for line in text.splitlines()]  # Python code without its comments


def test_cuda13_patches_every_removed_api_once(tree, capsys):
    before = snapshot(tree)
    assert fix.main(["--jittor", str(tree), "--cuda", "13.0"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert out.count(": patched") == len(fix.PATCHES)
    compiler = (tree / "compiler.py").read_text()
    # C++17 on the cc_flags line only, and no conversion back to c++14 for nvcc (a global sed's trap)
    assert 'cc_flags += " -Wall -Wno-unknown-pragmas -std=c++17 -fPIC "' in compiler
    assert not any("-std:c++14" in line for line in code_lines(compiler))
    assert compiler.count("-std=c++14") == before["compiler.py"].decode().count("-std=c++14") - 1  # the comment line stays
    assert "max_arch = 120 if nvcc_version >= [12,8] else 90" in compiler and "-code=compute_{min(archs)}" in compiler
    helper = (tree / "extern/cuda/inc/helper_cuda.h").read_text()
    assert "deviceProp.computeMode" not in helper and "deviceProp.clockRate" not in helper
    for f, gone in (("other/code_softmax.py", "cub::Max()"), ("depthwise_conv.py", "cub::LaneId()"),
                    ("extern/cuda/cub/ops/cub_where_op.cc", "cub::CountingInputIterator"),
                    ("extern/cuda/cub/ops/cub_where_op.cc", "cub::TransformInputIterator")):
        assert gone not in (tree / f).read_text(), f
    for f in ("compiler.py", "other/code_softmax.py", "depthwise_conv.py"):
        ast.parse((tree / f).read_text(), f)  # still Python
    changed = [f for f in FILES if (tree / f).read_bytes() != before[f]]
    assert changed == FILES


def test_second_run_changes_nothing(tree, capsys):
    fix.main(["--jittor", str(tree), "--cuda", "13.0"])
    once = snapshot(tree)
    assert fix.main(["--jittor", str(tree), "--cuda", "13.0"]) == 0
    assert snapshot(tree) == once
    out = capsys.readouterr().out
    assert out.count("already patched") == len(fix.PATCHES)
    assert fix.main(["--jittor", str(tree), "--cuda", "13.0", "--check"]) == 0  # nothing pending


def test_cuda12_needs_nothing_before_12_8(tree, capsys):
    before = snapshot(tree)
    assert fix.main(["--jittor", str(tree), "--cuda", "12.4"]) == 0
    assert snapshot(tree) == before
    assert "nothing to do" in capsys.readouterr().out
    assert fix.main(["--jittor", str(tree), "--cuda", "12.8"]) == 0  # newer GPUs: only the architecture clamp
    changed = [f for f in FILES if (tree / f).read_bytes() != before[f]]
    assert changed == ["compiler.py"]
    text = (tree / "compiler.py").read_text()
    assert "-std=c++14 -fPIC" in text and fix.MARK in text


def test_check_reports_without_writing(tree, capsys):
    before = snapshot(tree)
    assert fix.main(["--jittor", str(tree), "--cuda", "13.0", "--check"]) == 1
    assert snapshot(tree) == before
    assert capsys.readouterr().out.count("would patch") == len(fix.PATCHES)


def test_unknown_text_is_refused_and_nothing_written(tree, capsys):
    path = tree / "extern/cuda/inc/helper_cuda.h"
    path.write_text(path.read_text().replace("deviceProp.computeMode", "prop.computeMode", 1))
    before = snapshot(tree)
    assert fix.main(["--jittor", str(tree), "--cuda", "13.0"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert str(path) in err and "deviceProp.computeMode" in err and "found 2" in err
    assert snapshot(tree) == before  # not even the files whose patches were fine


def test_other_jittor_versions_and_bad_arguments(tree, capsys):
    (tree / "__init__.py").write_text("__version__ = '1.3.9.14'\n")
    assert fix.main(["--jittor", str(tree), "--cuda", "13.0"]) == 2
    assert "jittor 1.3.9.14" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fix.main(["--jittor", str(tree), "--cuda", "thirteen"])


def test_cuda_version_from_nvcc(tmp_path):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    assert fix.nvcc_version(str(nvcc)) == (13, 0)
    assert fix.nvcc_version(str(tmp_path / "missing")) is None
    shutil.copy(nvcc, tmp_path / "bad")
    (tmp_path / "bad").write_text("#!/bin/sh\necho hello\n")
    with pytest.raises(fix.FixError, match="release X.Y"):
        fix.nvcc_version(str(tmp_path / "bad"))
