import json
import shutil

import numpy as np
import pytest

from tinysam_rt import manifest as mf
from tinysam_rt.errors import ModelFileError
from tinysam_rt.sessions import DecoderSession, EncoderSession, PointsDecoderSession, load_decoder, make_session_options


def test_session_options_factory():
    options = make_session_options(2)
    assert options.intra_op_num_threads == 2
    assert make_session_options(np.int64(1)).intra_op_num_threads == 1  # numpy ints are ints
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            make_session_options(bad)


def test_sessions_run_with_contract_shapes(fp32_model_dir):
    manifest = mf.load_manifest(fp32_model_dir)
    encoder, decoder = EncoderSession(manifest.encoder, 2), DecoderSession(manifest.decoder, 2)
    embeddings = encoder.run(np.zeros((1, 3, 1024, 1024), np.float32))
    assert embeddings.shape == (1, 256, 64, 64) and np.isfinite(embeddings).all()
    for batch, points in ((1, 2), (4, 3)):
        low, iou = decoder.run(embeddings, np.full((batch, points, 2), 100, np.float32),
                               np.ones((batch, points), np.float32),
                               np.zeros((batch, 1, 256, 256), np.float32), np.zeros(batch, np.float32))
        assert low.shape == (batch, 3, 256, 256) and iou.shape == (batch, 3)


def _rehash_manifest(model_dir):
    """Make the manifest's hashes match whatever files now sit in the directory."""
    doc = json.loads((model_dir / "manifest.json").read_text())
    for entry in doc["graphs"].values():
        entry["sha256"] = mf.sha256_file(model_dir / entry["file"])
    (model_dir / "manifest.json").write_text(json.dumps(doc))


def test_swapped_graphs_with_matching_hashes_fail_the_io_check(fp32_model_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(fp32_model_dir, model)
    (model / "encoder.onnx").rename(model / "tmp.onnx")
    (model / "decoder.onnx").rename(model / "encoder.onnx")
    (model / "tmp.onnx").rename(model / "decoder.onnx")
    _rehash_manifest(model)
    manifest = mf.load_manifest(model)
    with pytest.raises(ModelFileError, match="encoder.onnx: graph inputs .*swapped"):
        EncoderSession(manifest.encoder)


def test_random_bytes_are_a_model_file_error(fp32_model_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(fp32_model_dir, model)
    (model / "decoder.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    _rehash_manifest(model)
    manifest = mf.load_manifest(model)
    with pytest.raises(ModelFileError, match="decoder.onnx: ONNX Runtime cannot load the decoder graph"):
        DecoderSession(manifest.decoder)


def test_decoder_in_the_points_decoder_role_fails_the_io_check(fp32_model_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(fp32_model_dir, model)
    shutil.copyfile(model / "decoder.onnx", model / "points_decoder.onnx")
    _rehash_manifest(model)
    manifest = mf.load_manifest(model)
    with pytest.raises(ModelFileError, match="points_decoder.onnx: graph inputs are .*expected"):
        PointsDecoderSession(manifest.points_decoder)
    with pytest.raises(ModelFileError, match="points_decoder.onnx"):
        load_decoder(manifest)


def test_graph_stamped_with_other_weights_is_refused_behind_a_rehashed_manifest(fp32_model_dir, tmp_path):
    """A decoder from another export (its own weights_id inside the file) cannot be smuggled in
    by re-hashing the manifest: the session compares the file's id with the manifest's."""
    onnx = pytest.importorskip("onnx", reason="needs onnx")
    model = tmp_path / "m"
    shutil.copytree(fp32_model_dir, model)
    graph = onnx.load(str(model / "decoder.onnx"))
    assert {p.key: p.value for p in graph.metadata_props} == {mf.WEIGHTS_ID_METADATA_KEY: "random-seed-0"}
    onnx.helper.set_model_props(graph, {mf.WEIGHTS_ID_METADATA_KEY: "random-seed-7"})
    onnx.save(graph, str(model / "decoder.onnx"))
    _rehash_manifest(model)
    manifest = mf.load_manifest(model)
    with pytest.raises(ModelFileError, match="decoder.onnx: this decoder graph was made from weights 'random-seed-7' "
                                             "but the manifest says 'random-seed-0'"):
        DecoderSession(manifest.decoder)
