"""Broken, foreign and mismatched model files: one ModelFileError naming the file, nothing loaded.

Every case goes through the public entry point, `TinySAMPredictor(model_dir=...)`, on a copy of
the session's random-weight export in which one thing is wrong. Cases already covered at the
module level (tests/test_manifest.py: missing manifest, invalid JSON, missing field, truncated or
missing or swapped graph failing the sha256 check, manifest weights mismatch, format_version;
tests/test_sessions.py: swapped graphs with re-hashed manifest, random bytes) are not repeated.
"""

import copy
import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="building foreign ONNX graphs needs onnx (dev extra)")
from onnx import TensorProto, helper

from tinysam_rt import manifest as mf
from tinysam_rt.errors import ModelFileError
from tinysam_rt.predictor import TinySAMPredictor
from conftest import synthetic_image

GRAPH_FILES = ("encoder.onnx", "decoder.onnx", "points_decoder.onnx")


def _model_copy(source, dest):
    """A model dir whose graphs are symlinks to `source`'s (cheap; sha256 reads through links)."""
    dest.mkdir()
    for name in GRAPH_FILES:
        (dest / name).symlink_to(Path(source) / name)
    (dest / mf.MANIFEST_NAME).write_bytes((Path(source) / mf.MANIFEST_NAME).read_bytes())
    return dest


def _manifest_doc(model_dir):
    return json.loads((model_dir / mf.MANIFEST_NAME).read_text())


def _write_manifest(model_dir, doc):
    (model_dir / mf.MANIFEST_NAME).write_text(json.dumps(doc))


def _replace_graph(model_dir, name, data, weights_id=None):
    """Put `data` in place of a graph file and make the manifest's sha256 (and weights_id) match."""
    (model_dir / name).unlink()
    (model_dir / name).write_bytes(data)
    doc = _manifest_doc(model_dir)
    role = name.split(".")[0]
    doc["graphs"][role]["sha256"] = mf.sha256_file(model_dir / name)
    if weights_id is not None:
        doc["graphs"][role]["weights_id"] = weights_id
    _write_manifest(model_dir, doc)


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


# --- tiny foreign ONNX graphs built with onnx.helper ----------------------------------------------


def _model_bytes(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "foreign", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _identity_model():
    """Some other model entirely: y = x."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    return _model_bytes([helper.make_node("Identity", ["x"], ["y"])], [x], [y])


def _decoder_like(elem_type=TensorProto.FLOAT, embed_side=64, input_names=None, output_names=None, extra_input=None,
                  op="Expand"):
    """A graph with the decoder's I/O (names, shapes) but arbitrary insides, optionally altered."""
    names = input_names or [n for n, _ in mf.DECODER_INPUTS]
    shapes = [(1, 256, embed_side, embed_side), ("B", "N", 2), ("B", "N"), ("B", 1, 256, 256), ("B",)]
    inputs = [helper.make_tensor_value_info(n, elem_type, list(s)) for n, s in zip(names, shapes)]
    if extra_input:
        inputs.append(helper.make_tensor_value_info(extra_input, elem_type, [2]))
    out_names = output_names or [n for n, _ in mf.DECODER_OUTPUTS]
    outputs = [helper.make_tensor_value_info(out_names[0], elem_type, ["B", 3, 256, 256]),
               helper.make_tensor_value_info(out_names[1], elem_type, ["B", 3])]
    outputs += [helper.make_tensor_value_info(n, elem_type, ["B", 3, 256, 256]) for n in out_names[2:]]
    consts = [helper.make_tensor("three_planes", TensorProto.INT64, [4], [1, 3, 1, 1]),
              helper.make_tensor("three", TensorProto.INT64, [2], [1, 3]),
              helper.make_tensor("axis1", TensorProto.INT64, [1], [1])]
    nodes = [helper.make_node(op, [names[3], "three_planes"], [out_names[0]]),
             helper.make_node("Unsqueeze", [names[4], "axis1"], ["has_col"]),
             helper.make_node("Expand", ["has_col", "three"], [out_names[1]])]
    nodes += [helper.make_node("Identity", [out_names[0]], [n]) for n in out_names[2:]]
    return _model_bytes(nodes, inputs, outputs, consts)


def _sam_official_decoder():
    """The I/O of segment-anything's scripts/export_onnx_model.py (orig_im_size in, masks out)."""
    return _decoder_like(extra_input="orig_im_size", output_names=["masks", "iou_predictions", "low_res_masks"])


def test_foreign_graphs_are_valid_onnx():
    """The fixtures below really are loadable models, so the runtime's checks are what refuse them."""
    import onnxruntime as ort

    for data in (_identity_model(), _decoder_like(), _decoder_like(TensorProto.FLOAT16), _sam_official_decoder()):
        onnx.checker.check_model(onnx.load_from_string(data))
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(_decoder_like(), providers=["CPUExecutionProvider"])
    low, iou = session.run(None, {"image_embeddings": np.zeros((1, 256, 64, 64), np.float32),
                                  "point_coords": np.zeros((2, 1, 2), np.float32),
                                  "point_labels": np.zeros((2, 1), np.float32),
                                  "mask_input": np.zeros((2, 1, 256, 256), np.float32),
                                  "has_mask_input": np.ones(2, np.float32)})
    assert low.shape == (2, 3, 256, 256) and iou.shape == (2, 3)


def _perturbed_decoder(fp32_model_dir):
    """decoder.onnx with one weight changed: stands in for the decoder of another export."""
    model = onnx.load(str(fp32_model_dir / "decoder.onnx"))
    init = next(t for t in model.graph.initializer
                if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2 and np.prod(t.dims) >= 256)
    values = onnx.numpy_helper.to_array(init).copy()
    values.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    return model.SerializeToString()


# Graph-file cases: (file, bytes builder, weights_id override, message fragment).
GRAPH_CASES = {
    "truncated_encoder": ("encoder.onnx", lambda d: (d / "encoder.onnx").read_bytes()[: 4 << 20], None,
                          "ONNX Runtime cannot load the encoder graph"),
    "empty_decoder": ("decoder.onnx", lambda d: b"", None, "ONNX Runtime cannot load the decoder graph"),
    "identity_model_as_encoder": ("encoder.onnx", lambda d: _identity_model(), None,
                                  "graph inputs are \\['x'\\], expected \\['image'\\]"),
    "sam_official_decoder": ("decoder.onnx", lambda d: _sam_official_decoder(), None,
                             "graph inputs are .*orig_im_size"),
    "decoder_with_64x32_embeddings": ("decoder.onnx", lambda d: _decoder_like(embed_side=32), None,
                                      "input 'image_embeddings' has shape \\(1, 256, 32, 32\\)"),
    "decoder_in_float16": ("decoder.onnx", lambda d: _decoder_like(TensorProto.FLOAT16), None,
                           "input 'image_embeddings' has type tensor\\(float16\\)"),
    "decoder_with_unknown_op": ("decoder.onnx", lambda d: _decoder_like(op="NoSuchTinySamOp"), None,
                                "ONNX Runtime cannot load the decoder graph"),
    "decoder_of_another_export": ("decoder.onnx", _perturbed_decoder, "random-seed-1",
                                  "decoder.onnx was made from weights 'random-seed-1' .* same weights"),
}


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_bad_graph_file_is_one_named_error(fp32_model_dir, tmp_path, case):
    name, build, weights_id, message = GRAPH_CASES[case]
    model = _model_copy(fp32_model_dir, tmp_path / "model")
    _replace_graph(model, name, build(fp32_model_dir), weights_id)
    fds = _open_fds()
    with pytest.raises(ModelFileError, match=message) as info:
        TinySAMPredictor(model_dir=model, threads=1)
    assert name in str(info.value)
    del info
    gc.collect()
    assert _open_fds() <= fds, "a failed load must not keep files or sessions open"


# Manifest cases: (mutation of the parsed document, message fragment). All raise ModelFileError
# naming manifest.json (or the graph whose entry is wrong).
def _set(path, value):
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


MANIFEST_CASES = {
    "postprocess_null": (_set(["postprocess"], None), "'postprocess' must be dict"),
    "pixel_mean_not_numbers": (_set(["preprocess", "pixel_mean"], ["red", 1, 2]), "'pixel_mean' must be a finite number"),
    "pixel_std_nan": (_set(["preprocess", "pixel_std"], [float("nan"), 57.0, 57.0]), "'pixel_std' must be a finite number"),
    "pixel_std_zero": (_set(["preprocess", "pixel_std"], [0.0, 57.0, 57.0]), "std > 0"),
    "pixel_mean_two_values": (_set(["preprocess", "pixel_mean"], [1.0, 2.0]), "must be 3 values"),
    "image_size_512": (_set(["preprocess", "image_size"], 512), "image_size must be 1024"),
    "image_size_string": (_set(["preprocess", "image_size"], "1024"), "'image_size' must be int"),
    "opset_string": (_set(["opset"], "17"), "'opset' must be int"),
    "mask_threshold_string": (_set(["postprocess", "mask_threshold"], "0"), "'mask_threshold' must be a finite number"),
    "graphs_missing_decoder": (lambda doc: doc["graphs"].pop("decoder"), "missing field 'decoder'"),
    "wrong_sha256": (_set(["graphs", "decoder", "sha256"], "0" * 64), "decoder.onnx: sha256"),
    "manifest_declares_other_inputs": (_set(["graphs", "encoder", "inputs"], [{"name": "pixel_values", "shape": [1, 3, 1024, 1024]}]),
                                       "encoder.onnx: manifest declares inputs \\['pixel_values'\\]"),
    "not_a_manifest": (lambda doc: doc.update(format="something-else"), "not a tinysam-rt manifest"),
    # The quantization recipe: the predictor reads graphs.<role>.reduce_range from it.
    "quantization_string": (_set(["quantization"], "int8"), "field 'quantization' must be null or an object"),
    "quantization_list": (_set(["quantization"], [1]), "field 'quantization' must be null or an object"),
    "quantization_false": (_set(["quantization"], False), "field 'quantization' must be null or an object"),
    "quantization_graphs_list": (_set(["quantization"], {"graphs": ["encoder"]}),
                                 "field 'quantization.graphs' must be an object"),
    "quantization_graphs_null": (_set(["quantization"], {"graphs": None}), "field 'quantization.graphs' must be an object"),
    "quantization_recipe_string": (_set(["quantization"], {"graphs": {"encoder": "x"}}),
                                   "field 'quantization.graphs.encoder' must be an object"),
    "quantization_reduce_range_string": (_set(["quantization"], {"graphs": {"decoder": {"reduce_range": "false"}}}),
                                         "field 'quantization.graphs.decoder.reduce_range' must be true or false"),
    # Finite in float64 (what JSON gives) but not in float32 (what the runtime computes in).
    "pixel_mean_beyond_float32": (_set(["preprocess", "pixel_mean"], [1e300, 0, 0]),
                                  "'pixel_mean' must be a finite number \\(float32: magnitude at most 3.403e\\+38\\), got 1e\\+300"),
    "pixel_mean_int_beyond_float64": (_set(["preprocess", "pixel_mean"], [10 ** 400, 0, 0]), "'pixel_mean' must be a finite number"),
    "pad_value_beyond_float32": (_set(["preprocess", "pad_value"], 1e300), "'pad_value' must be a finite number"),
    "mask_threshold_beyond_float32": (_set(["postprocess", "mask_threshold"], 1e39), "'mask_threshold' must be a finite number"),
    "pixel_std_zero_in_float32": (_set(["preprocess", "pixel_std"], [1e-300] * 3),
                                  "'pixel_std' must be in \\[0.001, 255\\] \\(std > 0.*got 1e-300"),
    "pixel_std_denormal": (_set(["preprocess", "pixel_std"], [58.0, 1e-40, 57.0]), "'pixel_std' must be in \\[0.001, 255\\]"),
    "pixel_std_negative": (_set(["preprocess", "pixel_std"], [-58.0, 57.0, 57.0]), "'pixel_std' must be in \\[0.001, 255\\]"),
    "pixel_mean_off_pixel_scale": (_set(["preprocess", "pixel_mean"], [300.0, 0, 0]), "'pixel_mean' must be in \\[0, 255\\]"),
    "pad_value_beyond_normalised_pixels": (_set(["preprocess", "pad_value"], 5.0),
                                           "'pad_value' must be in \\[-2.1179, 2.64\\] \\(the span of normalised pixels"),
    "graph_file_with_nul": (_set(["graphs", "decoder", "file"], "decoder\x00.onnx"), "graphs.decoder: field 'file' must name"),
    "shape_entry_object": (_set(["graphs", "decoder", "inputs", 0, "shape"], [1, {}, 64, 64]),
                           "'image_embeddings' shape entries must be ints >= 0"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_bad_manifest_is_one_named_error(fp32_model_dir, tmp_path, case):
    mutate, message = MANIFEST_CASES[case]
    model = _model_copy(fp32_model_dir, tmp_path / "model")
    doc = copy.deepcopy(_manifest_doc(model))
    mutate(doc)
    _write_manifest(model, doc)
    with pytest.raises(ModelFileError, match=message) as info:
        TinySAMPredictor(model_dir=model, threads=1)
    assert "manifest.json" in str(info.value) or ".onnx" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b"null", b"[" * 100000, b'{"opset": ' + b"9" * 5000 + b"}"],
                         ids=["empty", "not_utf8", "json_list", "json_null", "nested_past_the_stack", "int_past_digit_limit"])
def test_unreadable_manifest_bytes(fp32_model_dir, tmp_path, content):
    model = _model_copy(fp32_model_dir, tmp_path / "model")
    (model / mf.MANIFEST_NAME).write_bytes(content)
    with pytest.raises(ModelFileError, match="manifest.json: (not valid JSON|not a tinysam-rt manifest)"):
        TinySAMPredictor(model_dir=model)


def test_missing_model_dir_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tinysam-rt model at {tmp_path / 'nowhere'}"):
        TinySAMPredictor(model_dir=tmp_path / "nowhere")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        TinySAMPredictor(model_dir=tmp_path / "a_file")


def test_decoder_of_another_export_with_a_consistent_manifest_is_refused(fp32_model_dir, tmp_path):
    """Splice another export's whole decoder entry (file, sha256, weights_id) into the manifest."""
    model = _model_copy(fp32_model_dir, tmp_path / "model")
    (model / "decoder.onnx").unlink()
    (model / "decoder_other.onnx").write_bytes(_perturbed_decoder(fp32_model_dir))
    doc = _manifest_doc(model)
    entry = mf.graph_entry("decoder", model / "decoder_other.onnx", "fp32", "random-seed-1",
                           mf.DECODER_INPUTS, mf.DECODER_OUTPUTS)
    doc["graphs"]["decoder"] = entry
    _write_manifest(model, doc)
    with pytest.raises(ModelFileError, match="decoder_other.onnx was made from weights 'random-seed-1'"):
        TinySAMPredictor(model_dir=model)


def test_failed_load_leaves_other_predictors_working(fp32_model_dir, tmp_path):
    good = TinySAMPredictor(synthetic_image(40, 50), model_dir=fp32_model_dir, threads=1)
    before = good.predict([(10, 10)])[2]
    model = _model_copy(fp32_model_dir, tmp_path / "model")
    _replace_graph(model, "decoder.onnx", _decoder_like(TensorProto.FLOAT16))
    with pytest.raises(ModelFileError):
        TinySAMPredictor(model_dir=model)
    np.testing.assert_array_equal(good.predict([(10, 10)])[2], before)


def test_cli_reports_a_bad_manifest_in_one_line(fp32_model_dir, tmp_path, capsys):
    """Was a traceback: `"quantization": "int8"` reached the predictor as an AttributeError."""
    from tinysam_rt import cli
    from tinysam_rt.io import write_png

    model = _model_copy(fp32_model_dir, tmp_path / "model")
    doc = _manifest_doc(model)
    doc["quantization"] = "int8"
    _write_manifest(model, doc)
    write_png(tmp_path / "scene.png", synthetic_image(40, 50))
    code = cli.main(["segment", str(tmp_path / "scene.png"), "--point", "5,5", "--model", str(model),
                     "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and lines == [f"tinysam segment: error: {model / 'manifest.json'}: field 'quantization' must be "
                                   "null or an object (a quantize recipe), got 'int8'"]
    assert not (tmp_path / "out").exists()
