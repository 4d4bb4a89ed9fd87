import numpy as np
import pytest

from tinysam_rt import preprocess


def test_preprocess_shape_follows_sam_rounding():
    assert preprocess.preprocess_shape(770, 769, 1024) == (1024, 1023)
    assert preprocess.preprocess_shape(1365, 2048, 1024) == (683, 1024)
    assert preprocess.preprocess_shape(1024, 1024, 1024) == (1024, 1024)
    assert preprocess.preprocess_shape(10, 5, 1024) == (1024, 512)


def test_preprocess_shape_rejects_extreme_aspect():
    with pytest.raises(ValueError, match="too elongated"):
        preprocess.preprocess_shape(1, 50000, 1024)


@pytest.mark.parametrize("shape", [(770, 769, 3), (300, 200, 3), (40, 1500, 3), (1024, 600, 3), (2, 3, 3)])
def test_resize_matches_pil_bilinear(shape):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = preprocess.resize_longest_side(image, 1024)
    h, w = preprocess.preprocess_shape(shape[0], shape[1], 1024)
    ref = np.asarray(pil.fromarray(image).resize((w, h), pil.BILINEAR))
    assert ours.shape == ref.shape
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_resize_matches_pil_on_real_photos(shared_image_paths):
    pil = pytest.importorskip("PIL.Image")
    from tinysam_rt.io import load_image

    for path in shared_image_paths:
        image = load_image(path)
        h, w = preprocess.preprocess_shape(*image.shape[:2], 1024)
        ref = np.asarray(pil.fromarray(image).resize((w, h), pil.BILINEAR))
        assert np.array_equal(preprocess.resize_longest_side(image, 1024), ref), path.name


def test_normalize_pad_layout():
    resized = np.full((4, 6, 3), 100, np.uint8)
    out = preprocess.normalize_pad(resized, (100, 50, 0), (1, 2, 4), long_side=8)
    assert out.shape == (1, 3, 8, 8) and out.dtype == np.float32
    assert np.allclose(out[0, :, :4, :6], np.array([0, 25, 25], np.float32)[:, None, None])
    assert np.all(out[0, :, 4:, :] == 0) and np.all(out[0, :, :, 6:] == 0)


def test_coords_and_boxes_to_input_frame():
    coords = np.array([[769.0, 770.0], [0.0, 0.0]])
    out = preprocess.coords_to_input_frame(coords, (770, 769), 1024)
    assert np.allclose(out, [[1023.0, 1024.0], [0.0, 0.0]])
    box = preprocess.boxes_to_input_frame([10, 20, 30, 40], (512, 256), 1024)
    assert np.allclose(box, [20, 40, 60, 80])


@pytest.mark.torch
def test_coords_match_segment_anything():
    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 700, (5, 2))
    ref = ResizeLongestSide(1024).apply_coords(coords.copy(), (713, 1100))
    assert np.allclose(preprocess.coords_to_input_frame(coords, (713, 1100), 1024), ref, atol=1e-4)


@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.zeros((10, 10), np.uint8), ValueError, "3 channels"),
        (np.zeros((10, 10, 1), np.uint8), ValueError, "grayscale"),
        (np.zeros((10, 10, 4), np.uint8), ValueError, "RGBA"),
        (np.zeros((10, 10, 3), np.float32), TypeError, "uint8"),
        (np.zeros((10, 10, 3), np.int16), TypeError, "uint8"),
        (np.zeros((10, 10, 3), bool), TypeError, "uint8"),
        (np.zeros((0, 0, 3), np.uint8), ValueError, "at least 2x2"),
        (np.zeros((1, 1, 3), np.uint8), ValueError, "at least 2x2"),
        ([[1, 2, 3]], TypeError, "numpy array"),
    ],
)
def test_check_image_rejects_bad_images(image, error, message):
    with pytest.raises(error, match=message):
        preprocess.check_image(image)


def test_check_image_given_a_path_says_how_to_load_it(tmp_path):
    with pytest.raises(TypeError, match=r"got str 'photo.jpg'; read an image file with tinysam_rt.io.load_image\(path\)"):
        preprocess.check_image("photo.jpg")
    with pytest.raises(TypeError, match=r"got \w*Path .*a directory \(a model directory\? pass it as model_dir=\)"):
        preprocess.check_image(tmp_path)


def test_check_image_accepts_views():
    base = np.zeros((20, 40, 3), np.uint8)
    view = base[:, ::2]
    view.flags.writeable = False
    assert preprocess.check_image(view) is view
