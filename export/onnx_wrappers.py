"""Trace-only modules that define the two ONNX graphs of tinysam-rt.

Mirrors `segment_anything/utils/onnx.py` (`SamOnnxModel`): prompt branches become arithmetic on
the labels so one graph serves points, boxes and masks. Differences from it: the batch B of
prompts and the number N of points are both dynamic; the image embedding is shared by all B
prompts through `expand` (no copies); `has_mask_input` is per prompt (B,); only TinySAM's tokens
1..3 are returned; no resizing to the original image (the runtime does that in numpy).

These modules exist only to be traced by `torch.onnx.export`; use `build_tinysam` for eager use.
"""

import torch
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
        # Static sizes from the config, so the graph does no shape arithmetic for them.
        C, (H, W) = decoder.transformer_dim, self.prompt_encoder.image_embedding_size
        hs, src = decoder.transformer(src, pos_src, tokens)  # (B, 5+N, 256), (B, 64*64, 256)
        iou_token_out = hs[:, 0, :]  # (B, 256)
        mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]  # (B, 4, 256)
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(-1, C, H, W))  # (B, 32, 256, 256)
        hyper_in = torch.stack(
            [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in MASK_TOKENS], dim=1
        )  # (B, 3, 32)
        masks = (hyper_in @ upscaled.flatten(2)).reshape(-1, len(MASK_TOKENS), 4 * H, 4 * W)
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
