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


def _image_to_tokens(attn, query_src, k_in, v_in, shared_q=None):
    """SAM `Attention(q=query_src, k=k_in, v=v_in)` for L image positions attending to T tokens,
    with the image-side projections multiplied through the tokens instead (exact algebra).

    scores_h = X (W_q,h^T k_h^T) + b_q,h . k_h; out = sum_h A_h (v_h W_o,h^T + b_o / h), as every
    head's weights sum to 1. The 1/sqrt(d) scale is applied to k, on the small token side.

    Args:
        query_src: (B, L, 256), or None with `shared_q`.
        k_in, v_in: (B, T, 256).
        shared_q: (1, h, L, d) q projection computed once for the batch, or None.
    Returns:
        (B, L, 256).
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
    return weights @ v_out.reshape(b, h * t, -1)  # (B, L, 256)


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
        (h, w), b, m = self.size, src.shape[0], hyper_in.shape[1]
        src = src.reshape(-1, src.shape[-1])  # (B*HW, 256)
        rows = []  # (B, M, H, 1, 4W) for (i1, i2) = (0, 0), (0, 1), (1, 0), (1, 1)
        for w1 in (self.w1_0, self.w1_1):
            y = (src @ w1 + self.b1).reshape(-1, self.c1)  # (B*HW*2, c1), rows (b, h, w, j1)
            y = F.gelu(F.layer_norm(y, (self.c1,), self.norm.weight, self.norm.bias, self.norm.eps))
            for w2 in (self.w2_0, self.w2_1):
                z = F.gelu(y @ w2 + self.b2).reshape(b, -1, self.c2)  # (B, HW*4, c2), rows (h, w, j1, j2)
                rows.append((hyper_in @ z.transpose(1, 2)).reshape(b, m, h, 1, 4 * w))
        return torch.cat(rows, dim=3).reshape(b, m, 4 * h, 4 * w)


def layer0_image_side(decoder, image_embeddings):
    """The prompt-independent part of the two-way transformer's layer 0, for one image.

    Without a mask input every prompt sees the same image side (embedding + no-mask embedding,
    positional encoding), so the token -> image attention's k/v projections and the image ->
    token attention's q projection of it are the same for every prompt of an image.

    Args:
        decoder: DecoderOnnx; image_embeddings: (1, 256, 64, 64).
    Returns:
        (3, h, 4096, d): k and v of cross_attn_token_to_image, q of cross_attn_image_to_token.
    """
    prompt, layer0 = decoder.prompt_encoder, decoder.mask_decoder.transformer.layers[0]
    no_mask = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)
    image = (image_embeddings + no_mask).flatten(2).transpose(1, 2)  # (1, 4096, 256)
    pos = prompt.get_dense_pe().flatten(2).transpose(1, 2)  # (1, 4096, 256)
    to_image, to_tokens = layer0.cross_attn_token_to_image, layer0.cross_attn_image_to_token
    k = _heads(to_image.k_proj(image + pos), to_image.num_heads)  # (1, h, 4096, d)
    v = _heads(to_image.v_proj(image), to_image.num_heads)
    q = _heads(to_tokens.q_proj(image + pos), to_tokens.num_heads)
    return torch.cat([k, v, q], dim=0)  # (3, h, 4096, d)


class ImageSideOnnx(nn.Module):
    """`layer0_image_side`: image_embeddings (1, 256, 64, 64) -> (3, h, 4096, d). The branch of the
    points decoder graph that runs when the caller has no cached image side for this image."""

    def __init__(self, model):
        super().__init__()
        self.decoder = DecoderOnnx(model)

    def forward(self, image_embeddings):
        return layer0_image_side(self.decoder, image_embeddings)


class PointsDecoderOnnx(nn.Module):
    """The points decoder up to the mask upscaler: `DecoderOnnx` for prompts without a mask input,
    with less work per prompt (see forward). `export_onnx.export_points_decoder` runs
    `UpscalerOnnx` on its outputs one prompt at a time (an ONNX Scan) to make the graph."""

    def __init__(self, model):
        super().__init__()
        self.decoder = DecoderOnnx(model)

    def forward(self, image_embeddings, point_coords, point_labels, image_side):
        """`DecoderOnnx.predict_masks` with has_mask_input = 0 for every prompt, before upscaling.

        Without a mask input every prompt sees the same image side (embedding + no-mask embedding,
        positional encoding), so layer 0's image-side k/v (tokens -> image) and q (image -> tokens)
        projections are computed once per image (`layer0_image_side`, given here as `image_side`)
        and broadcast over the B prompts. After layer 0 the image
        side differs per prompt; there every image-side projection (4096 x 256 x 128 MACs) is
        multiplied through the 5 + N tokens instead (4096 x 256 x 8(5 + N)), which is cheaper
        while N < 11. The final attention only updates tokens, and only the IoU token and the 3
        returned mask tokens are read after it, so it runs for those 4. Only the order of
        summation differs from SAM's decoder.

        Args:
            image_embeddings: (1, 256, 64, 64) float32.
            point_coords: (B, N, 2) float32, XY pixels, 1024 frame (padding rule as DecoderOnnx).
            point_labels: (B, N) float32; 1 fg, 0 bg, 2/3 box corners, -1 padding.
            image_side: (3, h, 4096, d), `layer0_image_side` of this image.
        Returns:
            image_tokens (B, 4096, 256) after the transformer, hyper_in (B, 3, 32) hypernetwork
            outputs of the returned mask tokens, iou_predictions (B, 3) float32.
        """
        base, decoder = self.decoder, self.decoder.mask_decoder
        prompt, transformer = base.prompt_encoder, decoder.transformer
        layer0, layer1 = transformer.layers
        tokens = base.embed_points(point_coords, point_labels)  # (B, N, 256)
        b = tokens.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (5, 256)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), tokens], dim=1)  # (B, T, 256)
        no_mask = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)
        image = (image_embeddings + no_mask).flatten(2).transpose(1, 2)  # (1, 4096, 256)
        pos = prompt.get_dense_pe().flatten(2).transpose(1, 2)  # (1, 4096, 256)

        # Layer 0 (skip_first_layer_pe): the image side is shared by the batch.
        k, v, shared_q = (image_side[i : i + 1] for i in range(3))  # (1, h, 4096, d) each
        queries = layer0.norm1(layer0.self_attn(q=tokens, k=tokens, v=tokens))  # (B, T, 256)
        attn = layer0.cross_attn_token_to_image
        h, d = attn.num_heads, attn.internal_dim // attn.num_heads
        q = _heads(attn.q_proj(queries + tokens), h)  # (B, h, T, d)
        mixed = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(d), dim=-1) @ v  # (B, h, T, d)
        queries = layer0.norm2(queries + attn.out_proj(mixed.transpose(1, 2).reshape(b, -1, h * d)))
        queries = layer0.norm3(queries + layer0.mlp(queries))
        attn = layer0.cross_attn_image_to_token
        keys = layer0.norm4(image + _image_to_tokens(attn, None, queries + tokens, queries, shared_q))  # (B, 4096, 256)

        # Layer 1 and the final attention: per prompt, reassociated through the tokens.
        q = queries + tokens
        queries = layer1.norm1(queries + layer1.self_attn(q=q, k=q, v=queries))
        attended = _tokens_to_image(layer1.cross_attn_token_to_image, queries + tokens, keys + pos, keys)
        queries = layer1.norm2(queries + attended)
        queries = layer1.norm3(queries + layer1.mlp(queries))
        attended = _image_to_tokens(layer1.cross_attn_image_to_token, keys + pos, queries + tokens, queries)
        keys = layer1.norm4(keys + attended)
        read = [0] + [1 + i for i in MASK_TOKENS]  # the IoU token, then mask token i at 1 + i
        queries, tokens = queries[:, read], tokens[:, read]  # (B, 4, 256)
        attended = _tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + pos, keys)
        queries = transformer.norm_final_attn(queries + attended)  # (B, 4, 256)

        hyper_in = torch.stack(
            [decoder.output_hypernetworks_mlps[i](queries[:, 1 + j, :]) for j, i in enumerate(MASK_TOKENS)], dim=1
        )  # (B, 3, 32)
        iou_pred = decoder.iou_prediction_head(queries[:, 0, :])[:, MASK_TOKENS[0] :]  # (B, 3)
        return keys, hyper_in, iou_pred


class UpscalerOnnx(nn.Module):
    """`UpscalerGemms` for one prompt: the body of the points decoder's per-prompt Scan.

    One prompt at a time, the upscaler's intermediates (4 MB after the first ConvTranspose, 8 MB
    after the second) stay in cache; for a batch of 16 they are 64 and 128 MB and every
    elementwise step goes to memory (measured: 6.9 vs 8.0 ms per prompt on 2 cores).
    """

    def __init__(self, model):
        super().__init__()
        self.upscaler = UpscalerGemms(model.mask_decoder, model.prompt_encoder.image_embedding_size)

    def forward(self, image_tokens, hyper_in):
        """(4096, 256) image tokens, (3, 32) hypernetwork outputs -> (3, 256, 256) mask logits."""
        return self.upscaler(image_tokens.unsqueeze(0), hyper_in.unsqueeze(0)).squeeze(0)  # a view, not a Gather copy
