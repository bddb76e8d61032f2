"""The segment-everything widget on a plane larger than LARGE_PLANE: it runs the model tile by tile as
``napari_sam.segment_everything`` does and writes exactly its result; slider moves re-filter and re-stitch the kept
outputs of every tile without the model; cancel during a tiled run writes nothing; on real nuclei with the built-in
model, nuclei crossing a tile border come out whole. The tiling is made small (module constants) so that a real
256 px or 520 x 696 px DSB2018 image is tiled and the tests take seconds."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]
# random weights predict IoUs near 0, so thresholds at 0 make every candidate count (plumbing only)
OPEN = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
            min_object_area=0)


def _tile_small(monkeypatch, large_plane, tile_size, halo):
    import napari_sam._widgets.everything as ev

    # (raising=False: on a widget without tile constants the test runs and fails on its result)
    monkeypatch.setattr(ev, "LARGE_PLANE", large_plane)
    monkeypatch.setattr(ev, "TILE_SIZE", tile_size, raising=False)
    monkeypatch.setattr(ev, "TILE_HALO", halo, raising=False)
    return dict(max_untiled=large_plane, tile_size=tile_size, halo=halo)


def _widget(make_napari_viewer, qtbot, model, image, name="plane"):
    from napari_sam._widgets._state import get_state

    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(model, "test model")
    viewer.add_image(image, name=name)
    dw, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment everything")
    qtbot.waitUntil(dw.isVisible, timeout=5000)
    widget.set_image_layer(name)
    return viewer, widget


def _api(w, image, model, tiling, points_per_side):
    """napari_sam.segment_everything with the widget's settings and thresholds, tiled as the widget tiles."""
    from napari_sam import segment_everything

    th = w.thresholds()
    return segment_everything(image, model, points_per_side=points_per_side, crop_n_layers=w.crop_spin.value(),
                              min_mask_region_area=w.min_region_spin.value(),
                              resolve_parts=w.parts_check.isChecked(), rescore=w.rescore_check.isChecked(),
                              pred_iou_thresh=th["pred_iou_thresh"],
                              stability_score_thresh=th["stability_score_thresh"],
                              box_nms_thresh=th["box_nms_thresh"], min_object_area=int(th["min_object_area"]),
                              **tiling)


@pytest.fixture(scope="module")
def builtin():
    from napari_sam.core.build import builtin_checkpoint_path, load_model

    if not builtin_checkpoint_path().is_file():
        pytest.skip(f"the built-in model {builtin_checkpoint_path()} does not exist")
    return load_model(device="cpu")


def test_a_large_plane_is_tiled_as_the_api_tiles_it_and_refilters_live(make_napari_viewer, qtbot, builtin,
                                                                       nuclei_sample, monkeypatch):
    """The built-in model (its recommended settings: rescoring, parts resolved) on a real 256 px fluorescence
    image tiled in 4 tiles of 128 px: the widget writes exactly the API's tiled result (which finds more nuclei
    than the untiled one), progress counts the points of all tiles, and a slider move re-filters the kept outputs
    of every tile without the model to exactly the API's result at the new thresholds, in one undo step."""
    from napari_sam.core.amg import AutomaticMaskGenerator

    image = nuclei_sample[0]
    tiling = _tile_small(monkeypatch, large_plane=200, tile_size=128, halo=32)  # 4 tiles
    viewer, w = _widget(make_napari_viewer, qtbot, builtin, image)
    assert w.rescore_check.isChecked() and w.parts_check.isChecked()  # (the model's recommended settings)
    seen = []
    w._relay.progressed.connect(lambda d, t: seen.append((d, t)))
    assert w.run(points_per_side=8)
    told = w.status_label.text()
    assert w.wait(120)
    out = viewer.layers["SAM everything"]
    first = np.asarray(out.data).copy()
    expected = _api(w, image, builtin, tiling, 8)
    assert np.array_equal(first, expected)
    assert "segmented in 4 tiles of 128 px" in told and "in 4 tiles;" in w.status_label.text()
    untiled = _api(w, image, builtin, dict(max_untiled=2048), 8)
    assert first.max() > untiled.max() >= 5  # (tiles of 128 px find the small nuclei the whole plane misses)
    # progress counts the points of all tiles
    assert seen and seen[-1] == (4 * 64, 4 * 64) and max(d for d, _ in seen) == 4 * 64

    def no_model(*a, **k):
        raise AssertionError("the model ran again")

    with monkeypatch.context() as m:
        m.setattr(AutomaticMaskGenerator, "propose", no_model)
        m.setattr(w.generator.predictor, "predict_torch", no_model)
        w.sliders["pred_iou_thresh"].setValue(0.8)  # slider moves: re-filtered and re-stitched in a worker
        w.sliders["min_object_area"].setValue(60)
        assert w.wait(60)
    second = np.asarray(out.data).copy()
    assert np.array_equal(second, _api(w, image, builtin, tiling, 8))
    assert 0 < second.max() < first.max()
    assert "re-filtered" in w.status_label.text()
    out.undo()  # one undo step
    assert np.array_equal(np.asarray(out.data), first)


def test_cancel_during_a_tiled_run_writes_nothing(make_napari_viewer, qtbot, tiny_model, nuclei_sample,
                                                  monkeypatch):
    """Cancel pressed while the second tile is being segmented: the run stops there (the third tile never starts)
    and nothing is written."""
    from napari_sam.core.amg import AutomaticMaskGenerator

    _tile_small(monkeypatch, large_plane=200, tile_size=128, halo=32)
    viewer, w = _widget(make_napari_viewer, qtbot, tiny_model, nuclei_sample[0])
    calls, real = [], AutomaticMaskGenerator.propose

    def propose(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            w.cancel()  # (thread-safe: a flag the model's loop polls)
        return real(self, *a, **k)

    monkeypatch.setattr(AutomaticMaskGenerator, "propose", propose)
    assert w.run(**OPEN)
    assert w.wait(120)
    assert len(calls) == 2  # stopped inside the second tile
    assert "cancelled" in w.status_label.text() and "SAM everything" not in viewer.layers
    assert w.proposals is None


def test_nuclei_crossing_tile_borders_come_out_whole(make_napari_viewer, qtbot, builtin, monkeypatch):
    """A real 520 x 696 fluorescence image (DSB2018 test split) with the built-in model and its recommended
    settings, in 3 x 3 tiles of 256 px: the widget writes the API's tiled result, and the nuclei that cross a
    tile border and are found come out as one object each (not cut in two at the border)."""
    import tifffile

    from conftest import data_dir, read_image, whole_across_tiles

    d = data_dir("dsb2018_full")
    iid = "1b518cd2ea84"
    name = next(p.stem for p in (d / "images").glob(f"{iid}*.png"))
    image, gt = read_image(d / "images" / f"{name}.png")[..., :3], tifffile.imread(d / "labels" / f"{name}.tif")
    tiling = _tile_small(monkeypatch, large_plane=512, tile_size=256, halo=64)
    viewer, w = _widget(make_napari_viewer, qtbot, builtin, image)
    assert w.run(points_per_side=8)
    told = w.status_label.text()
    assert w.wait(300)
    out = np.asarray(viewer.layers["SAM everything"].data)
    assert np.array_equal(out, _api(w, image, builtin, tiling, 8))
    assert "segmented in 9 tiles" in told
    whole, crossing = whole_across_tiles(gt, out)
    assert crossing >= 10 and whole >= 8, (whole, crossing)


def test_a_slider_move_stops_a_stale_refilter_between_tiles(make_napari_viewer, qtbot, builtin, nuclei_sample,
                                                            monkeypatch):
    """A slider moved while the previous move's re-filter is in its second of 4 tiles: that stale re-filter stops
    there (its last two tiles are never filtered), and the newest thresholds give exactly the API's result."""
    import threading

    image = nuclei_sample[0]
    tiling = _tile_small(monkeypatch, large_plane=200, tile_size=128, halo=32)  # 4 tiles
    viewer, w = _widget(make_napari_viewer, qtbot, builtin, image)
    assert w.run(points_per_side=8)
    assert w.wait(120)
    tiles = w.proposals.tiles
    assert len(tiles) == 4
    calls, entered, release = [], threading.Event(), threading.Event()

    def watch(k, method):
        def filtered(*a, **kw):  # a tile being re-filtered (in the worker)
            calls.append((k, round(kw["pred_iou_thresh"], 3)))
            if k == 1 and calls[-1][1] == 0.8 and not release.is_set():
                entered.set()
                release.wait(60)  # held in the second tile until the slider has moved again
            return method(*a, **kw)
        return filtered

    for k, p in enumerate(tiles):  # (the per-tile call: objects here, labels before the re-filter kept objects)
        for name in ("objects", "labels"):
            if hasattr(p, name):
                monkeypatch.setattr(p, name, watch(k, getattr(p, name)))
    w.sliders["pred_iou_thresh"].setValue(0.8)
    qtbot.waitUntil(entered.is_set, timeout=30000)
    w.sliders["pred_iou_thresh"].setValue(0.7)  # the newest value, while the re-filter at 0.8 is held
    w.sliders["min_object_area"].setValue(40)
    qtbot.waitUntil(lambda: not w._timer.isActive(), timeout=5000)  # (the move has been taken in: 60 ms)
    release.set()
    assert w.wait(60)
    stale = [k for k, t in calls if t == 0.8]
    assert stale == [0, 1]  # stopped before its third tile
    assert sorted(k for k, t in calls if t == 0.7) == [0, 1, 2, 3]
    out = np.asarray(viewer.layers["SAM everything"].data)
    assert w.thresholds()["pred_iou_thresh"] == pytest.approx(0.7)
    assert np.array_equal(out, _api(w, image, builtin, tiling, 8))
    assert "re-filtered" in w.status_label.text()
