import numpy as np
import pytest

from tinysam_rt.embedding import EmbeddingCache
from tinysam_rt.predictor import TinySAMPredictor
from conftest import synthetic_image


@pytest.fixture(scope="module")
def predictor(fp32_model_dir):
    return TinySAMPredictor(model_dir=fp32_model_dir, threads=2)


class CountingEncoder:
    """Wraps the real EncoderSession and counts runs."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def run(self, tensor):
        self.calls += 1
        return self.inner.run(tensor)


def test_one_liner_and_shapes(fp32_model_dir):
    image = synthetic_image(300, 400)
    masks, scores, low_res = TinySAMPredictor(image, model_dir=fp32_model_dir).predict([(100, 150)])
    assert masks.shape == (3, 300, 400) and masks.dtype == bool
    assert scores.shape == (3,) and low_res.shape == (3, 256, 256)


def test_model_dir_from_environment(fp32_model_dir, monkeypatch):
    monkeypatch.setenv("TINYSAM_MODEL_DIR", str(fp32_model_dir))
    assert TinySAMPredictor().manifest.model_dir == fp32_model_dir


def test_single_mask_is_the_best_of_three(predictor):
    predictor.set_image(synthetic_image(200, 300, seed=3))
    masks3, scores3, low3 = predictor.predict([(50, 60), (120, 80)], [1, 0])
    mask1, score1, low1 = predictor.predict([(50, 60), (120, 80)], [1, 0], multimask_output=False)
    best = int(np.argmax(scores3))
    assert mask1.shape == (1, 200, 300)
    assert np.array_equal(mask1[0], masks3[best]) and score1[0] == scores3[best]
    logits, _, _ = predictor.predict([(50, 60)], return_logits=True)
    assert logits.dtype == np.float32 and np.array_equal(logits > 0, predictor.predict([(50, 60)])[0])


def test_cache_skips_the_encoder_for_same_content(fp32_model_dir):
    predictor = TinySAMPredictor(model_dir=fp32_model_dir, cache_size=2)
    counter = predictor._encoder = CountingEncoder(predictor._encoder)
    image_a, image_b, image_c = (synthetic_image(64, 80, seed=s) for s in (1, 2, 3))
    predictor.set_image(image_a)
    predictor.set_image(image_a.copy())  # same content, other buffer
    assert counter.calls == 1
    predictor.set_image(image_b)
    predictor.set_image(image_c)  # evicts a (LRU, size 2)
    assert counter.calls == 3 and predictor.cache_len == 2
    predictor.set_image(image_a)
    assert counter.calls == 4


def test_an_images_decoder_side_is_computed_once_and_kept_with_its_embedding(fp32_model_dir):
    predictor = TinySAMPredictor(model_dir=fp32_model_dir, threads=2, cache_size=2)
    image_a, image_b = synthetic_image(64, 80, seed=4), synthetic_image(64, 80, seed=5)
    predictor.set_image(image_a)
    assert predictor.embedding.decoder_cache == {}
    first = predictor.predict([(30, 20)], [1])
    (side,) = predictor.embedding.decoder_cache.values()
    second = predictor.predict([(10, 50), (40, 40)], [1, 0])
    again = predictor.predict([(30, 20)], [1])
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)  # read from the cache: the same bits
    assert predictor.embedding.decoder_cache[next(iter(predictor.embedding.decoder_cache))] is side
    predictor.set_image(image_b)
    predictor.predict([(30, 20)], [1])
    (other,) = predictor.embedding.decoder_cache.values()
    assert not np.array_equal(other, side)  # each image its own
    predictor.set_image(image_a)  # back from the embedding cache, with its decoder side
    assert next(iter(predictor.embedding.decoder_cache.values())) is side
    assert second[0].shape == (3, 64, 80)


def test_cache_size_validation(fp32_model_dir):
    with pytest.raises(ValueError, match="cache_size"):
        EmbeddingCache(-1)
    assert EmbeddingCache(np.int64(2)).max_entries == 2


@pytest.mark.parametrize("change, message", [
    (lambda e: {"features": e.features[0]},
     r"embedding.features must be a float32 array of shape \(1, 256, 64, 64\), got float32 \(256, 64, 64\)"),
    (lambda e: {"features": e.features.astype(np.float64)}, "got float64 \\(1, 256, 64, 64\\)"),
    (lambda e: {"features": e.features.tolist()}, "embedding.features must be a float32 array .*got list"),
    (lambda e: {"original_size": "60x80"}, r"embedding.original_size must be \(H, W\) ints >= 2, got '60x80'"),
    (lambda e: {"original_size": (0, 0)}, r"embedding.original_size must be \(H, W\) ints >= 2, got \(0, 0\)"),
    (lambda e: {"input_size": 768}, r"embedding.input_size must be \(768, 1024\) .*got 768"),
    (lambda e: {"input_size": (1024, 1024)},
     r"embedding.input_size must be \(768, 1024\) \(an image of 60x80 resized to 1024\), got \(1024, 1024\)"),
])
def test_a_malformed_embedding_is_refused_and_the_current_one_kept(predictor, change, message):
    import dataclasses

    image = synthetic_image(60, 80, seed=9)
    good = predictor.set_image(image)
    before = predictor.predict([(30, 20)])
    bad = dataclasses.replace(good, **change(good))
    with pytest.raises(ValueError, match=message):
        predictor.set_embedding(bad)
    with pytest.raises(ValueError, match=message):
        predictor.predict_batch(np.zeros((1, 2, 2)), [[1, -1]], embedding=bad)
    assert predictor.embedding is good
    np.testing.assert_array_equal(predictor.predict([(30, 20)])[2], before[2])


def test_prompts_with_many_points_go_to_the_plain_decoder_in_smaller_parts(predictor, monkeypatch):
    """The points decoder's work grows with the points per prompt (sessions.POINTS_DECODER_MAX_POINTS);
    predict_batch runs such prompts in parts of at most MAX_DECODER_POINTS points."""
    import tinysam_rt.predictor as predictor_module
    from tinysam_rt.sessions import POINTS_DECODER_MAX_POINTS

    decoder = predictor._decoder
    calls = []
    for name in ("decoder", "points_decoder"):
        session = getattr(decoder, name)
        monkeypatch.setattr(session, "run", lambda *args, _run=session.run, _name=name, **kw: (
            calls.append((_name, len(args[1]), args[1].shape[1])) or _run(*args, **kw)))
    embedding = predictor.embed(synthetic_image(100, 100, seed=3))
    rng = np.random.default_rng(2)
    for n in (POINTS_DECODER_MAX_POINTS, POINTS_DECODER_MAX_POINTS + 1):
        calls.clear()
        coords = rng.uniform(0, 1000, (12, n, 2))
        predictor.predict_batch(coords, np.ones((12, n)), embedding=embedding)
        part = predictor_module.MAX_DECODER_POINTS // n  # prompts per decoder run: 5
        expected = "points_decoder" if n <= POINTS_DECODER_MAX_POINTS else "decoder"
        assert calls == [(expected, min(part, 12 - start), n) for start in range(0, 12, part)]


def test_predict_batch_matches_single_predicts(predictor):
    predictor.set_image(synthetic_image(256, 256, seed=5))
    points = np.array([[30.0, 40.0], [200.0, 100.0], [128.0, 128.0]])
    coords_1024 = np.stack([points * 4, np.zeros_like(points)], axis=1)  # (B, 2, 2) with padding point
    labels = np.tile([1.0, -1.0], (3, 1))
    low, iou = predictor.predict_batch(coords_1024, labels)
    assert low.shape == (3, 3, 256, 256) and iou.shape == (3, 3)
    for i, point in enumerate(points):
        _, scores, low_single = predictor.predict(point[None])
        assert np.allclose(iou[i], scores, atol=1e-4) and np.abs(low[i] - low_single).max() < 1e-3


def test_predict_batch_workers_run_parts_side_by_side_with_the_same_outputs(predictor, monkeypatch):
    embedding = predictor.embed(synthetic_image(240, 320, seed=6))
    rng = np.random.default_rng(1)
    coords = np.concatenate([rng.uniform(0, 1000, (10, 1, 2)), np.zeros((10, 1, 2))], axis=1)  # (10, 2, 2)
    labels = np.tile([1.0, -1.0], (10, 1))
    parts = [predictor.predict_batch(coords[s], labels[s], embedding=embedding) for s in (slice(0, 4), slice(4, 8), slice(8, 10))]
    low, iou = predictor.predict_batch(coords, labels, embedding=embedding, workers=3)  # parts of ceil(10 / 3) = 4
    # Each part equals that part run alone on the predictor's own (2-thread) session: one thread
    # per run changes how ORT splits work, not what it sums.
    np.testing.assert_array_equal(low, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(iou, np.concatenate([p[1] for p in parts]))
    # The single-thread sessions are loaded once and kept.
    single = predictor._decoder.single_threaded()
    assert single is predictor._decoder.single_threaded() and single is not predictor._decoder
    assert single.points_decoder.intra_op_threads == single.decoder.intra_op_threads == 1
    # A predictor whose sessions already have one thread runs its parts on them: no second copy.
    one_thread = TinySAMPredictor(model_dir=predictor.manifest.model_dir, threads=1)
    assert one_thread._decoder.single_threaded() is one_thread._decoder
    # A batch no larger than one part runs as it always did.
    np.testing.assert_array_equal(predictor.predict_batch(coords[:1], labels[:1], embedding=embedding, workers=4)[0],
                                  predictor.predict_batch(coords[:1], labels[:1], embedding=embedding)[0])
    # An error in one part reaches the caller.
    run = single.run

    def failing_last_part(features, part_coords, *args):
        if len(part_coords) == 2:
            raise RuntimeError("part failed")
        return run(features, part_coords, *args)

    monkeypatch.setattr(single, "run", failing_last_part)
    with pytest.raises(RuntimeError, match="part failed"):
        predictor.predict_batch(coords, labels, embedding=embedding, workers=3)
    for workers in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"workers must be an int >= 1, got {workers!r}"):
            predictor.predict_batch(coords, labels, embedding=embedding, workers=workers)


def test_errors_name_the_problem(fp32_model_dir):
    fresh = TinySAMPredictor(model_dir=fp32_model_dir)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict([(1, 1)])
    fresh.set_image(synthetic_image(50, 60))
    with pytest.raises(ValueError, match="outside the image"):
        fresh.predict([(61, 10)])
    with pytest.raises(ValueError, match="one label per point"):
        fresh.predict([(1, 1), (2, 2)], [1])
    with pytest.raises(ValueError, match="point_coords or box"):
        fresh.predict()
    assert fresh.predict([(10, 10)])[0].shape == (3, 50, 60)  # still usable afterwards


# --- equivalence with segment_anything.SamPredictor on identical weights ---------------------

def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


@pytest.fixture(scope="module")
def sam_pair(fp32_model_dir, torch_model):
    from segment_anything import SamPredictor

    return TinySAMPredictor(model_dir=fp32_model_dir), SamPredictor(torch_model)


def _images():
    from conftest import _shared_image_paths
    from tinysam_rt.io import load_image

    images = [("synthetic_480x640", synthetic_image(480, 640, seed=7))]
    paths = _shared_image_paths()
    if paths:
        images.append((paths[2].name, load_image(paths[2])))  # a large photo: exercises downscaling
    return images


@pytest.mark.torch
@pytest.mark.parametrize("name, image", _images(), ids=[n for n, _ in _images()])
def test_matches_sam_predictor(sam_pair, name, image):
    ours, theirs = sam_pair
    ours.set_image(image)
    theirs.set_image(image)
    h, w = image.shape[:2]
    cases = {
        "point": dict(point_coords=np.array([[w * 0.4, h * 0.5]]), point_labels=np.array([1])),
        "points": dict(point_coords=np.array([[w * 0.3, h * 0.3], [w * 0.7, h * 0.6], [w * 0.5, h * 0.9]]),
                       point_labels=np.array([1, 0, 1])),
        "box": dict(box=np.array([w * 0.1, h * 0.2, w * 0.6, h * 0.8])),
        "point+box": dict(point_coords=np.array([[w * 0.3, h * 0.5]]), point_labels=np.array([1]),
                          box=np.array([w * 0.1, h * 0.2, w * 0.6, h * 0.8])),
    }
    _, _, previous = theirs.predict(**cases["point"])
    cases["point+mask"] = dict(cases["point"], mask_input=previous[1:2])
    for case, kwargs in cases.items():
        ref_masks, ref_scores, ref_low = theirs.predict(**kwargs, multimask_output=True)
        masks, scores, low = ours.predict(**kwargs, multimask_output=True)
        assert masks.shape == ref_masks.shape == (3, h, w), case
        assert np.abs(scores - ref_scores).max() <= 1e-3, case
        assert min(_iou(m, r) for m, r in zip(masks, ref_masks)) >= 0.99, case
        # TinySAM's single-mask rule: the best of the 3 (SAM would return token 0).
        single, single_score, _ = ours.predict(**kwargs, multimask_output=False)
        best = int(np.argmax(ref_scores))
        assert _iou(single[0], ref_masks[best]) >= 0.99 and abs(single_score[0] - ref_scores[best]) <= 1e-3, case
