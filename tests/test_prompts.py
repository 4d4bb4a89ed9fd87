from fractions import Fraction

import numpy as np
import pytest

from tinysam_rt import prompts

SIZE = (100, 200)  # (H, W)


def test_points_default_to_foreground_and_accept_lists():
    coords, labels = prompts.validate_points([(10, 20), (30, 40)], None, SIZE)
    assert coords.shape == (2, 2) and labels.tolist() == [1.0, 1.0]
    coords, labels = prompts.validate_points((5, 6), None, SIZE)
    assert coords.shape == (1, 2)


@pytest.mark.parametrize(
    "coords, labels, message",
    [
        ([(10, 20)], [1, 0], "one label per point"),
        ([(10, 20)], [2], "1 \\(foreground\\) or 0"),
        ([(201, 20)], None, "outside the image"),
        ([(-1, 20)], None, "outside the image"),
        ([(10, float("nan"))], None, "NaN or inf"),
        (np.zeros((0, 2)), None, "0 points"),
        (np.zeros((2, 3)), None, "shape \\(N, 2\\)"),
        ([("a", "b")], None, "numeric"),
        ([("10", "20")], None, "point_coords must be numeric array-like, got text"),  # not parsed as numbers
        ([(10, 20)], ["1"], "point_labels must be numeric array-like, got text"),
        ([(10**400, 20)], None, "point_coords has a value too large for a float"),
        (np.full((prompts.MAX_PROMPT_POINTS + 1, 2), 5.0), None, "point_coords has 1025 points; at most 1024 per prompt"),
    ],
)
def test_bad_points(coords, labels, message):
    with pytest.raises((ValueError, TypeError), match=message):
        prompts.validate_points(coords, labels, SIZE)


def test_bad_boxes():
    with pytest.raises(ValueError, match="x0 <= x1"):
        prompts.validate_box([50, 10, 40, 20], SIZE)
    with pytest.raises(ValueError, match="outside"):
        prompts.validate_box([0, 0, 250, 20], SIZE)
    with pytest.raises(ValueError, match="x0, y0, x1, y1"):
        prompts.validate_box([0, 0, 5], SIZE)


def test_pack_prompt_follows_sam_padding_rule():
    coords, labels = prompts.pack_prompt(np.array([[1.0, 2.0]]), np.array([1.0]), None)
    assert coords.shape == (1, 2, 2) and labels.tolist() == [[1.0, -1.0]]
    coords, labels = prompts.pack_prompt(np.array([[1.0, 2.0]]), np.array([0.0]), np.array([0, 0, 9, 9.0]))
    assert labels.tolist() == [[0.0, 2.0, 3.0]] and coords[0, 2].tolist() == [9.0, 9.0]
    coords, labels = prompts.pack_prompt(None, None, np.array([0, 0, 9, 9.0]))
    assert labels.tolist() == [[2.0, 3.0]]


def test_mask_input_validation():
    assert prompts.validate_mask_input(np.zeros((256, 256))).shape == (1, 256, 256)
    with pytest.raises(ValueError, match="\\(1, 256, 256\\)"):
        prompts.validate_mask_input(np.zeros((1, 64, 64)))
    with pytest.raises(ValueError, match="NaN"):
        prompts.validate_mask_input(np.full((256, 256), np.inf))
    with pytest.raises(ValueError, match=r"mask_input has values beyond float32's range \(\|x\| > 3.4e\+38\)"):
        prompts.validate_mask_input(np.full((256, 256), 1e39))  # finite in float64, inf in float32


def test_iou_threshold_must_fit_float32():
    assert prompts.validate_iou_threshold(np.float32(0.88)) == pytest.approx(0.88)
    assert prompts.validate_iou_threshold(Fraction(1, 2)) == 0.5  # any real number
    with pytest.raises(ValueError, match="upscale_iou_threshold must be finite"):
        prompts.validate_iou_threshold(10**400)
    with pytest.raises(ValueError, match=r"upscale_iou_threshold must be within float32's range .*got 1e\+40"):
        prompts.validate_iou_threshold(1e40)


def test_validate_batch_shapes():
    coords, labels, mask, has_mask = prompts.validate_batch(np.zeros((3, 2, 2)), np.ones((3, 2)))
    assert mask.shape == (3, 1, 256, 256) and has_mask.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="point_labels must have shape"):
        prompts.validate_batch(np.zeros((3, 2, 2)), np.ones((3, 1)))
    with pytest.raises(ValueError, match="B, N >= 1"):
        prompts.validate_batch(np.zeros((0, 2, 2)), np.ones((0, 2)))
    n = prompts.MAX_PROMPT_POINTS + 2  # the most points plus a box's corners: accepted
    assert prompts.validate_batch(np.zeros((1, n, 2)), np.ones((1, n)))[0].shape == (1, n, 2)
    with pytest.raises(ValueError, match="point_coords has N=1027 points per prompt; at most 1024 plus a box's 2 corners"):
        prompts.validate_batch(np.zeros((1, n + 1, 2)), np.ones((1, n + 1)))
