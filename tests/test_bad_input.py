"""Bad-input battery over every public entry point, table-driven.

Each bad case asserts the exception type, a message naming the argument, and that the predictor
still gives the same answer on a valid call afterwards (a failed call corrupts no state).
Valid-but-unusual inputs (lists, strided/negative-stride/Fortran/read-only views, 16-bit PNG,
EXIF-rotated JPEG, grayscale and RGBA files) must work and give the canonical input's answer.

Model-file problems live in tests/test_model_files.py; interrupted writes in tests/test_atomic.py.
Cases already in tests/test_prompts.py, test_preprocess.py, test_cli.py and test_everything.py
(each at its own module's level) are repeated here only where they go through a different entry
point; `tinysam-bench`'s bad flags and images are in tests/test_bench.py.
"""

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tinysam_rt import cli, io
from tinysam_rt.embedding import ImageEmbedding
from tinysam_rt.everything import AmgConfig, TinySAMAutomaticMaskGenerator
from tinysam_rt.predictor import TinySAMPredictor
from conftest import synthetic_image

H, W = 60, 80
IMAGE = synthetic_image(H, W, seed=21)
POINT = [[30.0, 20.0]]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def predictor(fp32_model_dir):
    return TinySAMPredictor(model_dir=fp32_model_dir, threads=2, cache_size=4)


@pytest.fixture(scope="module")
def baseline(predictor):
    """(masks, scores, low_res) of the valid call used to check that state survived an error."""
    predictor.set_image(IMAGE)
    return predictor.predict(POINT)


def assert_still_works(predictor, baseline):
    """The current image is still IMAGE and a valid predict gives the same answer as before."""
    assert predictor.original_size == (H, W)
    masks, scores, low_res = predictor.predict(POINT)
    np.testing.assert_array_equal(masks, baseline[0])
    np.testing.assert_allclose(scores, baseline[1], atol=1e-6)
    np.testing.assert_allclose(low_res, baseline[2], atol=1e-5)


# --- images: set_image, embed, the constructor, everything mode --------------------------------


def _gray():
    return IMAGE[..., 0].copy()


IMAGE_CASES = {
    "float32": (lambda: IMAGE.astype(np.float32), TypeError, r"image must be uint8 .*got dtype float32"),
    "float64_in_0_1": (lambda: IMAGE / 255.0, TypeError, r"image must be uint8 .*got dtype float64"),
    "int16": (lambda: IMAGE.astype(np.int16), TypeError, r"image must be uint8 .*got dtype int16"),
    "uint16": (lambda: IMAGE.astype(np.uint16) * 257, TypeError, r"image must be uint8 .*got dtype uint16"),
    "bool": (lambda: IMAGE > 127, TypeError, r"image must be uint8 .*got dtype bool"),
    "grayscale_2d": (_gray, ValueError, r"image must have 3 channels .*grayscale"),
    "grayscale_hw1": (lambda: _gray()[..., None], ValueError, r"image must have 3 channels .*grayscale"),
    "rgba": (lambda: np.dstack([IMAGE, np.full((H, W), 255, np.uint8)]), ValueError, r"image must have shape \(H, W, 3\).*RGBA"),
    "rank4_batch": (lambda: IMAGE[None], ValueError, r"image must have shape \(H, W, 3\) RGB, got \(1, 60, 80, 3\)"),
    "rank1": (lambda: IMAGE.ravel(), ValueError, r"image must have shape \(H, W, 3\)"),
    "rank0": (lambda: np.array(7, np.uint8), ValueError, r"image must have shape \(H, W, 3\) RGB, got \(\)"),
    "chw_layout": (lambda: IMAGE.transpose(2, 0, 1).copy(), ValueError, r"image must have shape \(H, W, 3\) RGB, got \(3, 60, 80\)"),
    "0x0": (lambda: np.zeros((0, 0, 3), np.uint8), ValueError, "image must be at least 2x2 pixels, got 0x0"),
    "1x1": (lambda: np.zeros((1, 1, 3), np.uint8), ValueError, "image must be at least 2x2 pixels, got 1x1"),
    "1x50000": (lambda: np.zeros((1, 50000, 3), np.uint8), ValueError, "image must be at least 2x2 pixels, got 1x50000"),
    "50000x1": (lambda: np.zeros((50000, 1, 3), np.uint8), ValueError, "image must be at least 2x2 pixels, got 50000x1"),
    "2x50000": (lambda: np.zeros((2, 50000, 3), np.uint8), ValueError, "image of 2x50000 is too elongated"),
    "nested_list": (lambda: IMAGE.tolist(), TypeError, "image must be a numpy array .*got list"),
    "none_to_set_image": (lambda: None, TypeError, "image must be a numpy array .*got NoneType"),
    "path_string": (lambda: "photo.jpg", TypeError, "image must be a numpy array .*got str"),
}


def _everything(predictor):
    return TinySAMAutomaticMaskGenerator(predictor, AmgConfig(points_per_side=2)).generate


ENTRIES = {
    "set_image": lambda p, image: p.set_image(image),
    "embed": lambda p, image: p.embed(image),
    "constructor": lambda p, image: TinySAMPredictor(image, model_dir=p.manifest.model_dir, threads=1),
    "everything": lambda p, image: _everything(p)(image),
}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_image(predictor, baseline, entry, case):
    make, error, message = IMAGE_CASES[case]
    if entry == "constructor" and case == "none_to_set_image":
        pytest.skip("image=None means 'no image yet' for the constructor")
    cache_before = predictor.cache_len
    with pytest.raises(error, match=message):
        ENTRIES[entry](predictor, make())
    assert predictor.cache_len == cache_before
    assert_still_works(predictor, baseline)


@pytest.mark.parametrize("image_format", ["rgb", "BGRA", None, 3])
def test_bad_image_format(predictor, baseline, image_format):
    with pytest.raises(ValueError, match=f"image_format must be 'RGB' or 'BGR', got {image_format!r}"):
        predictor.set_image(IMAGE[..., ::-1], image_format=image_format)
    assert_still_works(predictor, baseline)


def _views_of(image):
    """Arrays with the same pixels as `image` but unusual memory layouts; all must work."""
    big = np.zeros((2 * H, 2 * W, 3), np.uint8)
    big[::2, ::2] = image
    reversed_copy = image[::-1, ::-1].copy()
    read_only = image.copy()
    read_only.flags.writeable = False
    transposed = image.transpose(1, 0, 2).copy()
    rgba = np.dstack([image, np.zeros((H, W), np.uint8)])
    big_endian = image.astype(">u1")  # same bytes, other byte-order flag
    return {
        "strided_view": big[::2, ::2],
        "negative_strides": reversed_copy[::-1, ::-1],
        "fortran_order": np.asfortranarray(image),
        "read_only": read_only,
        "transposed_view": transposed.transpose(1, 0, 2),
        "rgb_of_rgba_view": rgba[..., :3],
        "big_endian_flag": big_endian,
    }


def test_unusual_memory_layouts_are_the_same_image(predictor, baseline):
    """Every layout hashes to IMAGE's cache entry (content, not memory, is the key)."""
    cached = predictor.set_image(IMAGE)
    cache_before = predictor.cache_len
    for name, view in _views_of(IMAGE).items():
        assert not view.flags.c_contiguous or name in ("read_only", "big_endian_flag"), name
        assert predictor.set_image(view) is cached, name
    assert predictor.cache_len == cache_before
    assert_still_works(predictor, baseline)


def test_unusual_memory_layout_through_the_encoder(fp32_model_dir, predictor, baseline):
    """Without a cache, a negative-strided, read-only channel view goes through preprocessing and the
    encoder and gives the contiguous image's embedding."""
    fresh = TinySAMPredictor(model_dir=fp32_model_dir, threads=2, cache_size=0)
    rgba = np.dstack([IMAGE[::-1, ::-1], np.zeros((H, W), np.uint8)])
    view = rgba[::-1, ::-1, :3]
    view.flags.writeable = False
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    np.testing.assert_allclose(fresh.set_image(view).features, predictor.set_image(IMAGE).features, atol=1e-5)
    assert fresh.cache_len == 0
    assert_still_works(predictor, baseline)


def test_bgr_order_is_not_detectable_and_image_format_fixes_it(predictor, baseline):
    """Channel order cannot be told from pixels: BGR passed as RGB is accepted and embeds differently."""
    bgr = np.ascontiguousarray(IMAGE[..., ::-1])
    as_rgb = predictor.set_image(bgr)  # no error: nothing in the pixels says "BGR"
    declared = predictor.set_image(bgr, image_format="BGR")
    rgb = predictor.set_image(IMAGE)
    assert np.abs(as_rgb.features - rgb.features).max() > 1e-3
    np.testing.assert_array_equal(declared.features, rgb.features)
    assert_still_works(predictor, baseline)


# --- constructor arguments ---------------------------------------------------------------------

CONSTRUCTOR_CASES = {
    "threads_0": (dict(threads=0), ValueError, "threads must be a positive int or None, got 0"),
    "threads_negative": (dict(threads=-2), ValueError, "threads must be a positive int or None, got -2"),
    "threads_float": (dict(threads=1.5), ValueError, "threads must be a positive int or None, got 1.5"),
    "threads_string": (dict(threads="2"), ValueError, "threads must be a positive int or None, got '2'"),
    "threads_bool": (dict(threads=True), ValueError, "threads must be a positive int or None, got True"),
    "cache_negative": (dict(cache_size=-1), ValueError, "cache_size must be an int >= 0"),
    "cache_float": (dict(cache_size=2.5), ValueError, "cache_size must be an int >= 0 .*got 2.5"),
    "cache_none": (dict(cache_size=None), ValueError, "cache_size must be an int >= 0 .*got None"),
    "model_dir_int": (dict(model_dir=123), TypeError, "model_dir must be a str or os.PathLike path, got int"),
}


@pytest.mark.parametrize("case", list(CONSTRUCTOR_CASES))
def test_bad_constructor_arguments(fp32_model_dir, predictor, baseline, case):
    kwargs, error, message = CONSTRUCTOR_CASES[case]
    kwargs = {"model_dir": fp32_model_dir, **kwargs}
    with pytest.raises(error, match=message):
        TinySAMPredictor(**kwargs)
    assert_still_works(predictor, baseline)


# --- predict -------------------------------------------------------------------------------------

PREDICT_CASES = {
    "coords_nan": (dict(point_coords=[[NAN, 5.0]]), ValueError, "point_coords contains NaN or inf"),
    "coords_inf": (dict(point_coords=[[5.0, INF]]), ValueError, "point_coords contains NaN or inf"),
    "labels_nan": (dict(point_coords=POINT, point_labels=[NAN]), ValueError, "point_labels contains NaN or inf"),
    "box_nan": (dict(box=[0, 0, NAN, 10]), ValueError, "box contains NaN or inf"),
    "mask_nan": (dict(point_coords=POINT, mask_input=np.full((1, 256, 256), NAN, np.float32)), ValueError,
                 "mask_input contains NaN or inf"),
    "mask_inf": (dict(point_coords=POINT, mask_input=np.full((256, 256), -INF)), ValueError, "mask_input contains NaN or inf"),
    "point_right_of_image": (dict(point_coords=[[W + 0.5, 10]]), ValueError, r"point_coords has 1 point\(s\) outside the image \(W=80, H=60\)"),
    "point_above_image": (dict(point_coords=[[10, -1]]), ValueError, "point_coords has 1 point.* outside the image"),
    "xy_swapped_point": (dict(point_coords=[[10, 70]]), ValueError, "point_coords .* outside the image.*coordinates are \\(x, y\\)"),
    "box_outside": (dict(box=[0, 0, 10, H + 1]), ValueError, "box has 1 point.* outside the image"),
    "box_negative_width": (dict(box=[50, 10, 20, 40]), ValueError, r"box must have x0 <= x1 and y0 <= y1, got \[50.0, 10.0, 20.0, 40.0\]"),
    "box_negative_height": (dict(box=[10, 40, 20, 10]), ValueError, "box must have x0 <= x1 and y0 <= y1"),
    "box_three_values": (dict(box=[1, 2, 3]), ValueError, r"box must be \(x0, y0, x1, y1\), got shape \(3,\)"),
    "two_boxes": (dict(box=[[0, 0, 5, 5], [1, 1, 6, 6]]), ValueError, r"box must be \(x0, y0, x1, y1\), got shape \(2, 4\)"),
    "label_2": (dict(point_coords=POINT, point_labels=[2]), ValueError, r"point_labels must be 1 \(foreground\) or 0 \(background\), got \[2.0\]"),
    "label_minus_1": (dict(point_coords=POINT, point_labels=[-1]), ValueError, r"point_labels must be 1 .* got \[-1.0\]"),
    "label_half": (dict(point_coords=POINT, point_labels=[0.5]), ValueError, r"point_labels must be 1 .* got \[0.5\]"),
    "zero_points_array": (dict(point_coords=np.zeros((0, 2))), ValueError, "point_coords has 0 points; pass None"),
    "zero_points_list": (dict(point_coords=[]), ValueError, r"point_coords must have shape \(N, 2\) as \(x, y\), got \(0,\)"),
    "more_labels_than_points": (dict(point_coords=POINT, point_labels=[1, 0]), ValueError,
                                "point_labels must have one label per point: 1 points, got 2 labels"),
    "fewer_labels_than_points": (dict(point_coords=[[1, 1], [2, 2], [3, 3]], point_labels=[1]), ValueError,
                                 "point_labels must have one label per point: 3 points, got 1 labels"),
    "coords_rank3": (dict(point_coords=np.zeros((1, 1, 2))), ValueError, r"point_coords must have shape \(N, 2\).*got \(1, 1, 2\)"),
    "coords_xyz": (dict(point_coords=[[1, 2, 3]]), ValueError, r"point_coords must have shape \(N, 2\).*got \(1, 3\)"),
    "coords_ragged": (dict(point_coords=[[1, 2], [3]]), TypeError, "point_coords must be numeric array-like"),
    "coords_strings": (dict(point_coords=[["a", "b"]]), TypeError, "point_coords must be numeric array-like"),
    "coords_complex": (dict(point_coords=np.array([[1 + 2j, 3]])), TypeError, "point_coords must be real numbers"),
    "coords_none": (dict(point_coords=np.array([[None, 2]])), TypeError, "point_coords must be numeric, got None"),
    "box_none": (dict(box=[0, None, 5, 5]), TypeError, "box must be numeric, got None"),
    "labels_strings": (dict(point_coords=POINT, point_labels=["fg"]), TypeError, "point_labels must be numeric array-like"),
    "mask_64x64": (dict(point_coords=POINT, mask_input=np.zeros((1, 64, 64))), ValueError,
                   r"mask_input must have shape \(1, 256, 256\) \(low-res logits\), got \(1, 64, 64\)"),
    "mask_of_3": (dict(point_coords=POINT, mask_input=np.zeros((3, 256, 256))), ValueError, r"mask_input must have shape .*got \(3, 256, 256\)"),
    "mask_full_size": (dict(point_coords=POINT, mask_input=np.zeros((H, W))), ValueError, r"mask_input must have shape .*got \(60, 80\)"),
    "labels_without_points": (dict(point_labels=[1], box=[0, 0, 5, 5]), ValueError, "point_labels given without point_coords"),
    "no_prompt": (dict(), ValueError, "predict needs point_coords or box"),
    "mask_alone": (dict(mask_input=np.zeros((1, 256, 256))), ValueError, "predict needs point_coords or box"),
}


@pytest.mark.parametrize("case", list(PREDICT_CASES))
def test_bad_predict(predictor, baseline, case):
    kwargs, error, message = PREDICT_CASES[case]
    with pytest.raises(error, match=message):
        predictor.predict(**kwargs)
    assert_still_works(predictor, baseline)


def _read_only(array):
    array = np.array(array)
    array.flags.writeable = False
    return array


def _strided(array):
    """A non-contiguous view with the same values as `array`."""
    array = np.asarray(array, dtype=np.float64)
    wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],))
    wide[..., ::2] = array
    return wide[..., ::2]


LOW_RES = synthetic_image(256, 256, seed=3)[..., 0].astype(np.float32) / 16 - 8  # some logits


# (case, kwargs that must work, the canonical kwargs they must equal)
PREDICT_OK = {
    "list_of_tuples": (dict(point_coords=[(30, 20), (50, 40)], point_labels=[1, 0]),
                       dict(point_coords=np.array([[30.0, 20.0], [50.0, 40.0]]), point_labels=np.array([1, 0]))),
    "single_xy_pair": (dict(point_coords=(30, 20)), dict(point_coords=np.array([[30.0, 20.0]]))),
    "int16_coords_bool_labels": (dict(point_coords=np.array([[30, 20]], np.int16), point_labels=np.array([True])),
                                 dict(point_coords=np.array([[30.0, 20.0]]), point_labels=np.array([1]))),
    "float32_coords": (dict(point_coords=np.array([[30, 20]], np.float32)), dict(point_coords=np.array([[30.0, 20.0]]))),
    "strided_views": (dict(point_coords=_strided([[30, 20], [50, 40]]), point_labels=_strided([[1, 0]])[0],
                           box=_strided([[5, 5, 70, 50]])[0]),
                      dict(point_coords=np.array([[30.0, 20.0], [50.0, 40.0]]), point_labels=np.array([1, 0]),
                           box=np.array([5.0, 5, 70, 50]))),
    "read_only_arrays": (dict(point_coords=_read_only([[30.0, 20.0]]), point_labels=_read_only([1]),
                              box=_read_only([5, 5, 70, 50]), mask_input=_read_only(LOW_RES)),
                         dict(point_coords=np.array([[30.0, 20.0]]), point_labels=np.array([1]),
                              box=np.array([5.0, 5, 70, 50]), mask_input=LOW_RES[None].copy())),
    "fortran_mask_input": (dict(point_coords=POINT, mask_input=np.asfortranarray(LOW_RES)),
                           dict(point_coords=POINT, mask_input=LOW_RES[None].copy())),
    "box_as_list_and_1x4": (dict(box=[[5, 5, 70, 50]]), dict(box=np.array([5.0, 5, 70, 50]))),
    "box_as_two_corners": (dict(box=[[5, 5], [70, 50]]), dict(box=np.array([5.0, 5, 70, 50]))),
    "points_on_the_far_edge": (dict(point_coords=[[W, H]]), dict(point_coords=np.array([[80.0, 60.0]]))),
    "zero_width_box": (dict(box=[20, 10, 20, 40]), dict(box=np.array([20.0, 10, 20, 40]))),
}


@pytest.mark.parametrize("case", list(PREDICT_OK))
def test_unusual_but_valid_predict(predictor, baseline, case):
    unusual, canonical = PREDICT_OK[case]
    masks, scores, low_res = predictor.predict(**unusual)
    ref_masks, ref_scores, ref_low = predictor.predict(**canonical)
    assert masks.shape == (3, H, W)
    np.testing.assert_array_equal(masks, ref_masks)
    np.testing.assert_allclose(low_res, ref_low, atol=1e-5)
    assert_still_works(predictor, baseline)


# --- predict_batch ---------------------------------------------------------------------------------

B2 = np.array([[[120.0, 80.0], [0.0, 0.0]], [[300.0, 200.0], [0.0, 0.0]]])  # (2, 2, 2) 1024 frame
L2 = np.array([[1.0, -1.0], [1.0, -1.0]])

BATCH_CASES = {
    "coords_rank2": (dict(point_coords=B2[0], point_labels=L2), ValueError, r"point_coords must have shape \(B, N, 2\)"),
    "coords_xyz": (dict(point_coords=np.zeros((2, 2, 3)), point_labels=L2), ValueError, r"point_coords must have shape \(B, N, 2\)"),
    "b_zero": (dict(point_coords=np.zeros((0, 2, 2)), point_labels=np.zeros((0, 2))), ValueError, "with B, N >= 1, got \\(0, 2, 2\\)"),
    "n_zero": (dict(point_coords=np.zeros((2, 0, 2)), point_labels=np.zeros((2, 0))), ValueError, "with B, N >= 1, got \\(2, 0, 2\\)"),
    "labels_short": (dict(point_coords=B2, point_labels=L2[:1]), ValueError, r"point_labels must have shape \(2, 2\) \(B, N\), got \(1, 2\)"),
    "labels_flat": (dict(point_coords=B2, point_labels=L2.ravel()), ValueError, r"point_labels must have shape \(2, 2\)"),
    "label_5": (dict(point_coords=B2, point_labels=np.full((2, 2), 5.0)), ValueError, r"point_labels must be in \{-1, 0, 1, 2, 3\}, got \[5.0\]"),
    "coords_nan": (dict(point_coords=np.where(B2 > 100, NAN, B2), point_labels=L2), ValueError, "point_coords contains NaN or inf"),
    "labels_inf": (dict(point_coords=B2, point_labels=np.full((2, 2), INF)), ValueError, "point_labels contains NaN or inf"),
    "mask_nan": (dict(point_coords=B2, point_labels=L2, mask_input=np.full((2, 1, 256, 256), NAN)), ValueError,
                 "mask_input contains NaN or inf"),
    "mask_wrong_b": (dict(point_coords=B2, point_labels=L2, mask_input=np.zeros((1, 1, 256, 256))), ValueError,
                     r"mask_input must have shape \(2, 1, 256, 256\), got \(1, 1, 256, 256\)"),
    "original_pixels_not_1024_frame": (dict(point_coords=B2 * 10, point_labels=L2), ValueError,
                                       r"point_coords must be XY in the 1024 frame, within \[0, 1024\], got values from 800 to 3000"),
    "negative_coords": (dict(point_coords=B2 - 500, point_labels=L2), ValueError, "point_coords must be XY in the 1024 frame"),
    "coords_complex": (dict(point_coords=B2 + 1j, point_labels=L2), TypeError, "point_coords must be real numbers"),
    "gate_nan": (dict(point_coords=B2, point_labels=L2, upscale_iou_threshold=NAN), ValueError,
                 "upscale_iou_threshold must be finite, got nan"),
    "gate_str": (dict(point_coords=B2, point_labels=L2, upscale_iou_threshold="0.88"), TypeError,
                 "upscale_iou_threshold must be None or a number, got str"),
    "gate_bool": (dict(point_coords=B2, point_labels=L2, upscale_iou_threshold=True), TypeError,
                  "upscale_iou_threshold must be None or a number, got bool"),
    "embedding_not_an_embedding": (dict(point_coords=B2, point_labels=L2, embedding="features.npy"), TypeError,
                                   "embedding must be an ImageEmbedding, got str"),
    "embedding_of_another_model": (dict(point_coords=B2, point_labels=L2,
                                        embedding=ImageEmbedding(np.zeros((1, 256, 64, 64), np.float32), (H, W), (768, 1024), "other")),
                                   ValueError, "embedding was made by a different encoder"),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_bad_predict_batch(predictor, baseline, case):
    kwargs, error, message = BATCH_CASES[case]
    with pytest.raises(error, match=message):
        predictor.predict_batch(**kwargs)
    assert_still_works(predictor, baseline)


def test_predict_batch_needs_an_image(predictor):
    with pytest.raises(RuntimeError, match="no image is set: call set_image"):
        predictor.clone().predict_batch(B2, L2)


def test_padding_points_may_sit_anywhere(predictor, baseline):
    """Label -1 points are ignored by the decoder, so their coordinates are not range-checked."""
    padded = B2.copy()
    padded[:, 1] = -1.0
    low, iou = predictor.predict_batch(padded, L2)
    ref_low, ref_iou = predictor.predict_batch(B2, L2)
    np.testing.assert_allclose(low, ref_low, atol=1e-5)
    assert_still_works(predictor, baseline)


def test_unusual_but_valid_predict_batch(predictor, baseline):
    ref_low, ref_iou = predictor.predict_batch(B2, L2)
    for name, (coords, labels) in {
        "lists": (B2.tolist(), L2.tolist()),
        "strided": (_strided(B2), _strided(L2)),
        "read_only": (_read_only(B2), _read_only(L2)),
        "int_coords": (B2.astype(np.int32), L2.astype(np.int8)),
    }.items():
        low, iou = predictor.predict_batch(coords, labels)
        np.testing.assert_allclose(low, ref_low, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(iou, ref_iou, atol=1e-6, err_msg=name)
    assert_still_works(predictor, baseline)


def test_large_b_runs_in_bounded_chunks(predictor, baseline, monkeypatch):
    """B above the decoder chunk runs chunk by chunk and equals one-prompt runs."""
    import tinysam_rt.predictor as predictor_module

    rng = np.random.default_rng(4)
    batch = 7
    coords = np.concatenate([rng.uniform(0, 1024 * np.array([1.0, 0.75]), (batch, 1, 2)), np.zeros((batch, 1, 2))], axis=1)
    labels = np.tile([1.0, -1.0], (batch, 1))
    monkeypatch.setattr(predictor_module, "MAX_DECODER_BATCH", 3)
    low, iou = predictor.predict_batch(coords, labels)
    assert low.shape == (batch, 3, 256, 256) and iou.shape == (batch, 3) and low.dtype == np.float32
    for i in range(batch):
        one_low, one_iou = predictor.predict_batch(coords[i:i + 1], labels[i:i + 1])
        np.testing.assert_allclose(low[i], one_low[0], atol=1e-4)
        np.testing.assert_allclose(iou[i], one_iou[0], atol=1e-5)
    assert_still_works(predictor, baseline)


def _overcommit_always():
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1"
    except OSError:
        return True  # unknown: do not risk a lazily-allocated multi-terabyte array


@pytest.mark.skipif(_overcommit_always(), reason="with vm.overcommit_memory=1 a huge allocation succeeds lazily")
def test_absurd_b_is_a_clear_memory_error(predictor, baseline):
    batch = 10_000_000  # outputs alone: 7.3 TiB
    coords = np.broadcast_to(B2[:1], (batch, 2, 2))
    labels = np.broadcast_to(L2[:1], (batch, 2))
    with pytest.raises(MemoryError, match=r"point_coords has B=10000000 prompts; their outputs alone need 7324\.2 GiB"):
        predictor.predict_batch(coords, labels)
    assert_still_works(predictor, baseline)


# --- the `tinysam` command line --------------------------------------------------------------------


def _cli(capsys, *args):
    """Run cli.main in-process; returns (exit code, stdout, stderr). argparse's exits count too."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err, message):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]


CLI_USAGE = {
    "segment_point_nan": (["segment", "img.png", "--point", "nan,5"], "--point must be finite numbers"),
    "segment_no_image": (["segment"], "the following arguments are required: image"),
    "segment_point_4_values": (["segment", "x.png", "--point", "1,2,3,4"], r"--point must be 2\|3 comma-separated numbers"),
    "segment_box_letters": (["segment", "x.png", "--box", "a,b,c,d"], "--box must be numbers"),
    "segment_threads_word": (["segment", "x.png", "--point", "1,1", "--threads", "many"], "expected a positive integer, got 'many'"),
    "segment_unknown_flag": (["segment", "x.png", "--point", "1,1", "--colour", "red"], "unrecognized arguments: --colour red"),
    "everything_no_image": (["everything"], "the following arguments are required: image"),
    "everything_thresh_word": (["everything", "x.png", "--box-nms-thresh", "high"], "expected a number, got 'high'"),
    "everything_thresh_nan": (["everything", "x.png", "--stability-score-thresh", "nan"],
                              r"stability-score-thresh must be a number in \[0, 1\], got nan"),
    "everything_negative_area": (["everything", "x.png", "--min-mask-region-area", "-5"], "min-mask-region-area must be an int >= 0, got -5"),
    "everything_batch_zero": (["everything", "x.png", "--points-per-batch", "0"], "expected a positive integer, got '0'"),
    "export_both_sources": (["export", "--random-seed", "0", "--checkpoint", "x.pth", "--out", "m"], "exactly one of --checkpoint"),
    "export_seed_word": (["export", "--random-seed", "zero"], "invalid int value: 'zero'"),
    "export_opset_zero": (["export", "--random-seed", "0", "--opset", "0"], "expected a positive integer, got '0'"),
}


@pytest.mark.parametrize("case", list(CLI_USAGE))
def test_cli_usage_errors(capsys, tmp_path, monkeypatch, case):
    args, message = CLI_USAGE[case]
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, *args)
    assert code == 2, err
    _one_line(err, message)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_without_a_command_is_a_usage_error(capsys):
    code, out, err = _cli(capsys)
    assert code == 2 and "Traceback" not in err and "a command is required" in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Unusual and broken input files."""
    root = tmp_path_factory.mktemp("files")
    paths = {}
    rng = np.random.default_rng(8)
    bgr = cv2.cvtColor(IMAGE, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(root / "plain.png"), bgr)
    paths["plain"] = root / "plain.png"
    paths["16bit"] = root / "deep.png"
    deep = np.minimum(bgr.astype(np.uint32) * 257 + rng.integers(0, 257, bgr.shape), 65535).astype(np.uint16)
    cv2.imwrite(str(paths["16bit"]), deep)  # low byte is noise: 8-bit decoding must ignore it
    paths["16bit_gray"] = root / "deep_gray.png"
    cv2.imwrite(str(paths["16bit_gray"]), IMAGE[..., 1].astype(np.uint16) * 257)
    paths["gray"] = root / "gray.png"
    cv2.imwrite(str(paths["gray"]), IMAGE[..., 1])
    paths["rgba"] = root / "rgba.png"
    cv2.imwrite(str(paths["rgba"]), np.dstack([bgr, np.full((H, W), 128, np.uint8)]))
    paths["exif"] = root / "rotated.jpg"
    paths["exif"].write_bytes(_jpeg_with_orientation(bgr, 6))
    paths["unicode_name"] = root / "s\u00e9quence \u2013 \u6e2c\u8a66.png"
    cv2.imencode(".png", bgr)[1].tofile(str(paths["unicode_name"]))
    paths["text"] = root / "notes.png"
    paths["text"].write_text("not an image\n")
    paths["empty"] = root / "empty.jpg"
    paths["empty"].write_bytes(b"")
    paths["truncated"] = root / "truncated.png"
    paths["truncated"].write_bytes(paths["plain"].read_bytes()[:60])
    paths["tiny"] = root / "tiny.png"
    cv2.imwrite(str(paths["tiny"]), np.zeros((1, 1, 3), np.uint8))
    paths["sliver"] = root / "sliver.png"
    cv2.imwrite(str(paths["sliver"]), np.zeros((2, 5000, 3), np.uint8))
    paths["directory"] = root / "folder.png"
    paths["directory"].mkdir()
    return paths


def _jpeg_with_orientation(bgr, orientation):
    """JPEG bytes with an EXIF APP1 segment holding one tag: Orientation (0x0112) = `orientation`.

    6 means "rotate 90 degrees clockwise to display", so a stored W x H image displays as H x W.
    """
    jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd  # big-endian TIFF, IFD at 8
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_unusual_files_decode_as_documented(files):
    plain = io.load_image(files["plain"])
    np.testing.assert_array_equal(plain, IMAGE)
    deep = io.load_image(files["16bit"])
    assert deep.dtype == np.uint8 and np.abs(deep.astype(int) - IMAGE).max() <= 1  # 16 -> 8 bits: about v / 257
    np.testing.assert_array_equal(io.load_image(files["16bit_gray"]), np.repeat(IMAGE[..., 1:2], 3, axis=2))
    np.testing.assert_array_equal(io.load_image(files["gray"]), np.repeat(IMAGE[..., 1:2], 3, axis=2))
    np.testing.assert_array_equal(io.load_image(files["rgba"]), IMAGE)  # alpha dropped, not composited
    np.testing.assert_array_equal(io.load_image(files["unicode_name"]), IMAGE)
    rotated = io.load_image(files["exif"])
    assert rotated.shape == (W, H, 3)  # displayed orientation: 80 x 60
    stored = cv2.cvtColor(cv2.imdecode(np.frombuffer(files["exif"].read_bytes(), np.uint8),
                                       cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(rotated, np.rot90(stored, k=-1))  # 90 degrees clockwise


@pytest.mark.parametrize("name", ["16bit", "gray", "rgba", "exif"])
def test_cli_segment_handles_unusual_files(capsys, predictor, baseline, fp32_model_dir, files, tmp_path, name):
    image = io.load_image(files[name])
    height, width = image.shape[:2]
    # For the EXIF file this point exists only in the rotated (displayed) frame: y = 70 > stored H.
    point = f"{width - 10},{height - 10}"
    code, out, err = _cli(capsys, "segment", files[name], "--point", point, "--model", fp32_model_dir, "--out", tmp_path)
    assert code == 0, err
    mask = io.load_image(tmp_path / "mask.png")
    assert mask.shape == (height, width, 3)
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["image_size"] == [height, width]
    predictor.set_image(image)
    direct_masks, direct_scores, _ = predictor.predict([[width - 10, height - 10]])
    np.testing.assert_array_equal(mask[..., 0] > 127, direct_masks[int(np.argmax(direct_scores))])
    predictor.set_image(IMAGE)
    assert_still_works(predictor, baseline)


def test_cli_everything_follows_exif_rotation(capsys, fp32_model_dir, files, tmp_path):
    code, out, err = _cli(capsys, "everything", files["exif"], "--points-per-side", "2", "--model", fp32_model_dir,
                          "--out", tmp_path)
    assert code == 0, err
    assert io.load_image(tmp_path / "overlay.png").shape == (W, H, 3)
    assert json.loads((tmp_path / "masks.json").read_text())["image_size"] == [W, H]


CLI_RUNTIME = {
    "segment_text_file": (["segment", "{text}", "--point", "1,1"], "notes.png: not a readable image"),
    "segment_empty_file": (["segment", "{empty}", "--point", "1,1"], "empty.jpg: not a readable image"),
    "segment_truncated_png": (["segment", "{truncated}", "--point", "1,1"], "truncated.png: not a readable image"),
    "segment_directory": (["segment", "{directory}", "--point", "1,1"], "image not found: .*folder.png"),
    "segment_1x1": (["segment", "{tiny}", "--point", "0,0"], "image must be at least 2x2 pixels, got 1x1"),
    "segment_sliver": (["segment", "{sliver}", "--point", "1,1"], "image of 2x5000 is too elongated"),
    "segment_box_negative_width": (["segment", "{plain}", "--box", "50,10,20,40"], "box must have x0 <= x1"),
    "segment_box_outside": (["segment", "{plain}", "--box", "0,0,81,10"], "box has 1 point.* outside the image"),
    "everything_text_file": (["everything", "{text}"], "notes.png: not a readable image"),
    "everything_1x1": (["everything", "{tiny}"], "image must be at least 2x2 pixels, got 1x1"),
}


@pytest.mark.parametrize("case", list(CLI_RUNTIME))
def test_cli_runtime_errors(capsys, fp32_model_dir, files, tmp_path, case):
    args, message = CLI_RUNTIME[case]
    args = [a.format(**files) for a in args]
    out_dir = tmp_path / "out"
    code, out, err = _cli(capsys, *args, "--model", fp32_model_dir, "--out", out_dir)
    assert code == 1, err
    _one_line(err, f"^tinysam {args[0]}: error: .*{message}")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_cli_out_path_is_a_file(capsys, fp32_model_dir, files, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("I am a file")
    code, out, err = _cli(capsys, "segment", files["plain"], "--point", "5,5", "--model", fp32_model_dir, "--out", blocker)
    assert code == 1
    _one_line(err, "^tinysam segment: error: .*out")
    assert blocker.read_text() == "I am a file"


def test_cli_bad_model_dir(capsys, files, tmp_path):
    (tmp_path / "manifest.json").write_text("{broken")
    code, out, err = _cli(capsys, "segment", files["plain"], "--point", "5,5", "--model", tmp_path, "--out", tmp_path / "o")
    assert code == 1
    _one_line(err, "manifest.json: not valid JSON")


@pytest.mark.torch
def test_cli_export_missing_checkpoint(capsys, tmp_path):
    code, out, err = _cli(capsys, "export", "--checkpoint", tmp_path / "missing.pth", "--out", tmp_path / "m")
    assert code == 1
    _one_line(err, "checkpoint must be an existing file")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["segment", "everything"])
def test_cli_debug_shows_the_traceback(fp32_model_dir, files, tmp_path, command):
    args = [sys.executable, "-m", "tinysam_rt.cli", "--debug", command, str(files["text"]), "--model", str(fp32_model_dir),
            "--out", str(tmp_path)]
    if command == "segment":
        args += ["--point", "1,1"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError" in result.stderr and "not a readable image" in result.stderr
