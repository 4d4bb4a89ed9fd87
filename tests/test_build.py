"""build_tinysam: exact checkpoint layout, strict loading with named diffs, seeded random weights."""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="needs the dev extra (torch)")
pytest.importorskip("segment_anything", reason="needs the dev extra (segment_anything)")

from tinysam_export.model.build import (  # noqa: E402
    build_tinysam,
    load_weights,
    read_checkpoint,
    save_random_checkpoint,
)

pytestmark = pytest.mark.torch
FIXTURE = Path(__file__).parent / "fixtures" / "tinysam_vit_t_state_dict.json"


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return build_tinysam(seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random3.pth", seed=3)


def test_state_dict_keys_and_shapes_equal_official_layout(model):
    expected = json.loads(FIXTURE.read_text())["keys"]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert got == expected
    assert list(got) == list(expected)  # same order as the official model, too


def test_model_is_in_eval_mode(model):
    assert not any(m.training for m in model.modules())


def test_random_init_is_seeded(model):
    again = build_tinysam(seed=0).state_dict()
    other = build_tinysam(seed=1).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, again[key]), key
        if value.is_floating_point():
            assert not torch.equal(value, other[key]), f"{key} does not depend on the seed"


def test_random_init_sets_every_float_tensor_to_distinct_values(model):
    tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    for key, value in tensors.items():
        assert torch.isfinite(value).all(), key
        # Constant tensors (the default inits: ones, zeros) would fold into equal initializers.
        assert value.numel() == 1 or value.std() > 0, f"{key} is constant"
    seen = {}
    for key, value in tensors.items():
        signature = (tuple(value.shape), float(value.flatten()[0]))
        assert signature not in seen, f"{key} equals {seen[signature]}"
        seen[signature] = key
    running_vars = [v for k, v in tensors.items() if k.endswith("running_var")]
    assert running_vars and all((v > 0).all() for v in running_vars)


def test_decoder_always_returns_three_healthy_masks(model):
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(1, 256, 64, 64, generator=gen)
    coords = torch.rand(4, 2, 2, generator=gen) * 1024
    labels = torch.tensor([[1.0, 0.0]] * 4)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        for multimask_output in (True, False):
            masks, iou = model.mask_decoder(
                embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=multimask_output
            )
            assert masks.shape == (4, 3, 256, 256) and iou.shape == (4, 3)
    assert torch.isfinite(masks).all() and torch.isfinite(iou).all()
    positive = (masks > 0).float().mean().item()
    assert 0.05 < positive < 0.95, f"mask logits nearly all one sign ({positive:.3f} positive)"
    assert masks.abs().max() < 100


def test_load_weights_strict_round_trip(model):
    other = build_tinysam(seed=1)
    load_weights(other, model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_build_from_checkpoint_equals_build_from_seed(checkpoint):
    from_file = build_tinysam(checkpoint=checkpoint).state_dict()
    from_seed = build_tinysam(seed=3).state_dict()
    assert from_file.keys() == from_seed.keys()
    for key, value in from_seed.items():
        assert torch.equal(from_file[key], value), key


@pytest.mark.parametrize("nesting", ["model", "state_dict"])
def test_nested_checkpoint_is_unwrapped(tmp_path, checkpoint, nesting):
    state_dict = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "nested.pth"
    torch.save({nesting: state_dict, "epoch": 7}, path)
    loaded = read_checkpoint(path)
    assert loaded.keys() == state_dict.keys()


def _broken_checkpoint(path, source, missing=(), extra=(), reshape=()):
    state_dict = dict(torch.load(source, weights_only=True))
    for key in missing:
        del state_dict[key]
    for key in extra:
        state_dict[key] = torch.zeros(3)
    for key in reshape:
        state_dict[key] = torch.zeros(7, 7)
    torch.save(state_dict, path)
    return path


def test_checkpoint_diff_names_every_bad_key(tmp_path, checkpoint):
    missing = "mask_decoder.iou_token.weight"
    extra = "image_encoder.layers.9.attn.qkv.weight"
    reshaped = "image_encoder.layers.2.blocks.3.attn.attention_biases"
    path = _broken_checkpoint(tmp_path / "bad.pth", checkpoint, [missing], [extra], [reshaped])
    with pytest.raises(ValueError) as info:
        build_tinysam(checkpoint=path)
    message = str(info.value)
    assert f"checkpoint {path} does not match TinySAM vit_t" in message
    assert f"1 missing key(s): {missing}" in message
    assert f"1 unexpected key(s): {extra}" in message
    assert f"1 shape mismatch(es): {reshaped} (checkpoint [7, 7] vs model [5, 196])" in message


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("missing", "missing key(s): prompt_encoder.no_mask_embed.weight"),
        ("extra", "unexpected key(s): prompt_encoder.no_mask_embed.weight_ema"),
        ("reshape", "shape mismatch(es): prompt_encoder.no_mask_embed.weight (checkpoint [7, 7] vs model [1, 256])"),
    ],
)
def test_each_kind_of_checkpoint_mismatch_is_named(tmp_path, checkpoint, kind, expected):
    key = "prompt_encoder.no_mask_embed.weight"
    args = {"missing": {"missing": [key]}, "extra": {"extra": [key + "_ema"]}, "reshape": {"reshape": [key]}}[kind]
    path = _broken_checkpoint(tmp_path / "bad.pth", checkpoint, **args)
    with pytest.raises(ValueError, match="does not match TinySAM vit_t") as info:
        build_tinysam(checkpoint=path)
    assert expected in str(info.value)


def test_unreadable_checkpoint_is_a_value_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(ValueError, match=f"checkpoint {path} cannot be read as a torch state_dict"):
        build_tinysam(checkpoint=path)


def test_checkpoint_without_state_dict_is_a_value_error(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"must hold a state_dict \(dict of tensors\).*got list"):
        build_tinysam(checkpoint=path)
