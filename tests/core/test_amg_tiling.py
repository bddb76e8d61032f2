"""Tiling with a halo on a real 603 x 1272 DSB2018 image: with a deterministic segmenter (fixed threshold +
connected components) the tiled result equals the untiled one exactly, objects cut by tile borders included."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label

from conftest import data_dir, read_image
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
