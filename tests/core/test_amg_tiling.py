"""Tiling with a halo on a real 603 x 1272 DSB2018 image: with a deterministic segmenter (fixed threshold +
connected components) the tiled result equals the untiled one exactly, objects cut by tile borders included."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label

from conftest import data_dir, read_image, whole_across_tiles
from napari_sam.core.amg import Cancelled
from napari_sam.core.tiling import segment_tiled, tile_boxes

ID = "20b20ab049372d184c705acebe7af026d3580f5fd5a72ed796e3622e1685af2f"


@pytest.fixture(scope="module")
def big():
    return read_image(data_dir("dsb2018_full") / "images" / f"{ID}.png")[..., 0]


def _seg(tile):
    return label(tile > 30, connectivity=2)


def _raster(lab):
    ids, first = np.unique(lab.ravel(), return_index=True)
    lut = np.zeros(lab.max() + 1, np.int32)
    order = ids[ids > 0][np.argsort(first[ids > 0])]
    lut[order] = np.arange(1, order.size + 1)
    return lut[lab]


@pytest.mark.parametrize("tile,halo", [(256, 32), (200, 50), (128, 8)])
def test_tiled_equals_untiled(big, tile, halo):
    whole = _raster(_seg(big))
    tiled = segment_tiled(big, _seg, tile_size=tile, halo=halo)
    crossing = sum(len(np.unique(whole[:, c])) > 1 for c in range(tile, big.shape[1], tile))
    assert crossing > 0  # some objects do cross tile borders
    assert np.array_equal(tiled, whole)


def test_tile_boxes_cover_the_image_once():
    cover = np.zeros((603, 1272), int)
    for core, tile in tile_boxes((603, 1272), 256, 32):
        cover[core[0] : core[2], core[1] : core[3]] += 1
        assert tile[0] == max(0, core[0] - 32) and tile[3] == min(1272, core[3] + 32)
    assert (cover == 1).all()


def test_progress_cancel_and_errors(big):
    seen = []
    segment_tiled(big[:300, :300], _seg, tile_size=128, halo=16, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (9, 9)
    with pytest.raises(Cancelled):
        segment_tiled(big, _seg, tile_size=128, halo=16, cancel=lambda: True)
    with pytest.raises(ValueError, match="tile_size"):
        tile_boxes((100, 100), 4, 2)
    with pytest.raises(ValueError, match="shape"):
        segment_tiled(big[:64, :64], lambda t: np.zeros((3, 3), int), tile_size=32, halo=4)


# ---------------------------------------------------------------- kept per-tile proposals (TiledProposals)
@pytest.fixture(scope="module")
def builtin():
    from napari_sam.core.build import builtin_checkpoint_path, load_model

    if not builtin_checkpoint_path().is_file():
        pytest.skip(f"the built-in model {builtin_checkpoint_path()} does not exist")
    return load_model(device="cpu")


def test_kept_tile_proposals_give_exactly_segment_everything(builtin, nuclei_sample, one_torch_thread):
    """The built-in model with its recommended settings (learned rescoring, parts resolved) on a real 256 px image
    in 4 tiles: TiledProposals kept at lower floors (as the widget keeps them), re-filtered and stitched, equal
    segment_everything's tiled result exactly, at two sets of thresholds; and segment_everything equals what it
    computed before tiles could be kept (segment_tiled over each tile's filter + records_to_labels)."""
    from napari_sam.core.amg import AutomaticMaskGenerator, segment_everything
    from napari_sam.core.image import to_rgb_uint8
    from napari_sam.core.labels import records_to_labels

    image = nuclei_sample[0]
    tiling = dict(max_untiled=200, tile_size=128, halo=32)
    gen = AutomaticMaskGenerator.for_model(builtin, points_per_side=8)
    assert gen.rescore and gen.resolve_parts
    kept = gen.propose_tiled(image, tile_size=128, halo=32, iou_floor=0.3, stability_floor=0.3)
    assert len(kept.tiles) == len(kept.boxes) == 4 and len(kept) == sum(len(p) for p in kept.tiles)
    for th in ({}, dict(pred_iou_thresh=0.8, box_nms_thresh=0.5, min_object_area=60)):
        th = dict(th)
        area = th.pop("min_object_area", 16)
        api = segment_everything(image, builtin, points_per_side=8, min_object_area=area, **th, **tiling)
        assert api.max() >= 5
        assert np.array_equal(kept.labels(area, **{**gen.thresholds(), **th}), api)
        g = AutomaticMaskGenerator.for_model(builtin, points_per_side=8, **th)

        def old(tile, g=g, area=area):
            return records_to_labels(g.propose(tile).filter(**g.thresholds()), tile.shape[:2], area)

        assert np.array_equal(segment_tiled(to_rgb_uint8(image), old, tile_size=128, halo=32), api)


def test_a_refilter_reuses_the_tiles_whose_candidates_did_not_change(builtin, nuclei_sample, one_torch_thread,
                                                                     monkeypatch):
    """The built-in model on a real 256 px image in 4 tiles: moving a threshold a little changes the passing
    candidates of some tiles only; those tiles alone are painted and cleaned again, the others reuse their last
    objects, and the stitched result is exactly segment_everything's at every step (a changed min_object_area
    cleans every tile again)."""
    import napari_sam.core.labels as L
    from napari_sam.core.amg import AutomaticMaskGenerator, segment_everything

    image = nuclei_sample[0]
    tiling = dict(max_untiled=200, tile_size=128, halo=32)
    gen = AutomaticMaskGenerator.for_model(builtin, points_per_side=8)
    kept = gen.propose_tiled(image, tile_size=128, halo=32, iou_floor=0.3, stability_floor=0.3)
    made, real = [], L.records_to_objects
    monkeypatch.setattr(L, "records_to_objects", lambda *a: made.append(a[0]) or real(*a))
    steps = [(16, {}), (16, dict(pred_iou_thresh=0.55)), (16, dict(pred_iou_thresh=0.56)), (40, {}), (40, {})]
    last, partly = None, 0
    for area, th in steps:
        th = {**gen.thresholds(), **th}
        passing = [[(r["predicted_iou"], tuple(r["bbox"])) for r in p.filter(**th)] for p in kept.tiles]
        changed = [k for k in range(4) if last is None or passing[k] != last[0][k] or area != last[1]]
        made.clear()
        lab = kept.labels(area, **th)
        assert len(made) == len(changed)  # painted and cleaned again: the changed tiles only
        partly += 0 < len(changed) < 4
        api = segment_everything(image, builtin, points_per_side=8, min_object_area=area, **th, **tiling)
        assert np.array_equal(lab, api), (area, th)
        last = (passing, area)
    assert partly >= 1 and len(changed) == 0  # some moves changed some tiles only; the last changed none


def test_kept_tile_proposals_hold_no_float_copy_of_the_image(tiny_model, nuclei_sample):
    """Kept proposals keep the scorer's grayscale image as uint8, not float32 (4 bytes per pixel; for a tiled
    plane every tile its own): one channel for a gray image, shared by all tiles; the gray image they give is the
    RGB channel mean, as before; a colour image keeps its RGB."""
    from napari_sam.core.amg import AutomaticMaskGenerator
    from napari_sam.core.amg_proposals import MaskProposals
    from napari_sam.core.image import to_rgb_uint8

    image = nuclei_sample[0]
    gen = AutomaticMaskGenerator(tiny_model, points_per_side=2)
    one = gen.propose(image)

    def images_kept(p):
        return [v for v in vars(p).values() if isinstance(v, np.ndarray) and v.ndim >= 2]

    assert images_kept(one) and all(a.dtype == np.uint8 and a.ndim == 2 for a in images_kept(one))
    kept = gen.propose_tiled(image, tile_size=128, halo=32)
    for p in kept.tiles:
        assert images_kept(p) and all(a.dtype == np.uint8 and a.ndim == 2 for a in images_kept(p))
    shared = kept.tiles[0]._gray_source.base
    assert shared is not None and all(p._gray_source.base is shared for p in kept.tiles)
    rgb = to_rgb_uint8(image)
    assert np.array_equal(one.gray, rgb.mean(-1, dtype=np.float32)) and one.gray.dtype == np.float32
    for (_, (t0, l0, t1, l1)), p in zip(kept.boxes, kept.tiles):
        assert np.array_equal(p.gray, rgb[t0:t1, l0:l1].mean(-1, dtype=np.float32))
    colour = rgb.copy()
    colour[..., 1] //= 2
    p = MaskProposals(rgb.shape[:2], [], {}, None, colour)
    assert np.array_equal(p.gray, colour.mean(-1, dtype=np.float32)) and p._gray_source.dtype == np.uint8


def test_tiled_proposals_progress_and_cancel(tiny_model, nuclei_sample):
    """Progress counts the points of all tiles; cancel stops inside a tile (between decoder batches)."""
    from napari_sam.core.amg import AutomaticMaskGenerator

    image = nuclei_sample[0]
    gen = AutomaticMaskGenerator(tiny_model, points_per_side=4, points_per_batch=4)
    seen = []
    gen.propose_tiled(image, tile_size=128, halo=32, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (64, 64) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 10  # polled once per tile, once per crop, once per batch: 6 a tile; 2 batches into #2

    with pytest.raises(Cancelled):
        gen.propose_tiled(image, tile_size=128, halo=32, progress=lambda d, t: seen.append((d, t)), cancel=cancel)
    assert seen[-1] == (24, 64)  # stopped inside the second tile
    with pytest.raises(ValueError, match="halo"):
        gen.propose_tiled(image, tile_size=128, halo=128)


def test_nuclei_crossing_tile_borders_come_out_whole(builtin, one_torch_thread):
    """A real 520 x 696 fluorescence image with the built-in model in 3 x 3 tiles of 256 px: most nuclei that cross
    a tile border come out as one object (IoU > 0.7 with the true nucleus: neither cut in two nor doubled)."""
    import tifffile

    from napari_sam.core.amg import AutomaticMaskGenerator

    d = data_dir("dsb2018_full")
    name = next(p.stem for p in (d / "images").glob("1b518cd2ea84*.png"))
    image, gt = read_image(d / "images" / f"{name}.png")[..., :3], tifffile.imread(d / "labels" / f"{name}.tif")
    gen = AutomaticMaskGenerator.for_model(builtin, points_per_side=8)
    kept = gen.propose_tiled(image, tile_size=256, halo=64)
    whole, crossing = whole_across_tiles(gt, kept.labels(16, **gen.thresholds()))
    assert crossing >= 10 and whole >= 8, (whole, crossing)


def test_kept_proposals_keep_masks_of_the_result_only(tiny_model, nuclei_sample):
    """Re-filtering keeps the full-resolution masks of its result only (and every candidate's box): a threshold
    that once let every candidate through leaves no mask per candidate behind; masks dropped are made again, the
    same, when a later threshold needs them."""
    from napari_sam.core.amg import AutomaticMaskGenerator

    image = nuclei_sample[0]
    p = AutomaticMaskGenerator(tiny_model, points_per_side=6, pred_iou_thresh=0.0,
                               stability_score_thresh=0.0).propose(image)
    loose = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    every = p.filter(**loose)
    few = p.filter(**dict(loose, box_nms_thresh=0.2))
    cached = [m for c in p.crops for m in c._masks.values() if m is not None]
    assert len(cached) == len(few) < len(every) // 4
    assert all(any(m is r["segmentation_patch"] for r in few) for m in cached)
    again = p.filter(**loose)
    assert len(again) == len(every)
    for a, b in zip(again, every):
        assert a["bbox"] == b["bbox"] and np.array_equal(a["segmentation_patch"].patch, b["segmentation_patch"].patch)
