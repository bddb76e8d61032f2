"""Parity with Meta's SamAutomaticMaskGenerator: same weights, same parameters, same real image.

A small ViT config that both code bases build (the reference's modules are generic), random weights, thresholds
at 0 so that random weights yield masks. Random weights give junk masks: this checks plumbing, not quality.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from napari_sam.core import SamConfig, build_sam
from napari_sam.core.amg import AutomaticMaskGenerator
from napari_sam.core.image import to_rgb_uint8

SMALL = SamConfig("parity_vit", "vit", img_size=256, vit_embed_dim=64, vit_depth=2, vit_num_heads=2,
                  vit_global_attn_indexes=(1,), vit_window_size=4, prompt_embed_dim=64, decoder_mlp_dim=128,
                  decoder_num_heads=2, iou_head_hidden_dim=64)


def _reference_model(reference):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    c = SMALL
    g = c.embed_grid
    return Sam(
        image_encoder=ImageEncoderViT(depth=c.vit_depth, embed_dim=c.vit_embed_dim, img_size=c.img_size, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c.vit_num_heads,
                                      patch_size=c.vit_patch_size, qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=c.vit_global_attn_indexes, window_size=c.vit_window_size,
                                      out_chans=c.prompt_embed_dim),
        prompt_encoder=PromptEncoder(embed_dim=c.prompt_embed_dim, image_embedding_size=(g, g),
                                     input_image_size=(c.img_size, c.img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=c.prompt_embed_dim,
                                                               mlp_dim=c.decoder_mlp_dim,
                                                               num_heads=c.decoder_num_heads),
                                 transformer_dim=c.prompt_embed_dim, iou_head_depth=3,
                                 iou_head_hidden_dim=c.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@pytest.fixture(scope="module")
def models(reference):
    torch.manual_seed(0)
    ours = build_sam(SMALL).eval()
    ref = _reference_model(reference)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def _match_fraction(ref_masks: list[np.ndarray], our_masks: list[np.ndarray], iou_min: float = 0.95) -> float:
    a = np.stack(ref_masks).reshape(len(ref_masks), -1).astype(np.float32)
    b = np.stack(our_masks).reshape(len(our_masks), -1).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    iou = inter / np.maximum(union, 1)
    # one-to-one greedy matching, best pairs first
    matched, used = 0, set()
    for i in np.argsort(-iou.max(1)):
        j = int(np.argmax(np.where(np.isin(np.arange(len(b)), list(used)), -1, iou[i])))
        if iou[i, j] >= iou_min and j not in used:
            used.add(j)
            matched += 1
    return matched / len(a)


@pytest.mark.slow
@pytest.mark.parametrize("params", [
    dict(points_per_side=8, box_nms_thresh=1.0),  # no suppression: every decoded mask compared
    dict(points_per_side=4, crop_n_layers=1),  # crops, crop-edge filter, NMS within and across crops
])
def test_mask_set_matches_reference(models, reference, nuclei_sample, params):
    ours, ref = models
    image = to_rgb_uint8(nuclei_sample[0])
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, **params)
    ref_recs = [r for r in reference.SamAutomaticMaskGenerator(ref, **kw).generate(image) if r["area"] > 0]
    our_recs = AutomaticMaskGenerator(ours, **kw).generate(image)
    assert len(ref_recs) >= 1
    frac = _match_fraction([r["segmentation"] for r in ref_recs], [r["segmentation"] for r in our_recs])
    assert frac >= 0.98, f"{frac:.3f} of {len(ref_recs)} reference masks matched ({len(our_recs)} ours)"
    assert len(our_recs) <= len(ref_recs) + max(1, len(ref_recs) // 50)
    # records: boxes (min_row, min_col, max_row, max_col) max exclusive; reference bbox is XYWH inclusive-width
    best = max(ref_recs, key=lambda r: r["predicted_iou"])
    ours_best = max(our_recs, key=lambda r: r["predicted_iou"])
    x, y, w, h = best["bbox"]
    assert ours_best["bbox"] == (y, x, y + h + 1, x + w + 1)
    assert ours_best["point"] == pytest.approx(best["point_coords"][0][::-1])
    assert ours_best["predicted_iou"] == pytest.approx(best["predicted_iou"], abs=1e-4)
    assert ours_best["area"] == ours_best["segmentation"].sum() == best["area"]
