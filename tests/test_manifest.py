import json
import re
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


def test_model_dir_pointing_at_the_manifest_names_its_directory(model_copy, monkeypatch):
    """Not the generic advice, `tinysam export --out .../manifest.json`, which would be harmful."""
    path = model_copy / "manifest.json"
    message = f"must be the directory holding manifest.json, not the path of manifest.json itself: got {path}; use {model_copy}"
    with pytest.raises(FileNotFoundError, match=re.escape(f"model_dir {message}")) as info:
        mf.resolve_model_dir(path)
    assert "tinysam export" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=re.escape(f"model_dir {message}")):
        mf.load_manifest(str(path))
    monkeypatch.setenv(mf.MODEL_DIR_ENV, str(path))
    with pytest.raises(FileNotFoundError, match=re.escape(f"$TINYSAM_MODEL_DIR {message}")):
        mf.resolve_model_dir()
    gone = model_copy / "gone" / "manifest.json"  # does not exist: still no advice to export there
    with pytest.raises(FileNotFoundError, match=re.escape(f"use {gone.parent}")):
        mf.resolve_model_dir(gone)


def test_model_dir_that_is_a_file_is_not_offered_as_an_export_target(model_copy):
    path = model_copy / "encoder.onnx"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no tinysam-rt model at {path} (from model_dir argument): "
                                                          "it is a file, and manifest.json not found")) as info:
        mf.resolve_model_dir(path)
    assert "--out" not in str(info.value)


def test_model_dir_expands_user(model_copy, monkeypatch):
    monkeypatch.setenv("HOME", str(model_copy.parent))
    assert mf.resolve_model_dir("~/model") == model_copy
    assert mf.resolve_model_dir(mf.Path("~") / "model") == model_copy
    monkeypatch.setenv(mf.MODEL_DIR_ENV, "~/model")
    assert mf.resolve_model_dir() == model_copy
    assert mf.load_manifest("~/model", verify=False).model_dir == model_copy


def _sane_variant(model_copy, mutate):
    doc = json.loads((model_copy / "manifest.json").read_text())
    mutate(doc)
    return mf.parse_manifest(doc, model_copy)


def test_range_checks_keep_sane_values(model_copy):
    """The edges of each checked range still load (the refused side is in test_model_files)."""
    def no_normalisation(doc):
        doc["preprocess"].update(pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1], pad_value=255)
        doc["postprocess"]["mask_threshold"] = -1e30
    manifest = _sane_variant(model_copy, no_normalisation)
    assert manifest.preprocess.pixel_std == (1.0, 1.0, 1.0) and manifest.preprocess.pad_value == 255.0
    assert manifest.mask_threshold == -1e30
    manifest = _sane_variant(model_copy, lambda doc: doc["preprocess"].update(pixel_mean=[255] * 3, pixel_std=[255] * 3, pad_value=-1))
    assert manifest.preprocess.pixel_mean == (255.0,) * 3
    manifest = _sane_variant(model_copy, lambda doc: doc["preprocess"].update(pixel_std=[mf.MIN_PIXEL_STD] * 3))
    assert manifest.preprocess.pixel_std == (1e-3,) * 3


def test_quantization_recipe_is_kept_as_written(model_copy):
    recipe = {"tool": "tinysam quantize", "graphs": {"encoder": {"reduce_range": False, "method": "minmax"},
                                                     "decoder": {"method": "entropy"}}}
    assert _sane_variant(model_copy, lambda doc: doc.update(quantization=recipe)).quantization == recipe
    assert _sane_variant(model_copy, lambda doc: doc.update(quantization={})).quantization == {}
    assert _sane_variant(model_copy, lambda doc: doc.pop("quantization")).quantization is None


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
