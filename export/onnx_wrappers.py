"""Trace-only modules that define the ONNX graphs of tinysam-rt (encoder, decoder, points decoder).

Mirrors `segment_anything/utils/onnx.py` (`SamOnnxModel`): prompt branches become arithmetic on
the labels so one graph serves points, boxes and masks. Differences from it: the batch B of
prompts and the number N of points are both dynamic; the image embedding is shared by all B
prompts through `expand` (no copies); `has_mask_input` is per prompt (B,); only TinySAM's tokens
1..3 are returned; no resizing to the original image (the runtime does that in numpy).

`PointsDecoderOnnx`, `ImageSideOnnx` and `UpscalerOnnx` make a second decoder graph for prompts
without a mask input (points and boxes, which is every everything-mode prompt and most interactive
ones). It computes the same function with less work per prompt; see their docstrings.

These modules exist only to be traced by `torch.onnx.export`; use `build_tinysam` for eager use.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinysam_export.model.build import MASK_TOKENS


class EncoderOnnx(nn.Module):
    """`image` (1, 3, 1024, 1024) float32, normalised and padded -> `image_embeddings` (1, 256, 64, 64)."""

    def __init__(self, model):
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, image):
        return self.image_encoder(image)


class DecoderOnnx(nn.Module):
    """Prompt encoder + mask decoder of TinySAM for B prompts on one image (see forward)."""

    def __init__(self, model):
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.img_size = model.image_encoder.img_size
        self.upscaler = UpscalerGemms(model.mask_decoder, model.prompt_encoder.image_embedding_size)

    def embed_points(self, point_coords, point_labels):
        """SAM's `PromptEncoder._embed_points` + `_embed_boxes` with the label branches as masks.

        Args:
            point_coords: (B, N, 2) float32, XY pixels, 1024 frame.
            point_labels: (B, N) float32; 1 fg, 0 bg, 2/3 box top-left/bottom-right, -1 padding.
        Returns:
            (B, N, 256) sparse embeddings.
        """
        pe = self.prompt_encoder
        coords = (point_coords + 0.5) / self.img_size  # pixel centres, [0, 1]; the frame is square
        embedding = pe.pe_layer._pe_encoding(coords)  # (B, N, 256)
        labels = point_labels.unsqueeze(-1)  # (B, N, 1)
        is_pad = (labels == -1).to(embedding.dtype)
        # Padding points carry no position, only the "not a point" embedding.
        embedding = embedding * (1 - is_pad) + pe.not_a_point_embed.weight * is_pad
        for i, point_embedding in enumerate(pe.point_embeddings):
            embedding = embedding + point_embedding.weight * (labels == i).to(embedding.dtype)
        return embedding

    def embed_masks(self, mask_input, has_mask_input):
        """SAM's dense prompt: the downscaled mask where has_mask_input is 1, else `no_mask_embed`.

        Args:
            mask_input: (B, 1, 256, 256) float32 low-res logits.
            has_mask_input: (B,) float32, 1 or 0.
        Returns:
            (B, 256, 64, 64) dense embeddings.
        """
        pe = self.prompt_encoder
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)  # (1, 256, 1, 1)
        return has_mask * pe.mask_downscaling(mask_input) + (1 - has_mask) * no_mask

    def predict_masks(self, image_embeddings, sparse_embeddings, dense_embeddings):
        """`MaskDecoder.predict_masks` with the image shared by `expand`, returning tokens 1..3.

        Args:
            image_embeddings: (1, 256, 64, 64); sparse_embeddings: (B, N, 256);
            dense_embeddings: (B, 256, 64, 64).
        Returns:
            masks (B, 3, 256, 256) logits, iou_pred (B, 3).
        """
        decoder = self.mask_decoder
        B = sparse_embeddings.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (5, 256)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(B, -1, -1), sparse_embeddings], dim=1)
        src = image_embeddings.expand(B, -1, -1, -1) + dense_embeddings  # (B, 256, 64, 64)
        pos_src = self.prompt_encoder.get_dense_pe().expand(B, -1, -1, -1)  # (B, 256, 64, 64)
        hs, src = decoder.transformer(src, pos_src, tokens)  # (B, 5+N, 256), (B, 64*64, 256)
        iou_token_out = hs[:, 0, :]  # (B, 256)
        mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]  # (B, 4, 256)
        hyper_in = torch.stack(
            [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in MASK_TOKENS], dim=1
        )  # (B, 3, 32)
        masks = self.upscaler(src, hyper_in)  # (B, 3, 256, 256)
        iou_pred = decoder.iou_prediction_head(iou_token_out)[:, MASK_TOKENS[0] :]  # (B, 3)
        return masks, iou_pred

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        """The decoder contract of tinysam_rt.manifest (DECODER_INPUTS -> DECODER_OUTPUTS).

        Args:
            image_embeddings: (1, 256, 64, 64) float32.
            point_coords: (B, N, 2) float32, XY pixels, 1024 frame. Without a box the caller
                appends one (0, 0) point labelled -1, as SAM's prompt encoder does.
            point_labels: (B, N) float32; 1 fg, 0 bg, 2/3 box corners, -1 padding.
            mask_input: (B, 1, 256, 256) float32 low-res logits (anything when unused).
            has_mask_input: (B,) float32, 1 where mask_input is used, else 0.
        Returns:
            low_res_masks (B, 3, 256, 256) float32 logits, iou_predictions (B, 3) float32.
        """
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_masks(mask_input, has_mask_input)
        return self.predict_masks(image_embeddings, sparse, dense)


def _heads(x, num_heads):
    """(B, L, C) -> (B, h, L, C / h), as SAM's `Attention._separate_heads`."""
    return x.reshape(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


def _tokens_to_image(attn, q_in, key_src, value_src):
    """SAM `Attention(q=q_in, k=key_src, v=value_src)` for T tokens attending to L image positions,
    with the image-side projections multiplied through the tokens instead (exact algebra).

    scores_h = (q_h W_k,h) X^T (q_h . b_k,h is constant along the softmax axis and drops out);
    out_h = (A_h V) W_v,h^T + b_v,h, because every row of A_h sums to 1.

    Args:
        q_in: (B, T, 256); key_src, value_src: (B, L, 256).
    Returns:
        (B, T, 256).
    """
    h, d = attn.num_heads, attn.internal_dim // attn.num_heads
    b, t = q_in.shape[0], q_in.shape[1]
    q = _heads(attn.q_proj(q_in), h)  # (B, h, T, d)
    q_img = (q @ attn.k_proj.weight.reshape(h, d, -1)).reshape(b, h * t, -1)  # (B, hT, 256)
    scores = (q_img @ key_src.transpose(1, 2)) / math.sqrt(d)  # (B, hT, L)
    mixed = (torch.softmax(scores, dim=-1) @ value_src).reshape(b, h, t, -1)  # (B, h, T, 256)
    out = mixed @ attn.v_proj.weight.reshape(h, d, -1).transpose(1, 2) + attn.v_proj.bias.reshape(1, h, 1, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * d))  # (B, T, 256)


def _image_to_tokens(attn, query_src, k_in, v_in, shared_q=None, factored=False):
    """SAM `Attention(q=query_src, k=k_in, v=v_in)` for L image positions attending to T tokens,
    with the image-side projections multiplied through the tokens instead (exact algebra).

    scores_h = X (W_q,h^T k_h^T) + b_q,h . k_h; out = sum_h A_h (v_h W_o,h^T + b_o / h), as every
    head's weights sum to 1. The 1/sqrt(d) scale is applied to k, on the small token side.

    Args:
        query_src: (B, L, 256), or None with `shared_q`.
        k_in, v_in: (B, T, 256).
        shared_q: (1, h, L, d) q projection computed once for the batch, or None.
        factored: return the product's two factors instead of the product.
    Returns:
        (B, L, 256); with `factored`, weights (B, L, hT) and values (B, hT, 256) whose product it is.
    """
    h, d = attn.num_heads, attn.internal_dim // attn.num_heads
    b, t = k_in.shape[0], k_in.shape[1]
    k = _heads(attn.k_proj(k_in), h) / math.sqrt(d)  # (B, h, T, d)
    if shared_q is not None:
        scores = (shared_q @ k.transpose(2, 3)).permute(0, 2, 1, 3)  # (B, L, h, T)
    else:
        k_img = (k @ attn.q_proj.weight.reshape(h, d, -1)).reshape(b, h * t, -1)  # (B, hT, 256)
        bias = (k * attn.q_proj.bias.reshape(1, h, 1, d)).sum(-1).reshape(b, 1, h * t)  # (B, 1, hT)
        scores = (query_src @ k_img.transpose(1, 2) + bias).reshape(b, -1, h, t)  # (B, L, h, T)
    weights = torch.softmax(scores, dim=-1).reshape(b, -1, h * t)  # (B, L, hT)
    v = _heads(attn.v_proj(v_in), h)  # (B, h, T, d)
    v_out = v @ attn.out_proj.weight.reshape(-1, h, d).permute(1, 2, 0) + attn.out_proj.bias / h  # (B, h, T, 256)
    values = v_out.reshape(b, h * t, -1)  # (B, hT, 256)
    return (weights, values) if factored else weights @ values  # (B, L, 256)


class _LayerNormWithMoments(torch.autograd.Function):
    """`native_layer_norm` over the last axis, exported as one LayerNormalization node with its
    optional Mean and InvStdDev outputs (ORT computes them in the same pass)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def symbolic(g, x, weight, bias, eps):
        return g.op("LayerNormalization", x, weight, bias, axis_i=-1, epsilon_f=eps, outputs=3)


def _layer_norm_with_moments(norm, x):
    """`norm(x)` (an nn.LayerNorm over the last axis) and x's moments.

    Args:
        x: (B, L, C).
    Returns:
        y (B, L, C); mean (B, L, 1) and inverse standard deviation (B, L, 1) of x over C.
    """
    return _LayerNormWithMoments.apply(x, norm.weight, norm.bias, norm.eps)


class UpscalerGemms(nn.Module):
    """SAM's `output_upscaling` + hypernetwork product, channels-last, as GEMMs on constant weights.

    Each ConvTranspose2d(kernel 2, stride 2) writes disjoint 2x2 blocks, so it is a GEMM from
    C_in to (2, 2, C_out) per position; LayerNorm2d is then a plain LayerNorm over the last axis.
    The GEMMs are split by the kernel row (i1 of the first conv, i2 of the second): then each of
    the 4 (i1, i2) products holds whole mask rows 4h + 2 i1 + i2, each already in x order
    (x = 4w + 2 j1 + j2), and one Concat places them. Unsplit, the masks come out in block order
    and need an 8-D transpose that moves 2-float runs (measured 0.66-0.87 ms per prompt, 2 cores).
    The GEMM weights and biases are buffers (rearranged once here), so the graph holds them as
    initializers: the INT8 upscaler (`upscaler_int8.int8_upscaler`) finds each GEMM's weight and bias there.
    """

    def __init__(self, mask_decoder, size):
        super().__init__()
        conv1, norm, _, conv2, _ = mask_decoder.output_upscaling
        self.size = tuple(size)  # (H, W) of the embedding grid, (64, 64)
        self.c1, self.c2 = conv1.out_channels, conv2.out_channels  # 64, 32
        self.norm = norm  # LayerNorm2d, used as a LayerNorm over the channels-last axis
        with torch.no_grad():
            for i in range(2):  # kernel row i: weight[:, :, i, :] is (C_in, C_out, j) -> (C_in, (j, C_out))
                self.register_buffer(f"w1_{i}", conv1.weight[:, :, i, :].permute(0, 2, 1).reshape(conv1.in_channels, -1).clone())
                self.register_buffer(f"w2_{i}", conv2.weight[:, :, i, :].permute(0, 2, 1).reshape(conv2.in_channels, -1).clone())
            self.register_buffer("b1", conv1.bias.repeat(2).clone())  # ((j1, c1),)
            self.register_buffer("b2", conv2.bias.repeat(2).clone())  # ((j2, c2),)

    def forward(self, src, hyper_in):
        """Mask logits of the M kept tokens.

        Args:
            src: (B, H*W, 256) image tokens after the transformer, row-major over (H, W).
            hyper_in: (B, M, 32) hypernetwork outputs of the M kept mask tokens.
        Returns:
            (B, M, 4H, 4W) mask logits.
        """
        src = src.reshape(-1, src.shape[-1])  # (B*HW, 256)
        return self.from_first_products([src @ w1 + self.b1 for w1 in self.first_weights], hyper_in)

    @property
    def first_weights(self):
        """The first ConvTranspose's GEMM weights, one (256, (j1, c1)) per kernel row i1."""
        return self.w1_0, self.w1_1

    def from_first_products(self, products, hyper_in):
        """`forward` from the first ConvTranspose's output (bias included) onwards.

        Args:
            products: for kernel rows i1 = 0, 1: (B*HW, (j1, c1)) = src @ w1_i1 + b1.
            hyper_in: (B, M, 32).
        Returns:
            (B, M, 4H, 4W) mask logits.
        """
        (h, w), b, m = self.size, hyper_in.shape[0], hyper_in.shape[1]
        rows = []  # (B, M, H, 1, 4W) for (i1, i2) = (0, 0), (0, 1), (1, 0), (1, 1)
        for product in products:
            y = product.reshape(-1, self.c1)  # (B*HW*2, c1), rows (b, h, w, j1)
            y = F.gelu(F.layer_norm(y, (self.c1,), self.norm.weight, self.norm.bias, self.norm.eps))
            for w2 in (self.w2_0, self.w2_1):
                z = F.gelu(y @ w2 + self.b2).reshape(b, -1, self.c2)  # (B, HW*4, c2), rows (h, w, j1, j2)
                rows.append((hyper_in @ z.transpose(1, 2)).reshape(b, m, h, 1, 4 * w))
        return torch.cat(rows, dim=3).reshape(b, m, 4 * h, 4 * w)


def _normed_first_weights(upscaler, norms):
    """Per kernel row, the first upscaler GEMM's weight W with the gains g0, g1 of the
    transformer's last two image LayerNorms (layer 0's and layer 1's norm4) folded in.

    Returns:
        [(diag(g0 g1) W_i, diag(g1) W_i)] for i1 = 0, 1; each (256, (j1, c1)).
    """
    gain0, gain1 = (norm.weight.reshape(-1, 1) for norm in norms)
    return [(gain0 * gain1 * w, gain1 * w) for w in upscaler.first_weights]


def shared_first_products(upscaler, norms, image):
    """The prompt-independent part S of the points decoder's first upscaler GEMM (see
    `factored_first_weights`), for one image.

    Args:
        image: (1, L, 256), embedding + no-mask embedding (X0).
    Returns:
        S_0, S_1, (L, (j1, c1)) each: S_i = X0c diag(g0 g1) W_i - m (1' diag(g1) W_i) for kernel
        rows i1 = 0, 1, with X0c = X0 centred over channels and m = mean over channels of X0c g0, (L, 1).
    """
    centred = image - image.mean(-1, keepdim=True)  # (1, L, 256)
    spread = (centred * norms[0].weight).mean(-1, keepdim=True)  # (1, L, 1)
    gains = norms[0].weight * norms[1].weight
    # The gains go on the image, not into W_i: the graph then holds W_i itself (as the initializer
    # `...upscaler.w1_<i>`), which `upscaler_int8.on_image_tokens` needs to undo the factoring.
    return tuple(((centred * gains) @ w - spread * last.sum(0))[0]
                 for w, (_, last) in zip(upscaler.first_weights, _normed_first_weights(upscaler, norms)))


def first_product_bias(upscaler, norms):
    """The constant part of the first upscaler GEMM (see `factored_first_weights`): per kernel
    row, beta1 W_i + b, each ((j1, c1),)."""
    return [norms[1].bias @ w + upscaler.b1 for w in upscaler.first_weights]


def factored_first_weights(upscaler, norms, heads, factors0, factors1):
    """The first upscaler GEMM of the points decoder without its (B, L, 256) input (exact algebra).

    Without a mask input the image tokens reaching the upscaler are X2 = LN1(X1 + A1 V1),
    X1 = LN0(X0 + A0 V0), with X0 (L, 256) the image side every prompt shares and (A, V) the
    image -> token attention's factors: weights (L, hT), one softmax per head, so each row sums
    to h; values (hT, 256). LN(x) = r (x - mean(x)) g + beta, with r = 1 / std(x) per row.
    The means are linear in the factors (mean(X0 + A0 V0) = mean(X0) + A0 mean(V0), and so for
    X1), so with Vc = V centred over channels, w = mean over channels of Vc g0 (hT, 1) and
    c = 1' diag(g1) W_i:
        X2 W_i + b = r0 r1 S_i + [r0 r1 A0 | r1 A1] [M0_i; M1_i] + (beta1 W_i + b)
        M0_i = V0c diag(g0 g1) W_i - w c
        M1_i = V1c diag(g1) W_i + 1 (beta0 - mean(beta0)) diag(g1) W_i / h
    (the last term uses A1's row sums), S_i = `shared_first_products`, computed once per image.
    Per prompt the GEMM's inner dimension falls from 256 to 2hT (112 for an everything-mode
    prompt: 7 tokens, 8 heads), and the only per-prompt moments it needs are r0 and r1.

    Args:
        norms: (layer 0's norm4, layer 1's norm4); heads: h of the image -> token attentions.
        factors0, factors1: (A (B, L, hT), V (B, hT, 256)) of layer 0's and layer 1's image ->
            token attention.
    Returns:
        [(B, 2hT, (j1, c1))], the stacked [M0_i; M1_i] for i1 = 0, 1: per prompt, the GEMM's
        weights. Its input F = [r0 r1 A0 | r1 A1] is `factored_first_inputs`' job, one prompt at a
        time.
    """
    (_, values0), (_, values1) = factors0, factors1
    centred0 = values0 - values0.mean(-1, keepdim=True)  # (B, hT, 256)
    centred1 = values1 - values1.mean(-1, keepdim=True)
    spread0 = (centred0 * norms[0].weight).mean(-1, keepdim=True)  # (B, hT, 1)
    bias0 = norms[0].bias - norms[0].bias.mean()  # (256,)
    rows = []
    for both, last in _normed_first_weights(upscaler, norms):
        rows0 = centred0 @ both - spread0 * last.sum(0)  # (B, hT, (j1, c1))
        rows1 = centred1 @ last + (bias0 @ last) / heads
        rows.append(torch.cat([rows0, rows1], dim=1))
    return rows


def factored_first_inputs(weights0, weights1, rstd0, rstd1):
    """One prompt's input F to the factored first upscaler GEMM (see `factored_first_weights`).

    Args:
        weights0, weights1: (L, hT) image -> token attention weights A0, A1; rstd0, rstd1: (L, 1).
    Returns:
        F = [r0 r1 A0 | r1 A1] (L, 2hT) and r0 r1 (L, 1).
    """
    scale = rstd0 * rstd1
    return torch.cat([scale * weights0, rstd1 * weights1], dim=-1), scale


# The pieces of the points decoder's per-image side, in the order they are packed in its cache.
IMAGE_SIDE_PIECES = ("side_k", "side_v", "side_q", "side_shared0", "side_shared1", "side_image")


def points_image_side(decoder, image_embeddings):
    """The prompt-independent part of the points decoder, for one image.

    Without a mask input every prompt sees the same image side (embedding + no-mask embedding,
    positional encoding), so the token -> image attention's k/v projections and the image ->
    token attention's q projection of it in layer 0 are the same for every prompt of an image,
    and so is the image's part of the first upscaler GEMM (`shared_first_products`); the image
    tokens themselves are kept too, so no per-image work is left in a call on a cached image.

    Args:
        decoder: DecoderOnnx; image_embeddings: (1, 256, 64, 64).
    Returns:
        The IMAGE_SIDE_PIECES, each (n, h, 4096, d) as stored in the cache (`side_pieces`):
        k and v of cross_attn_token_to_image and q of cross_attn_image_to_token (n = 1 each);
        the shared first products S_0, S_1 ((4096, (j1, c1)) each, flat, n = 1); the image
        tokens ((1, 4096, 256), flat, n = 2).
    """
    prompt, transformer = decoder.prompt_encoder, decoder.mask_decoder.transformer
    layer0 = transformer.layers[0]
    no_mask = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)
    image = (image_embeddings + no_mask).flatten(2).transpose(1, 2)  # (1, 4096, 256)
    pos = prompt.get_dense_pe().flatten(2).transpose(1, 2)  # (1, 4096, 256)
    to_image, to_tokens = layer0.cross_attn_token_to_image, layer0.cross_attn_image_to_token
    k = _heads(to_image.k_proj(image + pos), to_image.num_heads)  # (1, h, 4096, d)
    v = _heads(to_image.v_proj(image), to_image.num_heads)
    q = _heads(to_tokens.q_proj(image + pos), to_tokens.num_heads)
    norms = tuple(layer.norm4 for layer in transformer.layers)
    shared0, shared1 = shared_first_products(decoder.upscaler, norms, image)  # (4096, (j1, c1)) each
    return (k, v, q) + tuple(x.reshape(-1, *k.shape[1:]) for x in (shared0, shared1, image))


def side_pieces(side_shared0, side_shared1, side_image):
    """The flat-stored pieces of `points_image_side` in the shapes they are used in:
    S_0, S_1 (4096, (j1, c1)) and the image tokens (1, 4096, 256). Only reshapes: the cache
    holds them in this memory order."""
    positions = side_image.shape[2]
    return side_shared0.reshape(positions, -1), side_shared1.reshape(positions, -1), side_image.reshape(1, positions, -1)


class ImageSideOnnx(nn.Module):
    """`points_image_side`: image_embeddings (1, 256, 64, 64) -> the IMAGE_SIDE_PIECES, then the
    cache holding them (7, h, 4096, d). The branch of the points decoder graph that runs when the caller
    has no cached image side for this image."""

    def __init__(self, model):
        super().__init__()
        self.decoder = DecoderOnnx(model)

    def forward(self, image_embeddings):
        pieces = points_image_side(self.decoder, image_embeddings)
        return (*pieces, torch.cat(pieces, dim=0))


class CachedImageSideOnnx(nn.Module):
    """A cached image side (7, h, 4096, d) -> the IMAGE_SIDE_PIECES (one Split), then an empty
    (0, h, 4096, d) tensor. The branch of the points decoder graph that runs when the caller passes
    the cache: the caller holds the cache already, and returning it would copy 14 MiB per call."""

    def forward(self, cache):
        return (*torch.split(cache, [1, 1, 1, 1, 1, 2]), cache[:0])


class PointsDecoderOnnx(nn.Module):
    """The points decoder up to the mask upscaler: `DecoderOnnx` for prompts without a mask input,
    with less work per prompt (see forward). `export_onnx.export_points_decoder` runs
    `UpscalerOnnx` on its outputs one prompt at a time (an ONNX Scan) to make the graph."""

    def __init__(self, model):
        super().__init__()
        self.decoder = DecoderOnnx(model)

    def forward(self, point_coords, point_labels, side_k, side_v, side_q, side_shared0, side_shared1, side_image):
        """`DecoderOnnx.predict_masks` with has_mask_input = 0 for every prompt, before upscaling.

        Without a mask input every prompt sees the same image side (embedding + no-mask embedding,
        positional encoding), so layer 0's image-side k/v (tokens -> image) and q (image -> tokens)
        projections are computed once per image (`points_image_side`, whose pieces are given here)
        and broadcast over the B prompts. After layer 0 the image
        side differs per prompt; there every image-side projection (4096 x 256 x 128 MACs) is
        multiplied through the 5 + N tokens instead (4096 x 256 x 8(5 + N)), which is cheaper
        while N < 11. The final attention only updates tokens, and only the IoU token and the 3
        returned mask tokens are read after it, so it runs for those 4. The upscaler's first GEMM
        is not applied to the final image tokens but factored (`factored_first_weights`): this
        returns its per-prompt factors. Only the order of summation differs from SAM's decoder.

        Args:
            point_coords: (B, N, 2) float32, XY pixels, 1024 frame (padding rule as DecoderOnnx).
            point_labels: (B, N) float32; 1 fg, 0 bg, 2/3 box corners, -1 padding.
            side_k, side_v, side_q, side_shared0, side_shared1, side_image: `points_image_side` of
                this image, as stored in its cache (`side_pieces` reshapes the last three; done here,
                outside the If that takes them from the cache, a reshape copies nothing).
        Returns:
            The inputs of `UpscalerOnnx` with a B axis in front where per prompt:
            weights0, weights1 (B, 4096, hT); rstd0, rstd1 (B, 4096, 1); rows0, rows1
            (B, 2hT, (j1, c1)); hyper_in (B, 3, 32) hypernetwork outputs of the returned mask
            tokens; then iou_predictions (B, 3) float32; then the per-image shared0, shared1
            (4096, (j1, c1)).
        """
        base, decoder = self.decoder, self.decoder.mask_decoder
        prompt, transformer = base.prompt_encoder, decoder.transformer
        layer0, layer1 = transformer.layers
        tokens = base.embed_points(point_coords, point_labels)  # (B, N, 256)
        b = tokens.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (5, 256)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), tokens], dim=1)  # (B, T, 256)
        pos = prompt.get_dense_pe().flatten(2).transpose(1, 2)  # (1, 4096, 256)
        shared0, shared1, image = side_pieces(side_shared0, side_shared1, side_image)

        # Layer 0 (skip_first_layer_pe): the image side is shared by the batch.
        k, v, shared_q = side_k, side_v, side_q  # (1, h, 4096, d) each
        queries = layer0.norm1(layer0.self_attn(q=tokens, k=tokens, v=tokens))  # (B, T, 256)
        attn = layer0.cross_attn_token_to_image
        h, d = attn.num_heads, attn.internal_dim // attn.num_heads
        q = _heads(attn.q_proj(queries + tokens), h)  # (B, h, T, d)
        mixed = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(d), dim=-1) @ v  # (B, h, T, d)
        queries = layer0.norm2(queries + attn.out_proj(mixed.transpose(1, 2).reshape(b, -1, h * d)))
        queries = layer0.norm3(queries + layer0.mlp(queries))
        attn = layer0.cross_attn_image_to_token
        factors0 = _image_to_tokens(attn, None, queries + tokens, queries, shared_q, factored=True)
        keys, _, rstd0 = _layer_norm_with_moments(layer0.norm4, image + factors0[0] @ factors0[1])  # (B, 4096, 256)

        # Layer 1 and the final attention: per prompt, reassociated through the tokens.
        q = queries + tokens
        queries = layer1.norm1(queries + layer1.self_attn(q=q, k=q, v=queries))
        attended = _tokens_to_image(layer1.cross_attn_token_to_image, queries + tokens, keys + pos, keys)
        queries = layer1.norm2(queries + attended)
        queries = layer1.norm3(queries + layer1.mlp(queries))
        factors1 = _image_to_tokens(layer1.cross_attn_image_to_token, keys + pos, queries + tokens, queries,
                                    factored=True)
        keys, _, rstd1 = _layer_norm_with_moments(layer1.norm4, keys + factors1[0] @ factors1[1])
        read = [0] + [1 + i for i in MASK_TOKENS]  # the IoU token, then mask token i at 1 + i
        queries, tokens = queries[:, read], tokens[:, read]  # (B, 4, 256)
        attended = _tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + pos, keys)
        queries = transformer.norm_final_attn(queries + attended)  # (B, 4, 256)

        hyper_in = torch.stack(
            [decoder.output_hypernetworks_mlps[i](queries[:, 1 + j, :]) for j, i in enumerate(MASK_TOKENS)], dim=1
        )  # (B, 3, 32)
        iou_pred = decoder.iou_prediction_head(queries[:, 0, :])[:, MASK_TOKENS[0] :]  # (B, 3)
        norms = (layer0.norm4, layer1.norm4)
        heads = layer1.cross_attn_image_to_token.num_heads
        rows0, rows1 = factored_first_weights(base.upscaler, norms, heads, factors0, factors1)
        return factors0[0], factors1[0], rstd0, rstd1, rows0, rows1, hyper_in, iou_pred, shared0, shared1


class UpscalerOnnx(nn.Module):
    """`UpscalerGemms` for one prompt of the points decoder: the body of its per-prompt Scan, the
    first GEMM made from `factored_first_weights`' factors and the image's shared products
    (measured against the unfactored GEMM on (4096, 256) image tokens, 2 cores: 8.7 -> 6.4 ms per
    prompt for this body alone; the points decoder 1.04x-1.05x faster per prompt at B=16-64, a 32x32
    run 1.11x; benchmarks/RESULTS.md, "Everything mode, session 11").

    One prompt at a time, the upscaler's intermediates (4 MB after the first ConvTranspose, 8 MB
    after the second) stay in cache; for a batch of 16 they are 64 and 128 MB and every
    elementwise step goes to memory (measured: 6.9 vs 8.0 ms per prompt on 2 cores).
    """

    def __init__(self, model):
        super().__init__()
        self.upscaler = UpscalerGemms(model.mask_decoder, model.prompt_encoder.image_embedding_size)
        norms = tuple(layer.norm4 for layer in model.mask_decoder.transformer.layers)
        with torch.no_grad():
            for i, bias in enumerate(first_product_bias(self.upscaler, norms)):
                self.register_buffer(f"bias{i}", bias.clone())

    def forward(self, weights0, weights1, rstd0, rstd1, rows0, rows1, hyper_in, shared0, shared1):
        """One prompt's `PointsDecoderOnnx` outputs (without the B axis) -> (3, 256, 256) mask logits.

        Args:
            weights0, weights1: (4096, hT); rstd0, rstd1: (4096, 1); rows0, rows1: (2hT, (j1, c1));
            hyper_in: (3, 32); shared0, shared1: (4096, (j1, c1)), the image's shared first products.
        """
        # Built here, not for the whole batch: one prompt's F stays in cache. For a batch of 16, F
        # is a (16, 4096, 112) tensor, and its Muls and last-axis Concat cost 0.48 ms per prompt
        # (ORT profiler); measured 15.08 -> 14.86 ms per prompt (p50, B=16) moving them here.
        factors, scale = factored_first_inputs(weights0, weights1, rstd0, rstd1)
        kernel_rows = ((rows0, self.bias0, shared0), (rows1, self.bias1, shared1))
        products = [factors @ rows + bias + scale * shared for rows, bias, shared in kernel_rows]
        return self.upscaler.from_first_products(products, hyper_in.unsqueeze(0)).squeeze(0)  # a view, not a Gather copy
