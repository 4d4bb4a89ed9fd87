"""Build TinySAM vit_t as a `segment_anything.modeling.Sam`, from a checkpoint or a seed.

Mirrors `build_sam_vit_t` of MobileSAM's `mobile_sam/build_sam.py` (which TinySAM's
`tinysam/build_sam.py` follows) with three deliberate differences:
- the image encoder is our `TinyViT`, whose attention biases are never cached (see tiny_vit.py);
- the mask decoder always returns the three multimask outputs (tokens 1..3), as TinySAM's does;
- loading follows nanoGPT's `from_pretrained`: the checkpoint is compared key by key with the
  model first, and a mismatch raises one error naming every missing, unexpected or mis-shaped key.

Without a checkpoint every weight is drawn from a seeded `torch.Generator`, so an export is
reproducible from its seed alone.
"""

import math

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d as SamLayerNorm2d
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn

from tinysam_rt.atomic import atomic_path
from tinysam_export.model.tiny_vit import Attention, LayerNorm2d, TinyViT, TinyViTConfig

# SAM's ImageNet statistics, RGB, 0..255 scale.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
PROMPT_EMBED_DIM = 256
IMAGE_SIZE = 1024
IMAGE_EMBEDDING_SIZE = IMAGE_SIZE // 16  # 64: the encoder downsamples by 16
MASK_TOKENS = (1, 2, 3)  # decoder outputs TinySAM keeps; token 0 (single-mask) is never returned
CHECKPOINT_NESTING_KEYS = ("model", "state_dict")  # training scripts wrap the state_dict in these


class TinySAMMaskDecoder(MaskDecoder):
    """SAM's MaskDecoder that always returns the multimask outputs (tokens 1..3), as TinySAM does."""

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output=True):
        """Same arguments as `MaskDecoder.forward`; `multimask_output` is accepted and ignored.

        Returns:
            masks: (B, 3, 256, 256) float32 logits.
            iou_pred: (B, 3) float32 predicted IoU.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
        )  # (B, 4, 256, 256), (B, 4)
        return masks[:, MASK_TOKENS[0]:], iou_pred[:, MASK_TOKENS[0]:]


def _make_sam():
    """The vit_t architecture with untouched initial weights (train mode)."""
    return Sam(
        image_encoder=TinyViT(TinyViTConfig(img_size=IMAGE_SIZE)),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(IMAGE_EMBEDDING_SIZE, IMAGE_EMBEDDING_SIZE),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=TinySAMMaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )


def _randomise_module_(module, gen):
    """Draw the tensors `module` owns directly (not its children's) from `gen`, in place.

    Every value is drawn independently so no two tensors are equal: the ONNX exporter would
    otherwise merge equal folded initializers, and equivalence tests could not see swapped ones.
    Scales keep activations O(1): weights ~ N(0, 1/fan_in), norms near identity.

    Returns:
        names (str) of the tensors it set, relative to `module`.
    """

    def normal_(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    def uniform_(t, low, high):
        t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)

    if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()  # in_features, or in_chans / groups * kh * kw
        normal_(module.weight, 1.0 / math.sqrt(fan_in))
    elif isinstance(module, nn.ConvTranspose2d):
        # kernel == stride, so each output pixel sees exactly one tap of every input channel.
        normal_(module.weight, 1.0 / math.sqrt(module.in_channels))
    elif isinstance(module, nn.BatchNorm2d):
        uniform_(module.weight, 0.5, 1.5)
        normal_(module.bias, 0.1)
        normal_(module.running_mean, 0.1)
        uniform_(module.running_var, 0.5, 1.5)  # must stay positive
        return ["weight", "bias", "running_mean", "running_var"]
    elif isinstance(module, (nn.LayerNorm, LayerNorm2d, SamLayerNorm2d)):
        uniform_(module.weight, 0.8, 1.2)
        normal_(module.bias, 0.1)
        return ["weight", "bias"]
    elif isinstance(module, nn.Embedding):
        normal_(module.weight, 1.0)  # nn.Embedding's own init scale
        return ["weight"]
    elif isinstance(module, Attention):
        normal_(module.attention_biases, 0.5)
        return ["attention_biases"]
    elif isinstance(module, PositionEmbeddingRandom):
        normal_(module.positional_encoding_gaussian_matrix, 1.0)  # SAM's scale
        return ["positional_encoding_gaussian_matrix"]
    else:
        return []
    if module.bias is not None:
        normal_(module.bias, 0.02)
        return ["weight", "bias"]
    return ["weight"]


@torch.no_grad()
def randomise_(model, seed):
    """Overwrite every float tensor of `model.state_dict()` with seeded random values, in place.

    Raises:
        AssertionError: a state_dict tensor has no rule (a new module type was added).
    """
    gen = torch.Generator().manual_seed(int(seed))
    done = set()
    for prefix, module in model.named_modules():
        for name in _randomise_module_(module, gen):
            done.add(f"{prefix}.{name}" if prefix else name)
    expected = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    assert expected == done, f"no random init rule for {sorted(expected - done)}"
    return model


def read_checkpoint(path):
    """Load a state_dict from a `.pth` file: raw, or nested under "model" / "state_dict".

    Args:
        path: str or Path of a file written by `torch.save`.
    Returns:
        dict str -> torch.Tensor.
    Raises:
        ValueError: the file is not a readable torch checkpoint holding a state_dict.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # torch.load fails with many types (UnpicklingError, IndexError, ...)
        raise ValueError(f"checkpoint {path} cannot be read as a torch state_dict: {exc}") from None
    if isinstance(obj, dict):
        for key in CHECKPOINT_NESTING_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"checkpoint {path} must hold a state_dict (dict of tensors), raw or under one of "
            f"{list(CHECKPOINT_NESTING_KEYS)}, got {type(obj).__name__}"
        )
    return obj


def state_dict_diff(model, state_dict):
    """Compare a state_dict with `model`'s by key and shape.

    Returns:
        (missing, unexpected, mismatched): sorted key lists; `mismatched` holds
        (key, checkpoint_shape, model_shape) tuples.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        (k, tuple(state_dict[k].shape), tuple(own[k].shape))
        for k in set(own) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    return missing, unexpected, mismatched


def load_weights(model, state_dict, source="state_dict"):
    """Load `state_dict` into `model` with strict=True after checking keys and shapes by name.

    Raises:
        ValueError: naming `source` and every missing key, unexpected key and shape mismatch.
    """
    missing, unexpected, mismatched = state_dict_diff(model, state_dict)
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {', '.join(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected)}")
        if mismatched:
            shapes = ", ".join(f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in mismatched)
            problems.append(f"{len(mismatched)} shape mismatch(es): {shapes}")
        raise ValueError(f"{source} does not match TinySAM vit_t: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    return model


def build_tinysam(checkpoint=None, seed=0):
    """Build TinySAM vit_t in eval mode.

    Args:
        checkpoint: path of an official-layout checkpoint (e.g. tinysam_42.3.pth), or None for
            random weights drawn from `seed`.
        seed: int, used only when `checkpoint` is None.
    Returns:
        segment_anything.modeling.Sam with TinyViT encoder and a TinySAMMaskDecoder, eval().
    Raises:
        ValueError: unreadable checkpoint, or one whose keys/shapes differ (all named).
    """
    model = _make_sam()
    if checkpoint is None:
        randomise_(model, seed)
    else:
        load_weights(model, read_checkpoint(checkpoint), source=f"checkpoint {checkpoint}")
    return model.eval()


def save_random_checkpoint(path, seed=0):
    """Write the random-weight state_dict of `seed` to `path` (atomically), like an official .pth.

    Returns:
        the path written.
    """
    model = build_tinysam(seed=seed)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return path
