"""The exported ONNX graphs compute what the PyTorch model computes, and export publishes atomically.

The graphs are the session's seed-0 export (`fp32_model_dir`, conftest.py), run through the
runtime's own sessions; the reference is `torch_model` (same seed) called the SamPredictor way:
`prompt_encoder(points, boxes, masks)` then `mask_decoder(...)`.
"""

import json

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="needs the dev extra (torch)")
pytest.importorskip("segment_anything", reason="needs the dev extra (segment_anything)")

from tinysam_export import export_onnx  # noqa: E402
from tinysam_export.model.build import PIXEL_MEAN, PIXEL_STD, build_tinysam, save_random_checkpoint  # noqa: E402
from tinysam_rt.manifest import MANIFEST_FORMAT, load_manifest, sha256_file  # noqa: E402
from tinysam_rt.sessions import DecoderSession, EncoderSession, PointsDecoderSession, PromptDecoder  # noqa: E402

pytestmark = pytest.mark.torch
TOLERANCE = 1e-4  # max abs difference, fp32 ORT vs fp32 PyTorch on CPU


@pytest.fixture(scope="module")
def manifest(fp32_model_dir):
    return load_manifest(fp32_model_dir)


@pytest.fixture(scope="module")
def image():
    """A normalised, padded image: (1, 3, 1024, 1024) float32."""
    return torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def torch_embeddings(torch_model, image):
    torch.set_num_threads(2)
    with torch.no_grad():
        return torch_model.image_encoder(image)  # (1, 256, 64, 64)


@pytest.fixture(scope="module")
def decoder(manifest):
    return DecoderSession(manifest.decoder, threads=2)


def test_manifest_describes_the_export(fp32_model_dir, manifest):
    doc = manifest.raw
    assert sorted(p.name for p in fp32_model_dir.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json",
                                                                "points_decoder.onnx"]
    assert doc["weights"] == {"source": "random", "checkpoint_sha256": None, "seed": 0, "weights_id": "random-seed-0"}
    assert {g.weights_id for g in manifest.graphs} == {manifest.weights_id} == {"random-seed-0"}
    assert [s.name for s in manifest.points_decoder.inputs] == ["image_embeddings", "point_coords", "point_labels",
                                                                "upscale_iou_threshold", "image_side_cache"]
    assert [s.name for s in manifest.points_decoder.outputs] == ["low_res_masks", "iou_predictions", "image_side"]
    assert doc["opset"] == 17 and doc["export"]["opset"] == 17
    assert doc["export"]["torch"] == torch.__version__ and "dynamo=False" in doc["export"]["exporter"]
    assert doc["preprocess"]["resize_filter"] == "bilinear_antialias"
    assert doc["preprocess"]["normalize"] == "runtime"
    assert manifest.preprocess.pixel_mean == PIXEL_MEAN and manifest.preprocess.pixel_std == PIXEL_STD
    assert doc["postprocess"]["mask_tokens"] == [1, 2, 3]
    # ~6.0M encoder parameters (without the unused classifier head) in fp32, ~4.0M decoder ones.
    assert 20e6 < doc["graphs"]["encoder"]["bytes"] < 32e6
    assert 12e6 < doc["graphs"]["decoder"]["bytes"] < 22e6
    assert 12e6 < doc["graphs"]["points_decoder"]["bytes"] < 22e6


@pytest.mark.parametrize("role", ["encoder", "decoder", "points_decoder"])
def test_graphs_have_no_merged_initializers(manifest, role):
    """Every weight is distinct, so the exporter merged none into Identity nodes (quantize needs that)."""
    onnx = pytest.importorskip("onnx", reason="needs onnx")
    from onnx import numpy_helper

    graph = onnx.load(str(getattr(manifest, role).path)).graph
    assert not [node.name for node in graph.node if node.op_type == "Identity"]
    digests = [numpy_helper.to_array(init).tobytes() for init in graph.initializer if np.prod(init.dims) > 4]
    assert len(set(digests)) == len(digests)


def test_encoder_matches_torch(manifest, image, torch_embeddings):
    embeddings = EncoderSession(manifest.encoder, threads=2).run(image.numpy())
    assert embeddings.shape == (1, 256, 64, 64)
    diff = np.abs(embeddings - torch_embeddings.numpy()).max()
    assert diff <= TOLERANCE, f"encoder max abs diff {diff:.2e}"


def _prompts(batch, num_points, with_box, with_mask, seed):
    """Random SAM prompts in the 1024 frame: coords (B, N, 2), labels (B, N), boxes (B, 4) | None,
    masks (B, 1, 256, 256) | None."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(batch, num_points, 2, generator=gen) * 1024
    labels = (torch.rand(batch, num_points, generator=gen) > 0.3).float()  # fg and bg
    boxes = None
    if with_box:
        corners = torch.sort(torch.rand(batch, 2, 2, generator=gen) * 1024, dim=1).values  # (B, 2, 2)
        boxes = corners.reshape(batch, 4)  # x0, y0, x1, y1
    masks = torch.randn(batch, 1, 256, 256, generator=gen) * 4 if with_mask else None
    return coords, labels, boxes, masks


def _decoder_feeds(coords, labels, boxes, masks):
    """The runtime's packing: box corners labelled 2/3, else one (0, 0) padding point labelled -1."""
    batch = coords.shape[0]
    if boxes is not None:
        extra_coords = boxes.reshape(batch, 2, 2)
        extra_labels = torch.tensor([[2.0, 3.0]]).expand(batch, 2)
    else:
        extra_coords = torch.zeros(batch, 1, 2)
        extra_labels = -torch.ones(batch, 1)
    return {
        "point_coords": torch.cat([coords, extra_coords], dim=1).numpy(),
        "point_labels": torch.cat([labels, extra_labels], dim=1).numpy(),
        "mask_input": (masks if masks is not None else torch.zeros(batch, 1, 256, 256)).numpy(),
        "has_mask_input": np.full(batch, float(masks is not None), dtype=np.float32),
    }


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("with_box", [False, True], ids=["no_box", "box"])
@pytest.mark.parametrize("num_points", [1, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_decoder_matches_sam_predictor_path(torch_model, torch_embeddings, decoder, batch, num_points,
                                            with_box, with_mask):
    coords, labels, boxes, masks = _prompts(batch, num_points, with_box, with_mask, seed=batch * 10 + num_points)
    with torch.no_grad():
        sparse, dense = torch_model.prompt_encoder(points=(coords, labels), boxes=boxes, masks=masks)
        expected_masks, expected_iou = torch_model.mask_decoder(
            image_embeddings=torch_embeddings,
            image_pe=torch_model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
    low_res, iou = decoder.run(torch_embeddings.numpy(), **_decoder_feeds(coords, labels, boxes, masks))
    assert low_res.shape == (batch, 3, 256, 256) and iou.shape == (batch, 3)
    assert np.abs(low_res - expected_masks.numpy()).max() <= TOLERANCE
    assert np.abs(iou - expected_iou.numpy()).max() <= TOLERANCE
    assert 0.0 < (low_res > 0).mean() < 1.0  # random weights still give masks, not all-one-sign logits


def _sam_decoder(torch_model, torch_embeddings, coords, labels, boxes, masks):
    """SamPredictor's decoder path: (B, 3, 256, 256) logits and (B, 3) predicted IoU as numpy."""
    with torch.no_grad():
        sparse, dense = torch_model.prompt_encoder(points=(coords, labels), boxes=boxes, masks=masks)
        low_res, iou = torch_model.mask_decoder(
            image_embeddings=torch_embeddings, image_pe=torch_model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
    return low_res.numpy(), iou.numpy()


@pytest.fixture(scope="module")
def points_decoder(manifest):
    return PointsDecoderSession(manifest.points_decoder, threads=2)


@pytest.mark.parametrize("with_box", [False, True], ids=["no_box", "box"])
@pytest.mark.parametrize("num_points", [1, 3, 12])
@pytest.mark.parametrize("batch", [1, 5])
def test_points_decoder_matches_sam_predictor_path(torch_model, torch_embeddings, points_decoder, batch,
                                                   num_points, with_box):
    """The points graph (shared layer 0, reassociated projections, GEMM upscaler) is SAM's decoder.

    12 points go past the token count where the reassociation stops saving work: still exact.
    """
    coords, labels, boxes, _ = _prompts(batch, num_points, with_box, False, seed=batch * 100 + num_points)
    expected_masks, expected_iou = _sam_decoder(torch_model, torch_embeddings, coords, labels, boxes, None)
    feeds = _decoder_feeds(coords, labels, boxes, None)
    low_res, iou = points_decoder.run(torch_embeddings.numpy(), feeds["point_coords"], feeds["point_labels"])
    assert low_res.shape == (batch, 3, 256, 256) and iou.shape == (batch, 3)
    assert np.abs(low_res - expected_masks).max() <= TOLERANCE
    assert np.abs(iou - expected_iou).max() <= TOLERANCE


def test_points_decoder_gate_skips_exactly_the_prompts_at_or_below_the_threshold(torch_model, torch_embeddings,
                                                                                 points_decoder):
    coords, labels, _, _ = _prompts(8, 1, False, False, seed=11)
    expected_masks, expected_iou = _sam_decoder(torch_model, torch_embeddings, coords, labels, None, None)
    feeds = _decoder_feeds(coords, labels, None, None)
    embeddings = torch_embeddings.numpy()
    assert points_decoder.gated
    _, iou = points_decoder.run(embeddings, feeds["point_coords"], feeds["point_labels"])
    best = np.sort(iou.max(axis=1))  # (8,) float32
    # The gate must agree with everything mode's filter, numpy's `iou > t` on float32 IoUs (which
    # compares in float32): at the 4th best IoU, 4 prompts are at or below it; 1e-12 under the 5th,
    # float32 rounding makes the 5th "at" the threshold too.
    for threshold, computed in ((float(best[3]), 4), (float(best[4]) - 1e-12, 3), (float(best[-1]), 0), (-1.0, 8)):
        low_res, gated_iou = points_decoder.run(embeddings, feeds["point_coords"], feeds["point_labels"], threshold)
        np.testing.assert_array_equal(gated_iou, iou)  # the IoU head runs for every prompt
        run = iou.max(axis=1) > threshold
        assert run.sum() == computed
        assert np.abs(low_res[run] - expected_masks[run]).max(initial=0) <= TOLERANCE
        assert not low_res[~run].any(), "skipped prompts come back as zeros"
    assert np.abs(iou - expected_iou).max() <= TOLERANCE


def test_points_decoder_image_side_cache_changes_no_bit(torch_model, torch_embeddings, points_decoder):
    coords, labels, _, _ = _prompts(4, 2, False, False, seed=13)
    feeds = _decoder_feeds(coords, labels, None, None)
    embeddings = torch_embeddings.numpy()
    cache = {}
    computed = points_decoder.run(embeddings, feeds["point_coords"], feeds["point_labels"], cache=cache)
    (key, image_side), = cache.items()
    assert image_side.shape == (7, 8, 4096, 16) and not image_side.flags.writeable
    assert key[1] == points_decoder.graph.sha256  # another graph file would not read it
    # Read back from the cache on the next call: bit for bit the same outputs, still SAM's.
    again = points_decoder.run(embeddings, feeds["point_coords"], feeds["point_labels"], cache=cache)
    for a, b in zip(computed, again):
        np.testing.assert_array_equal(a, b)
    assert cache[key] is image_side
    # Given the cache, the graph returns an empty image_side: no 14 MiB copy back per call.
    session = ort.InferenceSession(str(points_decoder.graph.path), providers=["CPUExecutionProvider"])
    raw_feeds = {"image_embeddings": embeddings, "point_coords": feeds["point_coords"],
                 "point_labels": feeds["point_labels"], "upscale_iou_threshold": np.array(-np.inf, np.float32),
                 "image_side_cache": image_side}
    raw = session.run(["image_side"], raw_feeds)[0]
    assert raw.shape == (0, 8, 4096, 16)
    expected_masks, expected_iou = _sam_decoder(torch_model, torch_embeddings, coords, labels, None, None)
    assert np.abs(again[0] - expected_masks).max() <= TOLERANCE and np.abs(again[1] - expected_iou).max() <= TOLERANCE
    # A cache really replaces the computation: another image's side gives other masks.
    other = {key: np.ascontiguousarray(image_side[:, :, ::-1])}
    moved = points_decoder.run(embeddings, feeds["point_coords"], feeds["point_labels"], cache=other)
    assert np.abs(moved[0] - computed[0]).max() > 1e-2


class _RecordingDecoder(DecoderSession):
    """A real DecoderSession that records that it ran (to see which graph PromptDecoder picked)."""

    calls = 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return super().run(*args, **kwargs)


class _RecordingPointsDecoder(PointsDecoderSession):
    calls = 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return super().run(*args, **kwargs)


def test_prompt_decoder_routes_by_mask_input(manifest, torch_model, torch_embeddings):
    decoder = PromptDecoder(_RecordingDecoder(manifest.decoder, 2), _RecordingPointsDecoder(manifest.points_decoder, 2))
    embeddings = torch_embeddings.numpy()
    coords, labels, _, masks = _prompts(3, 2, False, True, seed=7)
    without = _decoder_feeds(coords, labels, None, None)
    low_res, iou = decoder.run(embeddings, **without)
    assert (decoder.points_decoder.calls, decoder.decoder.calls) == (1, 0)
    plain = decoder.decoder.run(embeddings, **without)
    assert np.abs(low_res - plain[0]).max() <= TOLERANCE and np.abs(iou - plain[1]).max() <= TOLERANCE
    # One prompt of the batch with a mask input: the whole batch goes to the full decoder.
    mixed = _decoder_feeds(coords, labels, None, masks)
    mixed["has_mask_input"][:2] = 0
    decoder.decoder.calls = 0
    low_res, _ = decoder.run(embeddings, **mixed)
    assert (decoder.points_decoder.calls, decoder.decoder.calls) == (1, 1)
    expected, _ = _sam_decoder(torch_model, torch_embeddings, coords[2:], labels[2:], None, masks[2:])
    assert np.abs(low_res[2:] - expected).max() <= TOLERANCE
    # A model directory without a points decoder serves every prompt with the decoder.
    alone = PromptDecoder(_RecordingDecoder(manifest.decoder, 2))
    alone.run(embeddings, **without)
    assert alone.decoder.calls == 1


def test_checkpoint_export_records_its_sha256_and_equals_the_seed_export(tmp_path, manifest):
    checkpoint = save_random_checkpoint(tmp_path / "seed0.pth", seed=0)
    path = export_onnx.export_model(tmp_path / "from_ckpt", checkpoint=checkpoint, seed=None)
    from_ckpt = load_manifest(path.parent)
    digest = sha256_file(checkpoint)
    assert from_ckpt.raw["weights"] == {"source": "checkpoint", "checkpoint_sha256": digest, "seed": None,
                                        "weights_id": f"sha256:{digest}"}
    assert {g.weights_id for g in from_ckpt.graphs} == {f"sha256:{digest}"}
    onnx = pytest.importorskip("onnx", reason="needs onnx")
    for ours, seeded in zip(from_ckpt.graphs, manifest.graphs):
        a, b = onnx.load(str(ours.path)), onnx.load(str(seeded.path))
        # Each file carries its own weights_id; otherwise (same weights, deterministic exporter)
        # the graphs are byte-identical.
        assert {p.key: p.value for p in a.metadata_props} == {"tinysam_rt.weights_id": f"sha256:{digest}"}
        assert {p.key: p.value for p in b.metadata_props} == {"tinysam_rt.weights_id": "random-seed-0"}
        del a.metadata_props[:], b.metadata_props[:]
        assert a.SerializeToString() == b.SerializeToString()


def test_pre_publish_check_rejects_graphs_of_other_weights(fp32_model_dir):
    # (It passes for the model a graph came from: every export_model call above runs it.)
    other = build_tinysam(seed=1)
    with pytest.raises(RuntimeError, match="ONNX Runtime image_embeddings differs from PyTorch by"):
        export_onnx.smoke_run(fp32_model_dir, other)


def _fail(model_dir, model):
    raise RuntimeError("smoke run failed (injected)")


@pytest.mark.parametrize("existing", [False, True], ids=["new_dir", "existing_dir"])
def test_failed_export_leaves_nothing_and_keeps_previous_output(tmp_path, monkeypatch, existing):
    target = tmp_path / "vit_t"
    previous = {"format": MANIFEST_FORMAT, "previous": True}  # an earlier export: the only non-empty --out replaced
    if existing:
        target.mkdir()
        (target / "manifest.json").write_text(json.dumps(previous))
    monkeypatch.setattr(export_onnx, "smoke_run", _fail)
    with pytest.raises(RuntimeError, match="smoke run failed"):
        export_onnx.export_model(target, seed=0)
    assert [p.name for p in tmp_path.iterdir()] == (["vit_t"] if existing else [])  # no temp leftovers
    if existing:
        assert [p.name for p in target.iterdir()] == ["manifest.json"]
        assert json.loads((target / "manifest.json").read_text()) == previous


def test_export_without_checkpoint_needs_an_int_seed(tmp_path):
    with pytest.raises(ValueError, match="seed must be an int when no checkpoint is given, got None"):
        export_onnx.export_model(tmp_path / "out", checkpoint=None, seed=None)
    assert not (tmp_path / "out").exists()


def test_main_reports_a_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    assert export_onnx.main(["--checkpoint", str(missing), "--out", str(tmp_path / "out")]) == 1
    assert f"error: checkpoint must be an existing file, got {missing}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_main_needs_a_weights_source(tmp_path):
    with pytest.raises(SystemExit) as info:
        export_onnx.main(["--out", str(tmp_path / "out")])
    assert info.value.code == 2
