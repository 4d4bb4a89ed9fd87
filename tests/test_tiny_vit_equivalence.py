"""Our TinyViT vs MobileSAM's (the upstream it mirrors), and the stale attention-bias cache.

Upstream TinyViT caches `attention_biases[:, idxs]` in a non-persistent buffer `ab` when eval()
is called; its builder calls eval() *before* load_state_dict, so a freshly built upstream model
keeps the biases of its own init until eval() is called again. Ours gathers them every forward.
"""

import warnings

import pytest

torch = pytest.importorskip("torch", reason="needs the dev extra (torch)")
pytest.importorskip("segment_anything", reason="needs the dev extra (segment_anything)")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # mobile_sam imports deprecated timm paths
    upstream = pytest.importorskip("mobile_sam.modeling.tiny_vit_sam", reason="needs the dev extra (mobile_sam)")

from tinysam_export.model.build import build_tinysam  # noqa: E402
from tinysam_export.model.tiny_vit import Attention, TinyViT, relative_offset_index  # noqa: E402

pytestmark = pytest.mark.torch
TOLERANCE = 1e-4  # max abs difference of (1, 256, 64, 64) embeddings, fp32 on CPU


def upstream_vit_t():
    """MobileSAM's TinyViT with the vit_t config of mobile_sam/build_sam.py."""
    return upstream.TinyViT(
        img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
        use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )


@pytest.fixture(scope="module")
def weights():
    torch.set_num_threads(2)
    return build_tinysam(seed=0).image_encoder.state_dict()


@pytest.fixture(scope="module")
def image():
    """A real-size normalised image: (1, 3, 1024, 1024) float32."""
    return torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def ours(weights, image):
    """Our encoder built the way the official builder does it: eval() first, then load."""
    model = TinyViT().eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return model(image)


@pytest.fixture(scope="module")
def reference(weights, image):
    """Upstream outputs: (stale, as the official builder leaves it; fresh, after eval() again)."""
    model = upstream_vit_t().eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        stale = model(image)
        model.eval()  # refreshes the cached `ab` from the loaded attention_biases
        fresh = model(image)
    return stale, fresh


def test_embeddings_match_mobile_sam_tiny_vit(ours, reference):
    _, fresh = reference
    assert ours.shape == fresh.shape == (1, 256, 64, 64)
    assert torch.isfinite(ours).all()
    assert 0.5 < ours.std().item() < 2.0  # the neck's LayerNorm2d keeps the embedding O(1)
    diff = (ours - fresh).abs().max().item()
    assert diff <= TOLERANCE, f"max abs diff {diff:.2e} > {TOLERANCE}"


def test_loaded_attention_biases_are_used_unlike_upstream_stale_cache(ours, reference):
    stale, fresh = reference
    stale_diff = (stale - fresh).abs().max().item()
    assert stale_diff > 0.04, f"upstream's stale `ab` cache should change the output, diff {stale_diff:.3f}"
    # Ours was also put in eval() before loading, yet it matches the refreshed upstream.
    assert (ours - fresh).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("window_size", [7, 14])
def test_bias_index_equals_upstream_offset_enumeration(window_size):
    dim, heads = 32, 2
    theirs = upstream.Attention(dim, dim // heads, heads, attn_ratio=1, resolution=(window_size, window_size))
    assert torch.equal(relative_offset_index(window_size), theirs.attention_bias_idxs)
    assert Attention(dim, heads, window_size).attention_biases.shape == theirs.attention_biases.shape


def test_attention_reads_biases_from_the_parameter_every_forward():
    dim, heads, window_size = 32, 2, 7
    gen = torch.Generator().manual_seed(0)
    ours = Attention(dim, heads, window_size).eval()
    theirs = upstream.Attention(dim, dim // heads, heads, attn_ratio=1, resolution=(window_size, window_size))
    x = torch.randn(3, window_size * window_size, dim, generator=gen)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        before = ours(x)
        ours.attention_biases.add_(torch.randn(ours.attention_biases.shape, generator=gen))
        after = ours(x)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        theirs.eval()
        expected = theirs(x)
    assert (after - before).abs().max() > 0.04
    assert (after - expected).abs().max() <= 1e-5
