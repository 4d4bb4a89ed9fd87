"""One model shared by 4 threads gives exactly the serial answers (see docs/THREADING.md).

The threads start together at a barrier and run encoder and decoder calls on the same two ORT
sessions, so the runs really overlap. Serial references come from the same model file.
"""

import threading

import numpy as np
import pytest

from tinysam_rt.embedding import EmbeddingCache, ImageEmbedding
from tinysam_rt.everything import AmgConfig, TinySAMAutomaticMaskGenerator
from tinysam_rt.predictor import TinySAMPredictor
from conftest import synthetic_image

THREADS = 4
# Different sizes too, so a result computed on another thread's image would not even fit.
IMAGES = [synthetic_image(60 + 12 * i, 90 - 7 * i, seed=30 + i) for i in range(THREADS)]
PROMPTS = [
    dict(point_coords=[[10.0, 20.0]]),
    dict(point_coords=[[40.0, 30.0], [15.0, 12.0]], point_labels=[1, 0]),
    dict(box=[5.0, 6.0, 50.0, 44.0]),
    dict(point_coords=[[30.0, 25.0]], box=[2.0, 2.0, 60.0, 50.0]),
]


@pytest.fixture(scope="module")
def shared(fp32_model_dir):
    """A predictor (threads=1) and the serial embeddings of IMAGES, computed once."""
    predictor = TinySAMPredictor(model_dir=fp32_model_dir, threads=1, cache_size=THREADS)
    return predictor, [predictor.embed(image) for image in IMAGES]


def _run_threads(target, count=THREADS):
    """Run target(i) on `count` threads started together; re-raise the first failure."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def worker(i):
        try:
            barrier.wait(timeout=60)
            results[i] = target(i)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a worker hung"
    if errors:
        raise errors[0]
    return results


def _prompts_of(image_index, predictor):
    """Every prompt, in an order that differs per thread, on the predictor's current image."""
    return [predictor.predict(**PROMPTS[(image_index + k) % len(PROMPTS)]) for k in range(len(PROMPTS))]


def _assert_same_outputs(expected, got):
    assert len(got) == len(expected)
    for (masks, scores, low), (c_masks, c_scores, c_low) in zip(expected, got):
        np.testing.assert_array_equal(c_masks, masks)
        np.testing.assert_allclose(c_scores, scores, atol=1e-6)
        np.testing.assert_allclose(c_low, low, atol=1e-6)


def test_clones_on_four_threads_match_serial_runs(fp32_model_dir, shared):
    """predictor.clone() per thread: shared sessions, own current image (the supported pattern).

    Without a cache every set_image runs the one shared encoder session, 4 at a time, while the
    other threads' decoder runs go through the shared decoder session.
    """
    reference, embeddings = shared
    serial = []
    for i, embedding in enumerate(embeddings):
        clone = reference.clone()
        clone.set_embedding(embedding)
        serial.append(_prompts_of(i, clone))
    predictor = TinySAMPredictor(model_dir=fp32_model_dir, threads=1, cache_size=0)

    def work(i):
        clone = predictor.clone()
        features = clone.set_image(IMAGES[i]).features
        return features, clone.original_size, _prompts_of(i, clone)

    for i, (features, size, outputs) in enumerate(_run_threads(work)):
        assert size == IMAGES[i].shape[:2]
        np.testing.assert_allclose(features, embeddings[i].features, atol=1e-6)
        _assert_same_outputs(serial[i], outputs)
    assert predictor.cache_len == 0


def test_stateless_calls_on_one_shared_predictor(shared):
    """embed() and predict_batch(embedding=...) never touch the current image: safe on one object."""
    predictor, embeddings = shared
    coords = np.array([[[200.0, 150.0], [0.0, 0.0]], [[400.0, 300.0], [0.0, 0.0]]])  # (2, 2, 2) 1024 frame
    labels = np.array([[1.0, -1.0], [1.0, -1.0]])
    serial = [predictor.predict_batch(coords + i, labels, embedding=embeddings[i]) for i in range(THREADS)]
    predictor.set_image(IMAGES[0])

    def work(i):
        out = []
        for _ in range(3):
            embedding = predictor.embed(IMAGES[i])  # cache hits, from 4 threads at once
            out.append(predictor.predict_batch(coords + i, labels, embedding=embedding))
        return out

    for i, outs in enumerate(_run_threads(work)):
        for low, iou in outs:
            np.testing.assert_allclose(low, serial[i][0], atol=1e-6)
            np.testing.assert_allclose(iou, serial[i][1], atol=1e-6)
    assert predictor.original_size == IMAGES[0].shape[:2]  # the current image was left alone


def test_one_generator_shared_by_threads(shared):
    """Everything mode keeps no per-run state on the generator, so one instance can serve threads."""
    predictor, _ = shared
    # Permissive thresholds so random weights still leave masks to compare.
    config = AmgConfig(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    generator = TinySAMAutomaticMaskGenerator(predictor, config)
    images = IMAGES[:2]
    serial = [generator.generate(image) for image in images]
    assert all(len(records) > 0 for records in serial)
    concurrent = _run_threads(lambda i: generator.generate(images[i % 2]))
    for i, records in enumerate(concurrent):
        expected = serial[i % 2]
        assert len(records) == len(expected)
        for ours, theirs in zip(records, expected):
            np.testing.assert_array_equal(ours["segmentation"], theirs["segmentation"])
            assert ours["point_coords"] == theirs["point_coords"]


def test_embedding_cache_stays_bounded_under_contention():
    """8 threads hammer get/put on a 3-entry cache: never more than 3 entries, LRU order intact."""
    cache = EmbeddingCache(3)
    features = np.zeros((1, 256, 64, 64), np.float32)
    made = {key: ImageEmbedding(features, (1, 1), (1, 1), "m") for key in range(10)}
    peak = []

    def hammer(i):
        rng = np.random.default_rng(i)
        for _ in range(3000):
            key = int(rng.integers(0, 10))
            got = cache.get(key)
            assert got is None or got is made[key]
            if got is None:
                cache.put(key, made[key])
            peak.append(len(cache))
        return True

    assert all(_run_threads(hammer, count=8))
    assert max(peak) <= 3 and len(cache) <= 3
    cache.put("newest", made[0])
    assert cache.get("newest") is made[0]


def test_clones_with_intra_op_threads(fp32_model_dir, shared):
    """Same check with the sessions' own intra-op pools in use (threads=2 x 4 callers oversubscribes
    2 cores on purpose)."""
    _, embeddings = shared
    predictor = TinySAMPredictor(model_dir=fp32_model_dir, threads=2, cache_size=0)
    clones = [predictor.clone() for _ in range(THREADS)]
    for clone, embedding in zip(clones, embeddings):
        clone.set_embedding(embedding)  # same encoder file, so the same model_id
    serial = [[clone.predict(**prompt) for prompt in PROMPTS] for clone in clones]
    concurrent = _run_threads(lambda i: [clones[i].predict(**prompt) for prompt in PROMPTS])
    for expected, got in zip(serial, concurrent):
        _assert_same_outputs(expected, got)
