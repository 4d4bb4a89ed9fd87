"""io.load_image on files OpenCV cannot decode: one ValueError naming the file and the reason.

The oversized files are real: a PNG / JPEG whose header declares 40000x40000 pixels (over
OpenCV's 2^30 limit) with a few bytes of image data, so nothing large is ever allocated.
"""

import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

from tinysam_rt import bench, io

TOO_LARGE = "image too large to decode: 40000x30000 (HxW) = 1200000000 pixels; OpenCV's limit is 2^30 pixels"


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(height, width, rows=2):
    """A PNG whose IHDR claims (height, width) RGB, holding only `rows` rows of pixels."""
    raw = b"".join(b"\0" + bytes(width * 3) for _ in range(rows))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def jpeg_declaring(height, width):
    """A small real JPEG with its SOF frame size patched to (height, width)."""
    ok, data = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    data = bytearray(data.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture
def big_png(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_declaring(40000, 30000))
    return path


@pytest.mark.parametrize("name, data", [("big.png", png_declaring(40000, 30000)), ("big.jpg", jpeg_declaring(40000, 30000))],
                         ids=["png", "jpeg"])
def test_image_over_opencvs_pixel_limit_is_a_value_error_with_its_size(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        io.load_image(path)
    assert str(info.value).startswith(f"{path}: {TOO_LARGE}")


def test_too_large_without_a_known_header_still_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "big.webp"
    path.write_bytes(b"RIFF....WEBP")

    def raise_limit(data, flags):
        raise cv2.error("OpenCV: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS in function 'validateInputImageSize'")

    monkeypatch.setattr(cv2, "imdecode", raise_limit)
    with pytest.raises(ValueError, match=r"big\.webp: image too large to decode; OpenCV's limit is 2\^30 pixels"):
        io.load_image(path)


def test_any_other_opencv_error_is_a_value_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "odd.png"
    path.write_bytes(png_declaring(4, 4))

    def fail(data, flags):
        raise cv2.error("OpenCV(5.0.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate")

    monkeypatch.setattr(cv2, "imdecode", fail)
    with pytest.raises(ValueError, match=r"odd\.png: not a readable image \(OpenCV: .*Insufficient memory"):
        io.load_image(path)


def test_silencing_opencv_logs_restores_the_level(tmp_path):
    code = ("import contextlib, sys, cv2.utils.logging as log\nfrom tinysam_rt import io\nbefore = log.getLogLevel()\n"
            "for quiet in (True, False):\n"
            "    try:\n"
            "        with io.opencv_log_silenced() if quiet else contextlib.nullcontext():\n"
            "            io.load_image(sys.argv[1])\n"
            "    except ValueError:\n"
            "        print('quiet done' if quiet else 'loud done', file=sys.stderr, flush=True)\n"
            "assert log.getLogLevel() == before\n")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 16)  # a PNG signature, then garbage: OpenCV logs errors
    result = subprocess.run([sys.executable, "-c", code, str(junk)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    quiet, loud = result.stderr.split("quiet done\n")
    assert "grfmt_png" not in quiet  # silenced inside the block
    assert "grfmt_png" in loud and loud.endswith("loud done\n")  # and back to OpenCV's level after


def test_cli_and_bench_give_one_line_for_a_too_large_image(big_png, tmp_path, capsys):
    for command in ("segment", "everything"):
        args = [command, str(big_png), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")]
        result = subprocess.run([sys.executable, "-m", "tinysam_rt.cli", *args, *(["--point", "1,1"] if command == "segment" else [])],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr == f"tinysam {command}: error: {big_png}: {TOO_LARGE} (2^20 per side) by default\n"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("{}")
    assert bench.main(["--model", str(tmp_path / "m"), "--image", str(big_png)]) == 2
    assert capsys.readouterr().err == f"tinysam-bench: error: --image {big_png}: {TOO_LARGE} (2^20 per side) by default\n"
    assert not (tmp_path / "out").exists()


def test_cli_error_for_a_corrupt_image_is_one_line_without_opencv_logs(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 16)
    result = subprocess.run([sys.executable, "-m", "tinysam_rt.cli", "segment", str(junk), "--point", "1,1",
                             "--model", str(tmp_path / "no-model")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == f"tinysam segment: error: {junk}: not a readable image (unsupported format or corrupt file)\n"
