"""TinyViT-5M image encoder of TinySAM (vit_t): (1, 3, 1024, 1024) image -> (1, 256, 64, 64).

Mirrors MobileSAM's `mobile_sam/modeling/tiny_vit_sam.py` (itself TinyViT, Microsoft 2022, with
a SAM neck), which TinySAM reuses unchanged. Module and parameter names follow that file exactly
so the official checkpoints load with `strict=True`; the code is written anew for export.

Differences from upstream, all deliberate:
- The attention-bias table is gathered from `attention_biases` in every forward. Upstream caches
  it in a non-persistent `ab` buffer when `eval()` is called, and its builder calls `eval()`
  before `load_state_dict`, so it keeps using the biases of the random init. Gathering by a
  constant index buffer is traceable; the ONNX exporter folds it into one constant per block.
- No drop-path, gradient checkpointing or layer-wise lr decay (inference only).
- Feature-map sizes are fixed by the config (image_size 1024), as in upstream.

Stages at image_size 1024 (tokens are H x W of the feature map)::

    patch_embed  (1, 3, 1024, 1024) -> (1, 64, 256, 256)        conv s2, GELU, conv s2
    layers.0     MBConv x2 at 256x256, 64 ch; PatchMerging -> 128x128, 128 ch
    layers.1     TinyViT x2 at 128x128, 128 ch, window 7;  PatchMerging -> 64x64, 160 ch
    layers.2     TinyViT x6 at 64x64, 160 ch, window 14;   PatchMerging (stride 1) -> 64x64, 320 ch
    layers.3     TinyViT x2 at 64x64, 320 ch, window 7
    neck         (1, 320, 64, 64) -> (1, 256, 64, 64)
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyViTConfig:
    """Hyper-parameters of TinyViT (names as in upstream `TinyViT.__init__`); defaults = vit_t."""

    img_size: int = 1024  # square input side the encoder is built for
    in_chans: int = 3  # RGB
    num_classes: int = 1000  # classifier `head` size; kept so checkpoints load, unused for SAM
    embed_dims: tuple = (64, 128, 160, 320)  # channels per stage
    depths: tuple = (2, 2, 6, 2)  # blocks per stage
    num_heads: tuple = (2, 4, 5, 10)  # attention heads per stage (stage 0 is convolutional)
    window_sizes: tuple = (7, 7, 14, 7)  # local attention window side per stage
    mlp_ratio: float = 4.0  # MLP hidden = dim * mlp_ratio
    mbconv_expand_ratio: float = 4.0  # MBConv hidden = dim * ratio
    local_conv_size: int = 3  # depthwise conv between attention and MLP
    neck_dim: int = 256  # SAM's image-embedding channels


class Conv2dBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d; children named `c` and `bn` as upstream."""

    def __init__(self, in_chans, out_chans, kernel_size=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convs: (B, 3, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, in_chans, dim):
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, dim // 2, 3, 2, 1),
            nn.GELU(),
            Conv2dBN(dim // 2, dim, 3, 2, 1),
        )

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU. (B, C, H, W)."""

    def __init__(self, dim, expand_ratio):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, 1)

    def forward(self, x):
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 conv, 3x3 depthwise conv (stride 2, or 1 into the last 320-ch stage), 1x1 conv.

    Takes (B, C, H, W) or tokens (B, H*W, C) at `resolution`; returns tokens (B, H'*W', C').
    """

    def __init__(self, resolution, dim, out_dim):
        super().__init__()
        self.resolution = resolution
        self.dim = dim
        # Upstream keeps the SAM encoder at 64x64 by not striding into the last stage; it keys
        # this on the output width (320/448/576 are the last-stage widths of its variants).
        stride = 1 if out_dim in (320, 448, 576) else 2
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)

    def forward(self, x):
        if x.ndim == 3:
            H, W = self.resolution
            x = x.transpose(1, 2).reshape(-1, self.dim, H, W)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = self.conv3(x)  # (B, C', H', W')
        return x.flatten(2).transpose(1, 2)  # (B, H'*W', C')


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on (B, C, H, W), then PatchMerging to tokens."""

    def __init__(self, dim, resolution, depth, out_dim, expand_ratio):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(resolution, dim, out_dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class Mlp(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Linear. (B, L, C) -> (B, L, C)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def relative_offset_index(window_size):
    """Index into a (heads, window_size**2) bias table for every (query, key) pair of a window.

    Tokens are numbered row-major; the pair ((r1, c1), (r2, c2)) uses the bias of offset
    (|r1 - r2|, |c1 - c2|), stored at column |r1 - r2| * window_size + |c1 - c2| (the order in
    which upstream enumerates offsets).

    Returns:
        (N, N) int64 with N = window_size**2.
    """
    rows = torch.arange(window_size).repeat_interleave(window_size)  # (N,)
    cols = torch.arange(window_size).repeat(window_size)  # (N,)
    d_row = (rows[:, None] - rows[None, :]).abs()
    d_col = (cols[:, None] - cols[None, :]).abs()
    return d_row * window_size + d_col


class Attention(nn.Module):
    """Pre-norm multi-head self-attention inside one window, with a learned offset bias.

    Input/output (B', N, C) with B' = batch * windows and N = window_size**2.
    """

    def __init__(self, dim, num_heads, window_size):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_area = window_size * window_size
        self.head_dim = dim // num_heads  # key, query and value widths are equal (attn_ratio 1)
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # Non-persistent: derived from the window size, not stored in checkpoints.
        self.register_buffer("attention_bias_idxs", relative_offset_index(window_size), persistent=False)

    def forward(self, x):
        N, C = self.window_area, self.dim  # static, so the graph has no shape arithmetic
        qkv = self.qkv(self.norm(x))  # (B, N, 3C)
        # The checkpoint's qkv rows are laid out per head as [q | k | v], not [all q | all k | all v].
        qkv = qkv.view(-1, N, self.num_heads, 3 * self.head_dim).permute(0, 2, 1, 3)  # (B, nh, N, 3hd)
        q, k, v = qkv.split(self.head_dim, dim=3)  # each (B, nh, N, hd)
        bias = self.attention_biases[:, self.attention_bias_idxs]  # (nh, N, N), never cached
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias  # (B, nh, N, N)
        x = attn.softmax(dim=-1) @ v  # (B, nh, N, hd)
        return self.proj(x.transpose(1, 2).reshape(-1, N, C))


def window_partition(x, window_size, hwc):
    """Split a token map into zero-padded windows.

    Args:
        x: (B, H, W, C).
        window_size: int window side.
        hwc: (H, W, C) as Python ints, so tracing records no shape arithmetic.
    Returns:
        (B * nH * nW, window_size**2, C) windows, and the padded (Hp, Wp).
    """
    H, W, C = hwc
    pad_b = (window_size - H % window_size) % window_size
    pad_r = (window_size - W % window_size) % window_size
    if pad_b or pad_r:
        # Padded tokens take part in attention as keys, exactly as upstream (no masking).
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = H + pad_b, W + pad_r
    nH, nW = Hp // window_size, Wp // window_size
    x = x.view(-1, nH, window_size, nW, window_size, C).transpose(2, 3)  # (B, nH, nW, ws, ws, C)
    return x.reshape(-1, window_size * window_size, C), (Hp, Wp)


def window_reverse(windows, window_size, padded_hw, hwc):
    """Inverse of `window_partition`: (B*nH*nW, ws*ws, C) -> (B, H, W, C), padding cropped."""
    Hp, Wp = padded_hw
    H, W, C = hwc
    nH, nW = Hp // window_size, Wp // window_size
    x = windows.view(-1, nH, nW, window_size, window_size, C).transpose(2, 3)  # (B, nH, ws, nW, ws, C)
    x = x.reshape(-1, Hp, Wp, C)
    return x[:, :H, :W]


class TinyViTBlock(nn.Module):
    """Window attention + residual, depthwise `local_conv`, MLP + residual. Tokens (B, H*W, C)."""

    def __init__(self, dim, resolution, num_heads, window_size, mlp_ratio, local_conv_size):
        super().__init__()
        self.dim = dim
        self.resolution = resolution
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def forward(self, x):
        (H, W), C = self.resolution, self.dim
        L = H * W
        windows, padded_hw = window_partition(x.view(-1, H, W, C), self.window_size, (H, W, C))
        attn = window_reverse(self.attn(windows), self.window_size, padded_hw, (H, W, C))
        x = x + attn.reshape(-1, L, C)
        x = self.local_conv(x.transpose(1, 2).reshape(-1, C, H, W))  # (B, C, H, W)
        x = x.view(-1, C, L).transpose(1, 2)  # (B, L, C)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks on tokens, then an optional PatchMerging."""

    def __init__(self, dim, resolution, depth, num_heads, window_size, mlp_ratio, local_conv_size, out_dim):
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window_size, mlp_ratio, local_conv_size)
            for _ in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim, out_dim) if out_dim is not None else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a (B, C, H, W) map (SAM's neck norm, eps 1e-6)."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def stage_resolutions(config):
    """Feature-map side of each stage: 1/4 of the image, halved by stages 0 and 1 only.

    Returns:
        tuple of len(depths) ints, e.g. (256, 128, 64, 64) for image_size 1024.
    """
    side = config.img_size // 4
    # The last PatchMerging does not stride, so the last stage has the resolution of the one before.
    return tuple(side // 2 ** min(i, len(config.depths) - 2) for i in range(len(config.depths)))


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM neck: (B, 3, img, img) normalised image -> (B, 256, img/16, img/16)."""

    def __init__(self, config=TinyViTConfig()):
        super().__init__()
        self.config = config
        self.img_size = config.img_size  # SAM's code reads image_encoder.img_size
        dims, sides = config.embed_dims, stage_resolutions(config)
        self.patch_embed = PatchEmbed(config.in_chans, dims[0])
        self.layers = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            out_dim = dims[i + 1] if i + 1 < len(dims) else None
            if i == 0:
                layer = ConvLayer(dims[0], (sides[0], sides[0]), depth, out_dim, config.mbconv_expand_ratio)
            else:
                layer = BasicLayer(
                    dims[i], (sides[i], sides[i]), depth, config.num_heads[i], config.window_sizes[i],
                    config.mlp_ratio, config.local_conv_size, out_dim,
                )
            self.layers.append(layer)
        # Classification head of the ImageNet-pretrained TinyViT: in the checkpoints, unused here.
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], config.num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], config.neck_dim, kernel_size=1, bias=False),
            LayerNorm2d(config.neck_dim),
            nn.Conv2d(config.neck_dim, config.neck_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.neck_dim),
        )

    def forward(self, x):
        """(B, 3, img_size, img_size) float32, normalised and padded -> (B, 256, img/16, img/16)."""
        size = self.config.img_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.config.in_chans, size, size):
            raise ValueError(f"x must have shape (B, {self.config.in_chans}, {size}, {size}), got {tuple(x.shape)}")
        x = self.patch_embed(x)  # (B, 64, 256, 256)
        for layer in self.layers:
            x = layer(x)  # tokens (B, L, C) after layers.0
        side = stage_resolutions(self.config)[-1]
        x = x.transpose(1, 2).reshape(-1, self.config.embed_dims[-1], side, side)  # (B, 320, 64, 64)
        return self.neck(x)  # (B, 256, 64, 64)
