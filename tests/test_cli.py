import json
from pathlib import Path
import subprocess
import sys

import pytest

from tinysam_rt import cli
from tinysam_rt.io import load_image, write_png
from conftest import synthetic_image


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinysam_rt.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    write_png(path, synthetic_image(120, 160))
    return path


def test_version_does_not_import_onnxruntime():
    code = "import sys; from tinysam_rt import cli; cli.main(['--version'])"
    result = subprocess.run([sys.executable, "-c", code + ""], capture_output=True, text=True)
    assert "tinysam-rt" in result.stdout
    check = "import sys\ntry:\n from tinysam_rt import cli; cli.main(['--version'])\nexcept SystemExit: pass\nassert 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True)


def test_segment_writes_outputs(fp32_model_dir, image_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("segment", image_file, "--point", "40,50", "--point", "100,60,0", "--model", fp32_model_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stdout
    mask = load_image(out / "mask.png")
    assert mask.shape == (120, 160, 3)
    assert load_image(out / "overlay.png").shape == (120, 160, 3)
    report = json.loads((out / "result.json").read_text())
    assert len(report["scores"]) == 3 and report["best_index"] in (0, 1, 2)
    assert report["mask_area"] == int((mask[..., 0] > 127).sum())


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["segment", "img.png", "--point", "1,2,5"], 2, "--point label"),
        (["segment", "img.png", "--point", "a,b"], 2, "--point must be numbers"),
        (["segment", "img.png", "--box", "1,2,3"], 2, "--box must be 4"),
        (["segment", "img.png", "--threads", "0"], 2, "positive integer"),
        (["segment", "IMAGE"], 2, "needs at least one --point or a --box"),
        (["export"], 2, "exactly one of --checkpoint"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_usage_errors_are_one_line(args, code, message):
    result = run_cli(*args)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_runtime_errors_are_one_line(fp32_model_dir, image_file, tmp_path):
    missing = run_cli("segment", tmp_path / "nope.jpg", "--point", "1,1", "--model", fp32_model_dir, "--out", tmp_path / "o")
    assert missing.returncode == 1 and "image not found" in missing.stderr and "Traceback" not in missing.stderr
    outside = run_cli("segment", image_file, "--point", "500,1", "--model", fp32_model_dir, "--out", tmp_path / "o")
    assert outside.returncode == 1 and "outside the image" in outside.stderr
    assert not (tmp_path / "o").exists()  # nothing written on failure
    no_model = run_cli("segment", image_file, "--point", "1,1", "--model", tmp_path, "--out", tmp_path / "o")
    assert no_model.returncode == 1 and "tinysam export" in no_model.stderr
    debug = run_cli("--debug", "segment", image_file, "--point", "500,1", "--model", fp32_model_dir, "--out", tmp_path / "o")
    assert "Traceback" in debug.stderr


def test_main_returns_codes_in_process(fp32_model_dir, image_file, tmp_path):
    assert cli.main(["segment", str(image_file), "--box", "10,10,80,90", "--model", str(fp32_model_dir), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "mask.png").is_file()


# --- flags: empty paths, a second box, hierarchical-only flags, --debug, negative numbers, threads ---


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "img.png", "--point", "1,1", "--out", ""], "argument --out: expected a path, got ''"),
        (["segment", "", "--point", "1,1"], "argument image: expected a path, got ''"),
        (["segment", "img.png", "--point", "1,1", "--model", ""], "argument --model: expected a path, got ''"),
        (["everything", "img.png", "--out", " "], "argument --out: expected a path, got ' '"),
        (["export", "--random-seed", "0", "--out", ""], "argument --out: expected a path, got ''"),
        (["quantize", "--model", "m", "--calib", "", "--out", "o"], "argument --calib: expected a path, got ''"),
        (["segment", "img.png", "--box", "1,1,5,5", "--box", "2,2,6,6"],
         "argument --box: given twice; a prompt takes one box (as in SAM)"),
        (["everything", "img.png", "--high-score-thresh", "3"], "--high-score-thresh only applies with --hierarchical"),
        (["everything", "img.png", "--high-score-thresh", "8.5"], "--high-score-thresh only applies with --hierarchical"),
        (["everything", "img.png", "--dense-points", "tinysam"], "--dense-points only applies with --hierarchical"),
        (["segment", "img.png", "--point", "-inf,5"], "argument --point: --point must be finite numbers, got '-inf,5'"),
    ],
)
def test_more_usage_errors_are_one_line(args, message, tmp_path):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"tinysam {args[0]}: error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_threads_are_bounded_by_the_cpu_count(tmp_path):
    import os

    from tinysam_rt.sessions import make_session_options
    from tinysam_rt.sysinfo import THREADS_PER_CPU, max_threads

    limit = THREADS_PER_CPU * (os.cpu_count() or 1)
    assert max_threads() == limit
    for command in (["segment", "img.png", "--point", "1,1"], ["everything", "img.png"],
                    ["quantize", "--model", "m", "--calib", "c", "--out", "o"]):
        result = run_cli(*command, "--threads", str(limit + 1))
        assert result.returncode == 2
        assert result.stderr == (f"tinysam {command[0]}: error: argument --threads: expected at most {limit} threads "
                                 f"({THREADS_PER_CPU} per CPU), got '{limit + 1}'\n")
    assert cli.thread_count(str(limit)) == limit
    with pytest.raises(ValueError, match=rf"^threads must be at most {limit} \({THREADS_PER_CPU} per CPU\), got 100000$"):
        make_session_options(100000)  # the library's own bound, for callers that skip the CLI
    make_session_options(limit)


def test_debug_is_accepted_before_and_after_the_command():
    parse = cli.build_parser().parse_args
    assert parse(["segment", "x.png", "--point", "1,1"]).debug is False
    assert parse(["--debug", "segment", "x.png"]).debug is True
    assert parse(["segment", "x.png", "--debug"]).debug is True
    for command in (["everything", "x.png"], ["export"], ["quantize", "--model", "m", "--calib", "c", "--out", "o"]):
        assert parse([*command, "--debug"]).debug is True


def test_debug_after_the_command_shows_the_traceback(image_file, tmp_path):
    result = run_cli("segment", image_file, "--point", "500,1", "--model", tmp_path / "no-model", "--out", tmp_path / "o", "--debug")
    assert "Traceback" in result.stderr and "outside the image" in result.stderr


@pytest.mark.parametrize("flags, first", [
    (["--point", "-1,5"], "(-1, 5)"),
    (["--point", "-1.5e1,5,0"], "(-15, 5)"),
    (["--point=-1,5"], "(-1, 5)"),
    (["--point", "10,10", "--point", "-.5,-2"], "(-0.5, -2)"),
    (["--point", "200,5"], "(200, 5)"),
    (["--box", "-5,1,5,5"], "(-5, 1)"),
])
def test_prompts_outside_the_image_are_refused_before_the_model_is_loaded(image_file, tmp_path, flags, first):
    # No model at --model: the prompt check must come first, with the library's message.
    result = run_cli("segment", image_file, *flags, "--model", tmp_path / "no-model", "--out", tmp_path / "o")
    assert result.returncode == 1, result.stderr
    name = "box" if flags[0] == "--box" else "point_coords"
    assert result.stderr == (f"tinysam segment: error: {name} has 1 point(s) outside the image (W=160, H=120), "
                             f"e.g. (x, y) = {first}; coordinates are (x, y) pixels\n")
    assert not (tmp_path / "o").exists()


def test_negative_numbers_parse_as_values():
    args = cli.build_parser().parse_args(["segment", "x.png", "--point", "-1,5", "--point", "-2.5,-3,0",
                                          "--box", "-1,-2,3,4"])
    assert args.point == [(-1.0, 5.0, 1.0), (-2.5, -3.0, 0.0)] and args.box == [-1.0, -2.0, 3.0, 4.0]


# --- --out of export and quantize: never delete what is not a model -----------------------------------


def _model_like(directory, manifest=None):
    """A directory holding what export/quantize write (the manifest is only read for its format)."""
    directory.mkdir(parents=True)
    doc = {"format": "tinysam-rt-manifest", "format_version": 1} if manifest is None else manifest
    (directory / "manifest.json").write_text(json.dumps(doc))
    for name in ("encoder.onnx", "decoder.int8.onnx", "quantization_report.json", "quantization_report.md"):
        (directory / name).write_bytes(b"old")
    return directory


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_export_refuses_an_out_holding_other_files_and_deletes_nothing(tmp_path):
    out = tmp_path / "v"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    result = run_cli("export", "--random-seed", "0", "--out", out)
    assert result.returncode == 2
    assert result.stderr == (f"tinysam export: error: --out {out} is a non-empty directory that is not a tinysam-rt "
                             f"model directory (unexpected entries: notes.txt, photos/); it would be replaced whole, "
                             f"so give a new or empty directory\n")
    assert _files(out) == ["notes.txt", "photos"] and (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # no staging directory either


@pytest.mark.parametrize("setup, message", [
    (lambda p: p.write_text("x"), "--out {out} exists and is not a directory; give a new or empty directory"),
    (lambda p: (p.mkdir(), (p / "encoder.onnx").write_bytes(b"x")),
     "--out {out} is a non-empty directory that is not a tinysam-rt model directory (no manifest.json); "
     "it would be replaced whole, so give a new or empty directory"),
    (lambda p: _model_like(p, {"name": "my web app"}),
     "--out {out} is a non-empty directory that is not a tinysam-rt model directory (manifest.json is not a "
     "tinysam-rt manifest); it would be replaced whole, so give a new or empty directory"),
    (lambda p: (_model_like(p), (p / "sub").mkdir()),
     "--out {out} is a non-empty directory that is not a tinysam-rt model directory (unexpected entries: sub/); "
     "it would be replaced whole, so give a new or empty directory"),
    (lambda p: (p.mkdir(), [(p / f"f{i}.txt").write_text("") for i in range(7)]),
     "--out {out} is a non-empty directory that is not a tinysam-rt model directory (unexpected entries: f0.txt, "
     "f1.txt, f2.txt, f3.txt, f4.txt and 2 more); it would be replaced whole, so give a new or empty directory"),
])
def test_out_rule_refuses_what_is_not_a_model_directory(tmp_path, setup, message):
    from tinysam_export.out_dir import check_model_out_dir

    out = tmp_path / "out"
    setup(out)
    before = _files(out) if out.is_dir() else out.read_text()
    with pytest.raises(ValueError) as info:
        check_model_out_dir(out)
    assert str(info.value) == message.format(out=out)
    assert (_files(out) if out.is_dir() else out.read_text()) == before


def test_out_rule_accepts_new_empty_and_model_directories(tmp_path):
    from tinysam_export.out_dir import check_model_out_dir

    check_model_out_dir(tmp_path / "new" / "deeper")
    (tmp_path / "empty").mkdir()
    check_model_out_dir(tmp_path / "empty")
    check_model_out_dir(_model_like(tmp_path / "earlier"))  # a re-export replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "empty"]  # nothing created by the check


def test_out_rule_refuses_symlinks_unwritable_places_and_bad_types(tmp_path):
    from tinysam_export.out_dir import check_model_out_dir

    link = tmp_path / "link"
    link.symlink_to(_model_like(tmp_path / "model"))
    with pytest.raises(ValueError, match=f"^--out {link} is a symlink; give the directory itself"):
        check_model_out_dir(link)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=f"^--out {blocker / 'v'}: {blocker} is not a directory$"):
        check_model_out_dir(blocker / "v")
    if Path("/proc/self").is_dir():
        with pytest.raises(ValueError, match=r"^--out /proc/tinysam: cannot create files in /proc \("):
            check_model_out_dir("/proc/tinysam")
    with pytest.raises(ValueError, match="^--out must be a directory path, got ''$"):
        check_model_out_dir("")
    with pytest.raises(TypeError, match="^--out must be a str or os.PathLike path, got int$"):
        check_model_out_dir(3)


@pytest.mark.parametrize("where, message", [
    ("parent", "--out {out} contains --model {model} and would be replaced whole, deleting it; give a directory outside it"),
    ("inside", "--out {out} is inside --model {model}; give a directory outside it"),
    ("same", "--out must differ from --model ({model}): the FP32 model is the reference"),
])
def test_out_rule_keeps_the_source_model_apart(tmp_path, where, message):
    from tinysam_export.out_dir import check_model_out_dir

    model = _model_like(tmp_path / "models" / "vit_t")
    out = {"parent": tmp_path / "models", "inside": model / "int8", "same": model}[where]
    with pytest.raises(ValueError) as info:
        check_model_out_dir(out, model)
    assert str(info.value) == message.format(out=out, model=model)
