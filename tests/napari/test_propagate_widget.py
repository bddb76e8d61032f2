"""The 3D propagation dock widget on a real GoNuclear crop and its ground-truth nuclei, with a random-weight
model (plumbing): one undo step, other objects' voxels kept, confidence shown, cancel writes nothing."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from conftest import data_dir, read_image  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]
NO_STOP = dict(iou_threshold=0.0, overlap_threshold=0.0, min_area=1, max_regrowth=None, smooth_z=False)
SEED, OTHER = 28, 33  # ground-truth nuclei: 28 annotated on slice 4 only, 33 already on every slice


@pytest.fixture
def scene(make_napari_viewer, qtbot, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path / "cache"))
    from napari_sam._widgets._state import get_state

    d = data_dir("gonuclear_3d_nuclei")
    img = np.ascontiguousarray(read_image(d / "1135_crop_image.tif")[40:48, :96, :96])
    gt = read_image(d / "1135_crop_label.tif")[40:48, :96, :96]
    labels = np.where(gt == OTHER, OTHER, 0).astype(np.uint32)
    labels[4][gt[4] == SEED] = SEED
    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(tiny_model, "random nsam_t")
    viewer.add_image(img, name="stack")
    lay = viewer.add_labels(labels, name="SAM labels")
    lay.selected_label = SEED
    viewer.dims.set_current_step(0, 4)
    dw, widget = viewer.window.add_plugin_dock_widget("napari-sam", "3D propagation")
    qtbot.waitUntil(dw.isVisible, timeout=5000)
    widget.set_layers("stack", "SAM labels")
    widget.views_check.setChecked(False)  # these tests check the slice-by-slice machinery; the views have their own
    return viewer, widget, lay, labels.copy()


def test_current_object_one_undo_step_and_confidence(scene):
    viewer, w, lay, before = scene
    assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
    assert w.wait(120)
    after = np.asarray(lay.data)
    assert (after == SEED).any(axis=(1, 2)).all()  # the nucleus now spans all 8 slices
    assert np.array_equal(after[4], before[4])  # the annotated slice is kept as drawn
    assert np.array_equal(after == OTHER, before == OTHER)  # another object's voxels are never taken
    assert set(np.unique(after)) == {0, SEED, OTHER}
    text = w.confidence_label.text()
    assert text.startswith(f"label {SEED}: z 0–7, lowest") and len(text.splitlines()[1]) == 8  # a bar per slice
    scores = w.last_scores[SEED]
    assert scores[4] == 1.0 and np.isfinite(scores).all()
    assert lay.metadata["sam_confidence"][SEED] == scores.tolist()
    lay.undo()  # ONE step restores everything
    assert np.array_equal(np.asarray(lay.data), before)


def test_all_objects_of_a_slice_and_direction(scene):
    """'All objects' propagates those drawn on this slice alone; OTHER, already on every slice (its ground truth
    here, as a user's corrected slices would be), is left exactly as it is, with a message saying so."""
    viewer, w, lay, before = scene
    notes = []
    w._message = lambda text, level="info", show=w._message: (notes.append(text), show(text, level))
    assert w.propagate(direction="up", scope="all", strategy="point", max_slices=2, **NO_STOP)
    assert w.wait(120)
    assert any(f"[{OTHER}] already span other slices" in n for n in notes)
    after = np.asarray(lay.data)
    assert (after == SEED).any(axis=(1, 2)).tolist() == [False] * 4 + [True] * 3 + [False]
    assert sorted(w.last_scores) == [SEED]
    assert np.array_equal(after[:4], before[:4]) and np.array_equal(after[7], before[7])
    assert np.array_equal(after == OTHER, before == OTHER)
    lay.selected_label = SEED
    assert w.propagate(scope="all") and w.wait(120)  # now both span several slices: nothing to do, it says why
    assert "already spans other slices" in w.status_label.text()
    assert np.array_equal(np.asarray(lay.data), after)


def test_cancel_writes_nothing(scene):
    viewer, w, lay, before = scene
    assert w.propagate(scope="current", strategy="point", **NO_STOP)
    w.cancel()
    assert w.wait(120)
    assert np.array_equal(np.asarray(lay.data), before)
    assert "cancelled" in w.status_label.text()


def test_clear_errors(scene, monkeypatch, tmp_path):
    viewer, w, lay, before = scene
    lay.selected_label = 77
    assert not w.propagate(scope="current")
    assert "label 77 is not on slice 4" in w.status_label.text()
    lay.selected_label = SEED
    assert not w.propagate(scope="current", treshold=1)
    assert "unknown propagation parameter" in w.status_label.text()
    viewer.add_labels(np.zeros((8, 50, 50), np.uint32), name="small")
    w.set_layers("stack", "small")
    assert not w.propagate()
    assert "use a labels layer of the image's shape" in w.status_label.text()
    # no model in the viewer and no built-in model file: a clear message, labels untouched
    from napari_sam._widgets._state import get_state
    from napari_sam.core import build

    monkeypatch.setattr(build, "builtin_checkpoint_path", lambda: tmp_path / "missing.pt")
    get_state(viewer).model = None
    w.set_layers("stack", "SAM labels")
    assert w.propagate(scope="current", strategy="point")
    assert w.wait(60)
    assert "built-in model file" in w.status_label.text() and "missing" in w.status_label.text()
    assert np.array_equal(np.asarray(lay.data), before)


def test_precompute_embeddings_fills_the_disk_cache(scene, tiny_model):
    viewer, w, lay, before = scene
    assert w.precompute()
    assert w.wait(120)
    from napari_sam.core.embedding_store import StackEmbeddings

    emb = StackEmbeddings(np.asarray(viewer.layers["stack"].data), tiny_model)
    assert not emb.in_memory and emb.missing() == []
    assert "0 slice(s) left" in w.status_label.text() and str(emb.path) in w.status_label.text()
    from napari_sam.core.propagation import PropagationParams
    from napari_sam.core.propagation_views import view_embeddings

    p = PropagationParams()
    views = view_embeddings(emb, (1.0, 1.0, 1.0), p.view_step, p.view_denoise)
    assert [len(v.missing()) for v in views] == [48, 48]  # the views' planes were not embedded ...
    w.views_check.setChecked(True)
    assert w.precompute()
    assert w.wait(120)
    views = view_embeddings(StackEmbeddings(np.asarray(viewer.layers["stack"].data), tiny_model), (1.0, 1.0, 1.0),
                            p.view_step, p.view_denoise)
    assert all(not v.in_memory and v.missing() == [] for v in views)  # ... and now are, on disk
    assert "0 slice(s) left (with the orthogonal views' planes)" in w.status_label.text()


def test_correction_repropagates_only_the_affected_range(scene):
    viewer, w, lay, before = scene
    assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
    assert w.wait(120)
    first = np.asarray(lay.data).copy()
    # the user corrects slice 4 of the 3D object (erases its top rows) and propagates again
    fixed = first.copy()
    fixed[4, :10][fixed[4, :10] == SEED] = 0
    lay.data = fixed
    assert w.propagate(direction="both", scope="current", strategy="point", converge_iou=0.5, **NO_STOP)
    assert w.wait(120)
    msg = w.status_label.text()
    assert "re-propagated label 28 from slice 4: only slices 3–5 were affected" in msg
    after = np.asarray(lay.data)
    assert np.array_equal(after[[0, 1, 2, 6, 7]], first[[0, 1, 2, 6, 7]])
    assert np.array_equal(after[4], fixed[4]) and np.array_equal(after == OTHER, before == OTHER)
    assert np.isfinite(w.last_scores[SEED]).all()  # earlier scores kept outside the redone range


def test_time_lapse_tzyx_uses_the_displayed_volume(make_napari_viewer, qtbot, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path / "cache"))
    from napari_sam._widgets._state import get_state

    d = data_dir("gonuclear_3d_nuclei")
    img = read_image(d / "1135_crop_image.tif")[40:46, :64, :64]
    gt = read_image(d / "1135_crop_label.tif")[40:46, :64, :64]
    tzyx = np.ascontiguousarray(np.stack([img[::-1], img]))  # (2, 6, 64, 64)
    labels = np.zeros(tzyx.shape, np.uint32)
    labels[1, 3][gt[3] == SEED] = SEED
    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(tiny_model, "random nsam_t")
    viewer.add_image(tzyx, name="movie")
    lay = viewer.add_labels(labels, name="SAM labels")
    lay.selected_label = SEED
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(1, 3)
    dw, w = viewer.window.add_plugin_dock_widget("napari-sam", "3D propagation")
    w.set_layers("movie", "SAM labels")
    assert w.propagate(direction="both", scope="current", strategy="point", max_slices=1, **NO_STOP)
    assert w.wait(120)
    after = np.asarray(lay.data)
    assert np.array_equal(after[0], labels[0])  # the other time point is untouched
    assert (after[1] == SEED).any(axis=(1, 2)).tolist() == [False, False, True, True, True, False]


def test_object_drawn_on_two_slices_is_filled_between_them(scene):
    viewer, w, lay, before = scene
    d = data_dir("gonuclear_3d_nuclei")
    gt = read_image(d / "1135_crop_label.tif")[40:48, :96, :96]
    drawn = before.copy()
    drawn[1][gt[1] == SEED] = SEED  # the nucleus drawn on slices 1, 4 and 6
    drawn[6][gt[6] == SEED] = SEED
    lay.data = drawn
    assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
    assert w.wait(120)
    after = np.asarray(lay.data)
    assert (after == SEED).any(axis=(1, 2)).all()
    for z in (1, 4, 6):  # the drawn slices are kept as drawn
        assert np.array_equal(after[z], drawn[z])
    assert np.array_equal(after == OTHER, before == OTHER)
    assert "propagated 1 object(s)" in w.status_label.text()


def test_the_widget_job_finishes_objects_like_propagate_masks(tmp_path, monkeypatch):
    """The widget's thread job applies the default rules (z smoothing; the regrowth stop when asked) exactly as
    propagate_masks does: the built-in model on GoNuclear crop 1135, every nucleus of slice 50."""
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path / "cache"))
    from napari_sam._widgets.propagate import run_propagation
    from napari_sam.core.build import load_model
    from napari_sam.core.embedding_store import StackEmbeddings
    from napari_sam.core.propagation import (
        finish_slices, fuse_views, iter_propagate_masks, make_params, propagate_masks,
    )
    from napari_sam.core.propagation_labels import plan_write, seeds_from_labels

    d = data_dir("gonuclear_3d_nuclei")
    img = read_image(d / "1135_crop_image.tif")[30:70]
    gt = read_image(d / "1135_crop_label.tif")[30:70]
    labels = np.zeros_like(gt)
    labels[20] = gt[20]
    model = load_model(device="cpu")
    params = {"strategy": "point_raw", "max_regrowth": 0.5}
    out = run_propagation(img, labels, 20, None, model, params, lambda: False, lambda *a: None)
    ids, seeds = seeds_from_labels(labels, 20)
    ref, ref_scores = propagate_masks(img, seeds, model, **params)
    assert len(ids) >= 5 and out["ids"] == ids
    # the write plan is exactly the one made on full (Y, X) masks by the core's full-mask functions
    emb = StackEmbeddings(img, model)  # (cached by the job)
    p = make_params(params)
    slices, scores = [{} for _ in ids], np.full((len(ids), img.shape[0]), np.nan, np.float32)
    scores[:, 20] = 1.0
    for i, z, m, sc in iter_propagate_masks(img, seeds, embeddings=emb, **params):
        slices[i][z], scores[i, z] = m, sc
    slices = [finish_slices(seeds[i], obj, scores[i]) for i, obj in enumerate(slices)]
    index, values = plan_write(labels, ids, dict(enumerate(fuse_views(emb, seeds, slices, scores, p))))
    (zz, rr, cc), old, new = out["plan"]
    assert all(np.array_equal(a, b) for a, b in zip((zz, rr, cc), index)) and np.array_equal(new, values)
    assert np.array_equal(old, labels[index]) and values.size > 1000 and not out.get("skipped")
    assert np.array_equal(out["scores"], scores, equal_nan=True)
    for i in range(len(ids)):
        zs = sorted(out["results"][i])
        assert zs == [z for z in np.flatnonzero((ref == i + 1).any(axis=(1, 2))) if z != 20]
        assert np.array_equal(np.isfinite(out["scores"][i]), np.isfinite(ref_scores[i]))
        for z in zs:  # the same masks (where objects overlap, propagate_masks gives the voxel to the first one)
            assert not ((ref[z] == i + 1) & ~_full(out["results"][i][z], ref.shape[1:])).any()
    assert any(out["results"][i] for i in range(len(ids)))  # something was propagated


def test_orthogonal_views_use_the_layer_scale_and_stay_off_for_time(scene, tiny_model):
    """With "orthogonal views" checked the widget propagates exactly as propagate_masks with the image layer's
    scale as voxel size (one undo step); a stack whose first axis is labelled t starts with the views off."""
    from napari_sam.core.propagation import propagate_masks
    from napari_sam.core.propagation_labels import seeds_from_labels

    viewer, w, lay, before = scene
    for layer in (viewer.layers["stack"], lay):
        layer.scale = (2.5, 1.0, 1.0)
    viewer.dims.set_point(0, 4 * 2.5)  # world z of slice 4
    w.views_check.setChecked(True)
    assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
    assert w.wait(120)
    after = np.asarray(lay.data)
    _, seeds = seeds_from_labels(before, 4, [SEED])
    ref, _ = propagate_masks(viewer.layers["stack"].data, seeds, tiny_model, strategy="point", spacing=(2.5, 1, 1),
                             **NO_STOP)
    assert np.array_equal(after == SEED, (ref == 1) & (before != OTHER) | (before == SEED))
    import zarr

    from napari_sam.core.embedding_store import embeddings_dir

    shapes = sorted(tuple(zarr.open_group(str(d), mode="r").attrs["shape"]) for d in embeddings_dir().iterdir())
    assert shapes == [(8, 96, 96), (48, 20, 96), (48, 20, 96)]  # the stack and its two views: z 8 -> 20 rows
    lay.undo()
    assert np.array_equal(np.asarray(lay.data), before)
    viewer.dims.axis_labels = ("t", "y", "x")
    w.image_combo.currentTextChanged.emit("stack")
    assert not w.views_check.isChecked()


def test_voxels_painted_while_it_runs_are_kept(scene, monkeypatch):
    """The worker plans the write against the labels as they were at the start; voxels changed after the plan
    (simulated here at the end of the worker, by a write no paint event reports) keep their values, the rest of
    the result is written, and a message says how many were kept."""
    import napari_sam._widgets.propagate as prop

    viewer, w, lay, before = scene
    real, painted = prop.run_propagation, {}

    def painting(*args, **kwargs):
        out = real(*args, **kwargs)
        (zz, rr, cc), old, new = out["plan"]
        pick = np.flatnonzero(new == SEED)[:5]
        painted["at"] = (zz[pick], rr[pick], cc[pick])
        lay.data[painted["at"]] = 99  # the user paints over voxels the result is about to take
        return out

    monkeypatch.setattr(prop, "run_propagation", painting)
    notes = []
    w._message = lambda text, level="info", show=w._message: (notes.append(text), show(text, level))
    assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
    assert w.wait(120)
    after = np.asarray(lay.data)
    assert len(painted["at"][0]) == 5 and np.all(after[painted["at"]] == 99)
    assert (after == SEED).sum() > (before == SEED).sum()  # the rest was written
    assert any("5 voxel(s) painted while propagating were kept" in n for n in notes)


def test_views_choice_is_kept_until_another_image_is_chosen(scene, tiny_model):
    """The user's "orthogonal views" choice survives layers being added, removed or renamed; choosing another
    stack gives that stack's default again."""
    viewer, w, lay, before = scene
    assert not w.views_check.isChecked()  # the user's choice (the fixture unchecks the default)
    points = viewer.add_points(np.zeros((0, 3)), name="some points")
    viewer.add_labels(np.zeros_like(before), name="more labels")
    viewer.layers.remove(points)
    viewer.layers["stack"].name = "nuclei 3D"
    assert not w.views_check.isChecked() and w.image_combo.currentText() == "nuclei 3D"
    viewer.add_image(np.asarray(viewer.layers["nuclei 3D"].data)[:, ::-1], name="flipped")
    w.set_layers("flipped", "SAM labels")
    assert w.views_check.isChecked()
    w.views_check.setChecked(False)
    viewer.layers.remove("nuclei 3D")  # not the chosen image: the choice is kept
    assert not w.views_check.isChecked() and w.image_combo.currentText() == "flipped"


def test_renamed_layers_stay_chosen_and_propagate(scene):
    """Renaming the stack and the labels renames them in the lists, keeps them chosen, and propagation runs on
    them; a layer gone behind the widget's back is a clear message."""
    viewer, w, lay, before = scene
    viewer.add_labels(np.zeros_like(before), name="other labels")
    viewer.layers["stack"].name = "nuclei 3D"
    lay.name = "my nuclei"
    assert [w.image_combo.itemText(i) for i in range(w.image_combo.count())] == ["nuclei 3D"]
    assert w.image_combo.currentText() == "nuclei 3D" and w.labels_combo.currentText() == "my nuclei"
    assert w.propagate(direction="up", scope="current", strategy="point", max_slices=1, **NO_STOP)
    assert w.wait(120)
    assert "propagated 1 object(s) from slice 4" in w.status_label.text()
    assert (np.asarray(lay.data) == SEED).any(axis=(1, 2)).tolist() == [False] * 4 + [True] * 2 + [False] * 2
    lay.events.name.disconnect(w._renames._on_name)  # as if renamed where the widget could not see it
    lay.name = "renamed unseen"
    assert not w.propagate(scope="current")
    assert w.status_label.text() == ("the labels layer 'my nuclei' is no longer in the viewer (removed or renamed); "
                                     "choose the labels again")
    assert w.labels_combo.currentText() == "renamed unseen"  # the lists were refreshed


def test_precompute_checks_the_image_like_propagate(scene, tmp_path):
    """An RGB stack is refused before anything is embedded, with the message Propagate gives; a grayscale stack
    is embedded without any labels layer."""
    viewer, w, lay, before = scene
    stack = np.asarray(viewer.layers["stack"].data)
    viewer.add_image(np.stack([stack] * 3, axis=-1), name="rgb stack", rgb=True)
    w.set_layers("rgb stack", "SAM labels")
    assert not w.propagate()
    expected = w.status_label.text()
    assert expected == "image 'rgb stack' is RGB; propagation needs a grayscale (Z, Y, X) stack"
    assert not w.precompute() and not w.busy() and w.status_label.text() == expected
    assert not (tmp_path / "cache").exists()  # nothing was embedded
    viewer.add_image(np.stack([stack[0]] * 2, axis=-1), name="two channels")  # (Y, X, 2): not a stack
    w.set_layers("two channels", "SAM labels")
    assert not w.propagate() and not w.precompute() and not w.busy()
    assert "its last axis looks like channels" in w.status_label.text()
    viewer.layers.remove(lay)
    w.set_layers("stack", "")
    assert w.precompute() and w.wait(120)
    assert "embedding done: 0 slice(s) left" in w.status_label.text()


def test_closing_the_dock_stops_the_propagation_and_writes_nothing(scene, monkeypatch):
    """napari's close button only takes the widget out of its dock: the propagation going on is cancelled and its
    result never written."""
    import threading

    import napari_sam._widgets.propagate as prop

    viewer, w, lay, before = scene
    gate, real = threading.Event(), prop.run_propagation

    def gated(*a, **k):
        assert gate.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(prop, "run_propagation", gated)
    try:
        assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
        viewer.window.remove_dock_widget(w)
    finally:
        gate.set()
    assert w.wait(120)
    assert np.array_equal(np.asarray(lay.data), before) and not lay._undo_history
    assert "nothing was written" in w.status_label.text()


def _full(mask, shape):
    """A result slice as a full (Y, X) bool mask: a patch (row0, col0, bool) pasted, or a full mask as it is."""
    if isinstance(mask, tuple):
        r0, c0, m = mask
        out = np.zeros(shape, bool)
        out[r0: r0 + m.shape[0], c0: c0 + m.shape[1]] = m
        return out
    return np.asarray(mask, bool)


def _gate(monkeypatch):
    """The widget's job stops after propagating (the labels were read, the write is not planned yet) until
    ``go`` is set: (ready, go, got) with got["out"] the propagation's result."""
    import threading

    import napari_sam._widgets.propagate as prop

    ready, go, got, real = threading.Event(), threading.Event(), {}, prop.propagate_objects

    def gated(*args, **kwargs):
        got["out"] = real(*args, **kwargs)
        ready.set()
        assert go.wait(60)
        return got["out"]

    monkeypatch.setattr(prop, "propagate_objects", gated)
    return ready, go, got


def _noting(w):
    notes = []
    w._message = lambda text, level="info", show=w._message: (notes.append(text), show(text, level))
    return notes


def test_paint_erase_and_fill_while_it_runs_survive_and_one_undo_restores(scene, monkeypatch, qtbot):
    """While the job runs the user erases part of another nucleus where the result lies, paints a new label and
    fills background with another, with napari's own tools: the labels end exactly as the result planned against
    the labels at the start, with every voxel the user changed as the user left it; ONE undo gives back exactly the
    labels the user left. (An erase is what a copy taken when the results arrive gets wrong: it would see
    background there and write the object over it.)"""
    from napari_sam.core.propagation_labels import plan_write

    viewer, w, lay, before = scene
    ready, go, got = _gate(monkeypatch)
    notes = _noting(w)
    try:
        assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
        qtbot.waitUntil(ready.is_set, timeout=120_000)
        res = {z: _full(m, before.shape[1:]) for z, m in got["out"]["results"][0].items()}
        assert {3, 5, 6} <= set(res)
        lay.brush_size = 5
        r, c = np.argwhere((before[5] == OTHER) & res[5])[0]
        lay.paint((5, r, c), 0)  # the eraser, on the other nucleus
        r, c = np.argwhere((before[3] == 0) & res[3])[0]
        lay.paint((3, r, c), 99)  # the brush, a new label
        r, c = np.argwhere((before[6] == 0) & res[6])[0]
        lay.fill((6, r, c), 77)  # the bucket, on background
        edited = np.array(lay.data)
    finally:
        go.set()
    assert w.wait(120)
    user = edited != before
    assert user[5].any() and (edited[5][user[5]] == 0).all() and (before[5][user[5]] == OTHER).any()
    assert (edited[3][user[3]] == 99).all() and (edited[6][user[6]] == 77).all()
    (zz, rr, cc), values = plan_write(before, [SEED], {0: res})
    want = before.copy()
    want[zz, rr, cc] = values
    want[user] = edited[user]
    after = np.asarray(lay.data)
    assert np.array_equal(after, want)
    assert (after == SEED).sum() > (before == SEED).sum() + 1000  # the rest was written
    assert any("painted while propagating were kept as painted" in n for n in notes)
    lay.undo()
    assert np.array_equal(np.asarray(lay.data), edited)


def test_a_change_napari_does_not_report_leaves_its_slice_as_it_is(scene, monkeypatch, qtbot):
    """An undo while the job runs changes the labels without a paint event: the slice it changed is left exactly
    as it is (with a message naming it), every other slice gets the result planned against the start."""
    from napari_sam.core.propagation_labels import plan_write

    viewer, w, lay, before = scene
    lay.brush_size = 9
    lay.paint((5, 60, 60), 44)  # drawn before the run ...
    drawn = np.array(lay.data)
    ready, go, got = _gate(monkeypatch)
    notes = _noting(w)
    try:
        assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
        qtbot.waitUntil(ready.is_set, timeout=120_000)
        lay.undo()  # ... and undone while it runs
    finally:
        go.set()
    assert w.wait(120)
    res = {z: _full(m, before.shape[1:]) for z, m in got["out"]["results"][0].items()}
    (zz, rr, cc), values = plan_write(drawn, [SEED], {0: res})
    want = drawn.copy()
    want[zz, rr, cc] = values
    want[5] = before[5]
    after = np.asarray(lay.data)
    assert (want[5] != drawn[5]).any() and (want != before).sum() > 1000
    assert np.array_equal(after, want)
    assert any(n.startswith("slice(s) [5] changed while propagating") for n in notes)
    lay.undo()
    assert np.array_equal(np.asarray(lay.data), before)


def test_labels_replaced_while_it_runs_get_nothing(scene, monkeypatch, qtbot):
    viewer, w, lay, before = scene
    ready, go, got = _gate(monkeypatch)
    try:
        assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
        qtbot.waitUntil(ready.is_set, timeout=120_000)
        lay.data = before.copy()  # e.g. a labels file opened into the layer
    finally:
        go.set()
    assert w.wait(120)
    assert np.array_equal(np.asarray(lay.data), before) and not lay._undo_history
    assert w.status_label.text().startswith("the labels layer's data was replaced while propagating; nothing")


def test_the_edit_log_gives_back_each_slice_as_it_was():
    """EditLog.restore with napari's own history atoms (brush, eraser, a 3D brush, bucket fill, data_setitem), on
    real labels of a (T, Z, Y, X) layer: each slice of the propagated time point comes back exactly as it was
    before the edits, or before the edits from a given one on; edits of the other time point are left out."""
    from napari_sam._widgets.propagate import EditLog

    gt = read_image(data_dir("gonuclear_3d_nuclei") / "1135_crop_label.tif").astype(np.int32)
    start = np.stack([gt[44:48, :96, :96], gt[40:44, :96, :96]])  # (2, 4, 96, 96)
    lay = napari.layers.Labels(start.copy())
    log = EditLog(lead=(1,))
    lay.events.paint.connect(log.on_paint)
    lay.brush_size = 9
    lay.paint((1, 2, 30, 30), 9)
    lay.paint((1, 2, 33, 34), 0)  # erases part of the paint just made
    mid, since = np.array(lay.data), len(log)
    lay.n_edit_dimensions = 3
    inside = np.argwhere((start[1, 1:4] > 0).all(axis=0))
    lay.paint((1, 2, *inside[len(inside) // 2]), 0)  # a 3D eraser on nuclei: slices 1-3
    lay.n_edit_dimensions = 2
    obj = np.argwhere(start[1, 3] > 0)[0]
    lay.fill((1, 3, *obj), 12)
    lay.paint((0, 2, 30, 30), 5)  # the other time point
    lay.data_setitem((np.array([1, 1, 0]), np.array([0, 2, 2]), np.array([5, 6, 7]), np.array([8, 9, 10])),
                     np.array([31, 32, 33]))
    now = np.asarray(lay.data)
    assert all((now[1, z] != start[1, z]).any() for z in range(4)) and (now[0] != start[0]).any()
    for z in range(4):
        assert np.array_equal(log.restore(np.array(now[1, z]), z), start[1, z])
        assert np.array_equal(log.restore(np.array(now[1, z]), z, since), mid[1, z])


def test_labels_widened_while_it_runs_still_get_the_result(scene, monkeypatch, qtbot):
    """The annotator commits an id over 255 into a uint8 labels layer while the job runs: the layer is widened
    (``_layers.upgrade_dtype``, data replaced by a wider copy with every value kept). That is not new data: the
    result is written, the committed object is kept, and one undo removes the result only."""
    from napari_sam._widgets import _layers as L
    from napari_sam.core.propagation_labels import plan_write

    viewer, w, lay, before = scene
    lay.data = before.astype(np.uint8)
    ready, go, got = _gate(monkeypatch)
    notes = _noting(w)
    try:
        assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
        qtbot.waitUntil(ready.is_set, timeout=120_000)
        L.upgrade_dtype(lay, np.uint16)  # as the annotator's Commit does for id 300
        lay.brush_size = 5
        lay.paint((2, 70, 20), 300)
        edited = np.array(lay.data)
    finally:
        go.set()
    assert w.wait(120)
    assert not any("replaced" in n for n in notes)
    res = {z: _full(m, before.shape[1:]) for z, m in got["out"]["results"][0].items()}
    (zz, rr, cc), values = plan_write(before, [SEED], {0: res})
    want = before.astype(np.uint16)
    want[zz, rr, cc] = values
    user = edited != before
    want[user] = edited[user]
    after = np.asarray(lay.data)
    assert after.dtype == np.uint16 and np.array_equal(after, want)
    assert (after == SEED).sum() > (before == SEED).sum() + 1000
    lay.undo()
    assert np.array_equal(np.asarray(lay.data), edited)


def test_a_stroke_in_progress_when_it_ends_is_waited_for(scene, monkeypatch, qtbot):
    """The job ends while the user's brush is down (napari reports a stroke's pixels only on release): the write
    waits for the release, then the slice the stroke was on gets its result too (the worker could not tell its start
    while the stroke was unreported), the stroke's pixels are kept, and the stroke and the result are one undo step
    each."""
    from napari_sam.core.propagation_labels import plan_write

    viewer, w, lay, before = scene
    ready, go, got = _gate(monkeypatch)
    notes = _noting(w)
    try:
        assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
        qtbot.waitUntil(ready.is_set, timeout=120_000)
        lay.brush_size = 3
        lay._begin_stroke()  # the mouse pressed, as napari's brush does
        lay.paint((5, 2, 2), 99, refresh=False)
    finally:
        go.set()
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)
    assert w.busy() and np.array_equal(np.asarray(lay.data)[lay.data != 99], before[lay.data != 99])
    lay.paint((5, 4, 4), 99, refresh=False)
    lay._commit_stroke()  # the mouse released
    edited = np.array(lay.data)
    assert w.wait(30)
    assert not any("changed while propagating" in n for n in notes)
    res = {z: _full(m, before.shape[1:]) for z, m in got["out"]["results"][0].items()}
    assert 5 in res and res[5].any()
    (zz, rr, cc), values = plan_write(before, [SEED], {0: res})
    want = before.copy()
    want[zz, rr, cc] = values
    user = edited != before
    want[user] = edited[user]
    assert np.array_equal(np.asarray(lay.data), want)
    lay.undo()  # the result
    assert np.array_equal(np.asarray(lay.data), edited)
    lay.undo()  # the whole stroke
    assert np.array_equal(np.asarray(lay.data), before)


def test_a_stroke_released_after_the_plan_but_before_the_write_loses_nothing(scene, monkeypatch, qtbot):
    """The worker plans while the user's brush is down on slice 5 (the stroke not yet reported: the slice is left
    out of the plan), and the stroke ends before the result reaches the viewer: slice 5 is planned again there, so
    it gets its result, and the stroke's pixels are kept."""
    import threading

    import napari_sam._widgets.propagate as prop
    from napari_sam.core.propagation_labels import plan_write

    viewer, w, lay, before = scene
    ready, go, got = _gate(monkeypatch)
    planned, real = threading.Event(), prop.plan_from_start

    def plan(*a, **k):
        out = real(*a, **k)
        if threading.current_thread() is not threading.main_thread():
            planned.set()
        return out

    monkeypatch.setattr(prop, "plan_from_start", plan)
    notes = _noting(w)
    assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
    qtbot.waitUntil(ready.is_set, timeout=120_000)
    lay.brush_size = 3
    lay._begin_stroke()
    lay.paint((5, 2, 2), 99, refresh=False)
    go.set()
    assert planned.wait(60)
    lay._commit_stroke()  # released before the viewer took the result
    edited = np.array(lay.data)
    assert w.wait(60)
    assert not any("changed while propagating" in n for n in notes)
    res = {z: _full(m, before.shape[1:]) for z, m in got["out"]["results"][0].items()}
    (zz, rr, cc), values = plan_write(before, [SEED], {0: res})
    want = before.copy()
    want[zz, rr, cc] = values
    user = edited != before
    want[user] = edited[user]
    assert res[5].any() and np.array_equal(np.asarray(lay.data), want)


def test_labels_widened_through_another_widgets_proxy_still_get_the_result(scene, monkeypatch, qtbot):
    """Segment everything widens its target through the layer napari's plugin proxy hands it: that too is a widened
    dtype, not new data, so a propagation running on the same layer still writes."""
    from napari_sam._widgets import _layers as L

    viewer, w, lay, before = scene
    lay.data = before.astype(np.uint8)
    _, ev = viewer.window.add_plugin_dock_widget("napari-sam", "Segment everything")
    proxied = ev.viewer.layers["SAM labels"]
    assert proxied is not lay  # (the proxy)
    ready, go, got = _gate(monkeypatch)
    notes = _noting(w)
    try:
        assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
        qtbot.waitUntil(ready.is_set, timeout=120_000)
        L.upgrade_dtype(proxied, np.uint16)
    finally:
        go.set()
    assert w.wait(120)
    assert not any("replaced" in n for n in notes)
    assert lay.data.dtype == np.uint16 and (np.asarray(lay.data) == SEED).sum() > (before == SEED).sum() + 1000


def test_propagate_waits_for_a_stroke_under_way(scene):
    """napari's encircle-and-fill stroke stays open across clicks: Propagate pressed meanwhile is refused with a
    message (its pixels are not reported yet, so the run could not tell them from its result); after it, it runs."""
    viewer, w, lay, before = scene
    notes = _noting(w)
    lay._begin_stroke()
    lay.paint((5, 2, 2), 99, refresh=False)
    assert not w.propagate(direction="both", scope="current", strategy="point", **NO_STOP)
    assert "finish it first" in notes[-1] and not w.busy()
    lay._commit_stroke()
    assert w.propagate(direction="both", scope="current", strategy="point", **NO_STOP) and w.wait(120)
    assert (np.asarray(lay.data) == SEED).sum() > (before == SEED).sum() + 1000
