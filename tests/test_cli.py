import json
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
