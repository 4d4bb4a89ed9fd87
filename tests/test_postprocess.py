import numpy as np
import pytest

from tinysam_rt import postprocess


def test_upscale_shapes_and_constant_field():
    low = np.full((2, 3, 256, 256), 1.5, np.float32)
    out = postprocess.upscale_logits(low, (512, 1024), (300, 600))
    assert out.shape == (2, 3, 300, 600) and np.allclose(out, 1.5)


@pytest.mark.torch
@pytest.mark.parametrize("input_size, original_size", [((1024, 683), (2048, 1365)), ((768, 1024), (480, 640)), ((1024, 1023), (770, 769))])
def test_upscale_matches_sam_postprocess_masks(input_size, original_size):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    low = rng.normal(0, 4, (2, 3, 256, 256)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(low), (1024, 1024), mode="bilinear", align_corners=False)
    ref = ref[..., : input_size[0], : input_size[1]]
    ref = F.interpolate(ref, original_size, mode="bilinear", align_corners=False).numpy()
    ours = postprocess.upscale_logits(low, input_size, original_size)
    # cv2 computes its interpolation weights in float32: ~3e-5 relative error on logits of |x| <= 20.
    assert np.abs(ours - ref).max() < 1e-3
    assert ((ours > 0) != (ref > 0)).mean() < 1e-5
