"""Interrupted writers leave the old complete output or none — never half a file.

Interruptions are real: an exception raised mid-write (monkeypatched into the write path), a
failing rename, or SIGKILL of a subprocess while it is writing. Each test then checks the
published path byte for byte (or via the runtime's own sha256 check) and looks for temp debris.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tinysam_rt import atomic, cli, io
from tinysam_rt import manifest as mf
from conftest import REPO, synthetic_image


def _debris(directory):
    """Temp files/dirs the atomic writers leave while working (hidden, .tmp/.old suffix)."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith(".") and p.suffix in (".tmp", ".old"))


def _tree(directory):
    """{relative path: sha256} of every file under `directory`."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


class _Boom(Exception):
    pass


def _half_then_raise(original, when):
    """A Path.write_bytes that writes half of the data, then raises, for paths matching `when`."""

    def write_bytes(self, data):
        if when(self):
            with open(self, "wb") as f:
                f.write(bytes(data[: len(data) // 2]))
            raise _Boom(f"interrupted while writing {self.name}")
        return original(self, data)

    return write_bytes


# --- the primitives ------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [True, False])
def test_write_interrupted_mid_file_keeps_old_or_nothing(tmp_path, monkeypatch, existing):
    target = tmp_path / "result.json"
    if existing:
        atomic.atomic_write_text(target, '{"old": true}\n')
    monkeypatch.setattr(Path, "write_bytes", _half_then_raise(Path.write_bytes, lambda p: True))
    with pytest.raises(_Boom):
        atomic.atomic_write_text(target, json.dumps({"new": list(range(1000))}))
    monkeypatch.undo()
    if existing:
        assert target.read_text() == '{"old": true}\n'
    else:
        assert not target.exists()
    assert _debris(tmp_path) == []


def test_keyboard_interrupt_inside_atomic_path(tmp_path):
    target = tmp_path / "mask.png"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"new, half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and _debris(tmp_path) == []


def test_published_file_modes_follow_umask(tmp_path):
    atomic.atomic_write_bytes(tmp_path / "f", b"x")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("bad", ["mask.png", "overlay.png", "result.json"])
def test_write_files_checks_every_target_before_replacing_any(tmp_path, bad):
    """A target that is a directory (here each of the three in turn) fails the whole set up front."""
    out = tmp_path / "out"
    out.mkdir()
    names = ["mask.png", "overlay.png", "result.json"]
    for name in names:
        if name == bad:
            (out / name).mkdir()
        else:
            (out / name).write_bytes(b"old " + name.encode())
    before = _tree(out)
    with pytest.raises(IsADirectoryError) as info:
        atomic.atomic_write_files({out / name: b"new" for name in names})
    assert str(info.value) == f"{out / bad} is a directory; cannot write a file there"
    assert _tree(out) == before and (out / bad).is_dir() and _debris(out) == []


def test_write_files_refuses_a_parent_that_is_a_file_or_not_writable(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file, not a directory")
    with pytest.raises(NotADirectoryError, match=f"^{blocker / 'deeper' / 'mask.png'}: {blocker} is not a directory$"):
        atomic.atomic_write_files({blocker / "deeper" / "mask.png": b"x"})
    assert blocker.read_text() == "a file, not a directory"
    if Path("/proc/self").is_dir():  # a directory even root cannot create files in
        kept = tmp_path / "kept.png"
        kept.write_bytes(b"old")
        with pytest.raises(OSError, match=r"^/proc/tinysam\.json: cannot create files in /proc \("):
            atomic.atomic_write_files({kept: b"new", Path("/proc/tinysam.json"): b"x"})
        assert kept.read_bytes() == b"old" and _debris(tmp_path) == []


def test_write_files_creates_missing_parents(tmp_path):
    atomic.atomic_write_files({tmp_path / "a" / "b" / "mask.png": b"x"})
    assert (tmp_path / "a" / "b" / "mask.png").read_bytes() == b"x"


def test_directory_never_replaces_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory; refusing to replace it with one"):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "a.onnx").write_bytes(b"new")
    assert target.read_text() == "precious" and _debris(tmp_path) == []


def _old_directory(target):
    target.mkdir()
    (target / "a.onnx").write_bytes(b"A" * 1000)
    (target / "manifest.json").write_text('{"old": 1}')
    return _tree(target)


def test_directory_interrupted_mid_write_keeps_old(tmp_path):
    target = tmp_path / "vit_t"
    before = _old_directory(target)
    with pytest.raises(_Boom):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "a.onnx").write_bytes(b"B" * 10)
            raise _Boom("half way")
    assert _tree(target) == before and _debris(tmp_path) == []


def test_directory_swap_failure_restores_old(tmp_path, monkeypatch):
    """The second rename (new dir -> target) fails: the old directory is put back."""
    target = tmp_path / "vit_t"
    before = _old_directory(target)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("simulated failure of the swap-in rename")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="swap-in"):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "a.onnx").write_bytes(b"new")
    monkeypatch.undo()
    assert _tree(target) == before and _debris(tmp_path) == []


# --- SIGKILL of a writing subprocess ------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tinysam_rt import atomic
    kind, target = sys.argv[1], Path(sys.argv[2])
    chunk = b"N" * (1 << 20)
    if kind == "file":
        with atomic.atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(chunk)
                f.flush()
                print("writing", flush=True)
                time.sleep(120)  # killed here, half way through
                f.write(chunk)
    else:
        with atomic.atomic_directory(target) as tmp:
            (tmp / "a.onnx").write_bytes(chunk)
            print("writing", flush=True)
            time.sleep(120)
            (tmp / "manifest.json").write_text("{}")
""")


@pytest.mark.parametrize("kind", ["file", "directory"])
@pytest.mark.parametrize("existing", [True, False])
def test_sigkill_mid_write(tmp_path, kind, existing):
    target = tmp_path / ("out.bin" if kind == "file" else "vit_t")
    before = None
    if existing:
        if kind == "file":
            target.write_bytes(b"old complete output")
            before = target.read_bytes()
        else:
            before = _old_directory(target)
    child = subprocess.Popen([sys.executable, "-c", _WRITER, kind, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        assert _debris(tmp_path), "the writer should be part way through a temp output"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    if not existing:
        assert not target.exists()
    elif kind == "file":
        assert target.read_bytes() == before
    else:
        assert _tree(target) == before
    # A killed process cannot clean up: its hidden temp output stays beside the target.
    assert all(name.startswith(f".{target.name}.") for name in _debris(tmp_path))


# --- the CLI's writers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    io.write_png(path, synthetic_image(90, 120, seed=11))
    return path


def _segment(scene, model_dir, out, point):
    return cli.main(["segment", str(scene), "--point", point, "--model", str(model_dir), "--out", str(out)])


def test_segment_interrupted_before_writing_leaves_nothing(fp32_model_dir, scene, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(Path, "write_bytes", _half_then_raise(Path.write_bytes, lambda p: ".mask.png." in p.name))
    with pytest.raises(_Boom):
        _segment(scene, fp32_model_dir, out, "30,40")
    monkeypatch.undo()
    assert not out.exists() or (list(out.iterdir()) == [])


def test_segment_interrupted_mid_write_leaves_complete_files(fp32_model_dir, scene, tmp_path, monkeypatch):
    """Each output file is the old one or the new one, never a torn one."""
    out = tmp_path / "out"
    assert _segment(scene, fp32_model_dir, out, "30,40") == 0
    old = _tree(out)
    monkeypatch.setattr(Path, "write_bytes", _half_then_raise(Path.write_bytes, lambda p: ".result.json." in p.name))
    with pytest.raises(_Boom):
        _segment(scene, fp32_model_dir, out, "100,70")
    monkeypatch.undo()
    assert sorted(_tree(out)) == sorted(old) and _debris(out) == []
    assert _tree(out)["result.json"] == old["result.json"]
    json.loads((out / "result.json").read_text())
    for name in ("mask.png", "overlay.png"):
        assert io.load_image(out / name).shape == (90, 120, 3)


def test_segment_interrupted_mid_write_keeps_the_old_set(fp32_model_dir, scene, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _segment(scene, fp32_model_dir, out, "30,40") == 0
    old = _tree(out)
    monkeypatch.setattr(Path, "write_bytes", _half_then_raise(Path.write_bytes, lambda p: ".result.json." in p.name))
    with pytest.raises(_Boom):
        _segment(scene, fp32_model_dir, out, "100,70")
    monkeypatch.undo()
    assert _tree(out) == old


@pytest.mark.parametrize("command, names, bad", [
    ("segment", ("mask.png", "overlay.png", "result.json"), "result.json"),
    ("everything", ("overlay.png", "masks.json"), "masks.json"),
])
def test_cli_output_that_cannot_be_written_is_refused_before_the_model_and_keeps_the_old_set(
        scene, tmp_path, capsys, command, names, bad):
    """One bad target (a directory) fails the command before the model is loaded; nothing is replaced."""
    out = tmp_path / "out"
    out.mkdir()
    for name in names:
        (out / name).mkdir() if name == bad else (out / name).write_bytes(b"old")
    before = _tree(out)
    prompt = ["--point", "5,5"] if command == "segment" else []
    # No model there: the output check must come before the model load.
    code = cli.main([command, str(scene), *prompt, "--model", str(tmp_path / "no-model"), "--out", str(out)])
    assert code == 1
    assert capsys.readouterr().err == f"tinysam {command}: error: {out / bad} is a directory; cannot write a file there\n"
    assert _tree(out) == before and _debris(out) == []


def test_cli_out_that_is_a_file_is_refused(scene, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("keep me")
    assert cli.main(["segment", str(scene), "--point", "5,5", "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"tinysam segment: error: {out / 'mask.png'}: {out} is not a directory\n"
    assert out.read_text() == "keep me"


# --- export ----------------------------------------------------------------------------------------


@pytest.mark.torch
def test_export_failing_its_smoke_run_keeps_the_old_model(fp32_model_dir, tmp_path, monkeypatch):
    """A decoder graph that ORT cannot load is caught by the smoke run before anything is published."""
    from tinysam_export import export_onnx

    target = tmp_path / "vit_t"
    shutil.copytree(fp32_model_dir, target)
    before = _tree(target)
    # Real encoder bytes, garbage decoder: the manifest hashes match, so only the smoke run can tell.
    monkeypatch.setattr(export_onnx, "export_encoder",
                        lambda model, path, weights_id, opset=17: shutil.copyfile(fp32_model_dir / "encoder.onnx", path))
    monkeypatch.setattr(export_onnx, "export_decoder",
                        lambda model, path, weights_id, opset=17: Path(path).write_bytes(np.random.default_rng(0).bytes(5000)))
    with pytest.raises(mf.ModelFileError, match="decoder.onnx"):
        export_onnx.export_model(target, seed=0)
    assert _tree(target) == before and _debris(tmp_path) == []
    assert mf.load_manifest(target).weights_id == "random-seed-0"


def _kill_once(child, staged, timeout_s, too_late):
    """SIGKILL `child` as soon as `staged()` returns something (polling), asserting it still runs."""
    try:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s and child.poll() is None and not staged():
            time.sleep(0.05)
        assert child.poll() is None, f"{too_late} before it could be interrupted"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)


@pytest.mark.torch
def test_export_killed_mid_write_keeps_the_old_model(fp32_model_dir, tmp_path):
    """SIGKILL a real `python -m tinysam_export.export_onnx` once it has started writing graphs."""
    target = tmp_path / "vit_t"
    shutil.copytree(fp32_model_dir, target)
    before = _tree(target)
    child = subprocess.Popen([sys.executable, "-m", "tinysam_export.export_onnx", "--random-seed", "1", "--out", str(target)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Once the encoder graph is being (or has been) written into the temp directory.
    _kill_once(child, lambda: [p for d in tmp_path.glob(".vit_t.*.tmp") for p in d.iterdir()], 600, "export finished")
    assert _tree(target) == before
    assert mf.load_manifest(target).weights_id == "random-seed-0"  # sha256-verified, still loadable


# --- quantize ----------------------------------------------------------------------------------------
# tests/test_quantize.py checks that a failed accuracy gate (raised after the INT8 graphs are staged)
# keeps the previous output; here the process is killed while it is writing.

_QUANTIZE = textwrap.dedent("""
    import sys
    from tinysam_export import calibration, quantize
    sampling = calibration.PromptSampling(points=2, multi_points=1, boxes=1, point_boxes=1, grid_per_side=2,
                                          refinements=1, batch=4)
    config = quantize.QuantizeConfig(method="minmax", only="decoder", min_images=1, holdout=1, synthetic=0,
                                     gate=False, max_excluded=0, sampling=sampling, threads=1)
    quantize.quantize_model(sys.argv[1], sys.argv[2], sys.argv[3], config)
""")


@pytest.mark.torch
def test_quantize_killed_mid_write_keeps_the_old_output(fp32_model_dir, tmp_path):
    pytest.importorskip("onnx")
    calib = tmp_path / "calib"
    io.write_png(calib / "a.png", synthetic_image(96, 128, seed=1))
    io.write_png(calib / "b.png", synthetic_image(128, 96, seed=2))
    target = tmp_path / "vit_t-int8"
    shutil.copytree(fp32_model_dir, target)  # stands in for an earlier, complete output
    before = _tree(target)
    child = subprocess.Popen([sys.executable, "-c", _QUANTIZE, str(fp32_model_dir), str(calib), str(target)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Once an INT8 graph is already in the staging directory.
    _kill_once(child, lambda: [p for d in tmp_path.glob(".vit_t-int8.*.tmp") for p in d.glob("*.onnx")], 900,
               "quantize finished (or failed)")
    assert _tree(target) == before
    assert mf.load_manifest(target).decoder.precision == "fp32"  # the old model, sha256-verified
