import json
import shutil

import pytest

from tinysam_rt import manifest as mf
from tinysam_rt.errors import ModelFileError


@pytest.fixture
def model_copy(fp32_model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(fp32_model_dir, out)
    return out


def test_exported_manifest_is_valid(fp32_model_dir):
    manifest = mf.load_manifest(fp32_model_dir)
    assert manifest.weights_id == "random-seed-0"
    assert manifest.opset == 17
    assert manifest.preprocess.image_size == 1024
    assert manifest.preprocess.pixel_mean == (123.675, 116.28, 103.53)
    assert manifest.preprocess.pixel_std == (58.395, 57.12, 57.375)
    assert [s.name for s in manifest.decoder.inputs] == [n for n, _ in mf.DECODER_INPUTS]
    assert manifest.encoder.sha256 == mf.sha256_file(manifest.encoder.path)


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        mf.load_manifest(tmp_path)


def test_resolve_model_dir_explains_how_to_get_a_model(tmp_path, monkeypatch):
    monkeypatch.delenv(mf.MODEL_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tinysam export"):
        mf.resolve_model_dir()
    monkeypatch.setenv(mf.MODEL_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="TINYSAM_MODEL_DIR"):
        mf.resolve_model_dir()


def test_invalid_json(model_copy):
    (model_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="manifest.json: not valid JSON"):
        mf.load_manifest(model_copy)


def test_missing_field(model_copy):
    doc = json.loads((model_copy / "manifest.json").read_text())
    del doc["graphs"]["decoder"]["sha256"]
    (model_copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="graphs.decoder: missing field 'sha256'"):
        mf.load_manifest(model_copy)


def test_truncated_graph_is_named(model_copy):
    path = model_copy / "decoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="decoder.onnx: sha256"):
        mf.load_manifest(model_copy)


def test_missing_graph_is_named(model_copy):
    (model_copy / "encoder.onnx").unlink()
    with pytest.raises(ModelFileError, match="encoder.onnx: encoder file listed in the manifest is missing"):
        mf.load_manifest(model_copy)


def test_swapped_files_fail_the_hash_check(model_copy):
    enc, dec = model_copy / "encoder.onnx", model_copy / "decoder.onnx"
    enc_bytes, dec_bytes = enc.read_bytes(), dec.read_bytes()
    enc.write_bytes(dec_bytes)
    dec.write_bytes(enc_bytes)
    with pytest.raises(ModelFileError, match="encoder.onnx: sha256"):
        mf.load_manifest(model_copy)


def test_mismatched_weights_are_refused(model_copy):
    doc = json.loads((model_copy / "manifest.json").read_text())
    doc["graphs"]["decoder"]["weights_id"] = "random-seed-1"
    (model_copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="same weights"):
        mf.load_manifest(model_copy)


def test_unsupported_format_version(model_copy):
    doc = json.loads((model_copy / "manifest.json").read_text())
    doc["format_version"] = 99
    (model_copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="format_version 99"):
        mf.load_manifest(model_copy)


def test_points_decoder_is_optional(model_copy):
    """Directories exported before the points decoder existed (or INT8 ones) still load."""
    doc = json.loads((model_copy / "manifest.json").read_text())
    del doc["graphs"]["points_decoder"]
    (model_copy / "manifest.json").write_text(json.dumps(doc))
    (model_copy / "points_decoder.onnx").unlink()
    manifest = mf.load_manifest(model_copy)
    assert manifest.points_decoder is None
    assert [g.role for g in manifest.graphs] == ["encoder", "decoder"]


def test_points_decoder_is_verified_like_the_others(model_copy):
    path = model_copy / "points_decoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="points_decoder.onnx: sha256 .* points_decoder sha256"):
        mf.load_manifest(model_copy)
    path.unlink()
    with pytest.raises(ModelFileError, match="points_decoder.onnx: points_decoder file listed in the manifest is missing"):
        mf.load_manifest(model_copy)


def test_points_decoder_of_other_weights_is_refused(model_copy):
    doc = json.loads((model_copy / "manifest.json").read_text())
    doc["graphs"]["points_decoder"]["weights_id"] = "random-seed-1"
    (model_copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="points_decoder points_decoder.onnx was made from weights"):
        mf.load_manifest(model_copy)
