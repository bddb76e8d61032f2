"""The segment-everything dock widget on a real DSB2018 image with a random-weight model (plumbing): results equal
the core pipeline, thresholds re-filter kept outputs without the model, one undo step per write, a user's labels
are never overwritten silently, cancel writes nothing, bad parameters give a clear message."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

pytestmark = pytest.mark.gui
# random weights predict IoUs near 0, so thresholds at 0 make every candidate count (plumbing only)
OPEN = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
            min_object_area=0)


@pytest.fixture
def scene(make_napari_viewer, qtbot, tiny_model, nuclei_sample):
    from napari_sam._widgets._state import get_state

    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(tiny_model, "random nsam_t")
    viewer.add_image(nuclei_sample[0], name="nuclei")
    dw, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment everything")
    qtbot.waitUntil(dw.isVisible, timeout=5000)
    widget.set_image_layer("nuclei")
    return viewer, widget


def _core(widget):
    from napari_sam.core.labels import records_to_labels

    th = widget.thresholds()
    recs = widget.proposals.filter(pred_iou_thresh=th["pred_iou_thresh"],
                                   stability_score_thresh=th["stability_score_thresh"],
                                   box_nms_thresh=th["box_nms_thresh"],
                                   resolve_parts=widget.parts_check.isChecked(),
                                   rescore=widget.rescore_check.isChecked())
    return records_to_labels(recs, widget.proposals.image_shape, int(th["min_object_area"]))


def test_run_live_thresholds_and_undo(scene, monkeypatch):
    viewer, w = scene
    assert w.run(**OPEN)
    assert w.wait(120)
    out = viewer.layers["SAM everything"]
    first = np.asarray(out.data).copy()
    assert first.shape == viewer.layers["nuclei"].data.shape
    assert first.max() >= 1
    assert np.array_equal(first > 0, _core(w) > 0)

    def no_model(*a, **k):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(w.generator.predictor, "predict_torch", no_model)
    monkeypatch.setattr(w.generator.predictor, "set_image", no_model)
    w.set_thresholds(box_nms_thresh=0.3, min_object_area=50)  # re-filter from kept outputs only
    second = np.asarray(out.data).copy()
    expected = _core(w)
    assert np.array_equal(second > 0, expected > 0)
    assert len(np.unique(second)) == len(np.unique(expected))
    assert not np.array_equal(first, second)
    out.undo()  # each write is one undo step
    assert np.array_equal(np.asarray(out.data), first)
    w.set_thresholds(box_nms_thresh=1.0, min_object_area=0)  # (the first run's: nested masks overlap)
    w.parts_check.setChecked(True)  # parts / merges resolved: live too, from the kept outputs
    w.refilter()
    resolved = np.asarray(out.data).copy()
    assert np.array_equal(resolved, _core(w)) and not np.array_equal(resolved, first)
    out.undo()
    assert np.array_equal(np.asarray(out.data), first)


def test_quality_score_switches_live(scene, tiny_model, monkeypatch):
    """The learned quality score (rescore) is a live switch: it re-filters the kept outputs with it; with a
    model that has no scorer it says so and changes nothing."""
    from napari_sam.core.amg_quality import candidate_scorer

    viewer, w = scene
    assert not w.rescore_check.isChecked()  # the random model recommends nothing
    assert w.run(**OPEN)
    assert w.wait(120)
    out = viewer.layers["SAM everything"]
    first = np.asarray(out.data).copy()
    w.rescore_check.setChecked(True)
    assert w.refilter() == 0 and "rescore needs a candidate scorer" in w.status_label.text()
    assert np.array_equal(np.asarray(out.data), first)
    w.rescore_check.setChecked(False)
    # the built-in model's scorer on the random model, judging every candidate (random IoUs are near 0)
    state = candidate_scorer(None).state()
    monkeypatch.setattr(tiny_model, "checkpoint_meta", {"amg_quality": {**state, "floors": {
        k: 0.0 for k in state["floors"]}}}, raising=False)
    viewer.layers.remove(out)
    assert w.run(**OPEN)
    assert w.wait(120)
    out = viewer.layers["SAM everything"]
    assert w.proposals.quality(0).shape == w.proposals.crops[0].iou.shape
    # the scorer's estimates of a random model's candidates are all near 0; rank them by known values instead
    q = np.random.default_rng(0).permutation(np.linspace(0.05, 0.95, w.proposals.crops[0].iou.size))
    monkeypatch.setattr(w.proposals, "quality", lambda ci: q)
    t = 0.5  # keeps about half by these estimates, none by the random IoU head
    assert w.proposals.crops[0].iou.max() < t
    monkeypatch.setattr(w.generator.predictor, "predict_torch", None)  # the model must not run again
    w.set_thresholds(pred_iou_thresh=t)
    plain = np.asarray(out.data).copy()
    assert np.array_equal(plain, _core(w))
    calls = []
    real_filter = w.proposals.filter
    monkeypatch.setattr(w.proposals, "filter", lambda **kw: calls.append(kw) or real_filter(**kw))
    w.rescore_check.setChecked(True)
    w.refilter()
    assert calls[-1]["rescore"] and calls[-1]["pred_iou_thresh"] == pytest.approx(t)
    assert np.array_equal(np.asarray(out.data), _core(w)) and np.asarray(out.data).max() > 0
    # (random weights: a mask covering the whole image wins either way, so the label images may be equal)


def test_user_labels_are_kept(scene, nuclei_sample):
    viewer, w = scene
    gt = nuclei_sample[1].astype(np.int32)
    user = viewer.add_labels(gt.copy(), name="my labels")
    w.set_target("my labels")
    assert w.run(**OPEN)
    assert w.wait(120)
    data = np.asarray(user.data)
    assert np.array_equal(data[gt > 0], gt[gt > 0])  # not overwritten without the checkbox
    new = data[(gt == 0) & (data > 0)]
    assert new.size and new.min() > gt.max()  # new objects get fresh ids
    assert "SAM everything" not in viewer.layers
    user.undo()
    assert np.array_equal(np.asarray(user.data), gt)


def test_edits_and_commits_made_between_slider_moves_are_kept(scene):
    """After a run, the user erases part of one object, paints a new object and commits one with a fresh id (as the
    annotator does); moving a slider then rewrites the result around them: the erased pixels stay erased, the
    painted ones stay painted, and no new object takes the committed object's id."""
    viewer, w = scene
    assert w.run(**OPEN)
    assert w.wait(120)
    out = viewer.layers["SAM everything"]
    data = np.asarray(out.data).copy()
    ids, sizes = np.unique(data[data > 0], return_counts=True)
    big = int(ids[np.argmax(sizes)])
    rr, cc = np.nonzero((data == big) & (np.arange(data.shape[0]) > 10)[:, None])  # not in the corner painted below
    erased = (rr[: len(rr) // 2], cc[: len(cc) // 2])
    out.data_setitem(erased, 0)  # the user erases half of an object
    painted = (np.arange(3, 8).repeat(5), np.tile(np.arange(3, 8), 5))
    out.data_setitem(painted, 500)  # paints a new one (id 500) in the corner
    committed = int(np.asarray(out.data).max()) + 1
    spot = (erased[0][:10], erased[1][:10])
    out.data_setitem(spot, committed)  # and commits one with the next free id, in the erased space
    w.set_thresholds(min_object_area=0, box_nms_thresh=0.9)  # a slider moves: the result is rewritten
    after = np.asarray(out.data)
    assert not after[erased[0][10:], erased[1][10:]].any()
    assert np.all(after[painted] == 500) and np.all(after[spot] == committed)
    assert np.count_nonzero(after == committed) == 10  # no new object took the committed id
    rewritten = np.unique(after[after > 0])
    ours = rewritten[(rewritten != 500) & (rewritten != committed)]
    assert ours.size and ours.min() > committed


def test_the_target_is_checked_before_the_model_runs_and_layers_may_vanish(scene):
    """A wrong-shaped target is refused at once (not after the model's work); the annotator's preview layer is not
    offered as a target; a renamed image stays chosen."""
    viewer, w = scene
    viewer.add_labels(np.zeros((7, 9), np.int32), name="small")
    viewer.add_labels(np.zeros(viewer.layers["nuclei"].data.shape[:2], np.uint8), name="SAM preview")
    names = [w.target_combo.itemText(i) for i in range(w.target_combo.count())]
    assert "small" in names and "SAM preview" not in names
    w.set_target("small")
    assert not w.run(**OPEN)
    assert w.worker is None and "small" in w.status_label.text()
    w.set_target("[new layer]")
    viewer.layers["nuclei"].name = "renamed"
    assert w.image_combo.currentText() == "renamed"
    assert w.run(**OPEN) and w.wait(120)
    assert "SAM everything" in viewer.layers


def test_cancel_writes_nothing_and_bad_parameters(scene):
    viewer, w = scene
    assert w.run(points_per_side=32, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    w.cancel()
    assert w.wait(120)
    assert "cancelled" in w.status_label.text()
    assert "SAM everything" not in viewer.layers
    assert not w.run(points_per_side=0)
    assert "points_per_side" in w.status_label.text()
    img = viewer.layers["nuclei"].data
    viewer.add_image(np.tile(img, (1, 9) + (1,) * (img.ndim - 2)), name="mosaic")  # 2304 px wide: tiled
    w.set_image_layer("mosaic")
    assert w.run(points_per_side=2)
    assert "segmented in 3 tiles of 1024 px" in w.status_label.text()
    w.cancel()
    assert w.wait(120)


def test_sliders_follow_the_models_recommended_thresholds_while_the_widget_lives(make_napari_viewer, qtbot,
                                                                                  tiny_model):
    from napari_sam._widgets._state import get_state
    from napari_sam.core.amg import REFERENCE_THRESHOLDS

    viewer = make_napari_viewer()
    state = get_state(viewer)
    n_before = len(state._callbacks)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment everything")
    tiny_model.checkpoint_meta = {"amg_thresholds": {"pred_iou_thresh": 0.42},
                                  "amg_settings": {"crop_n_layers": 1, "resolve_parts": 1, "min_object_area": 30}}
    try:
        state.set_model(tiny_model)
        assert widget.sliders["pred_iou_thresh"].value() == pytest.approx(0.42)
        assert widget.crop_spin.value() == 1 and widget.points_spin.value() == 32  # (points: none stored)
        assert widget.parts_check.isChecked() and widget.sliders["min_object_area"].value() == 30
        assert widget.sliders["stability_score_thresh"].value() == pytest.approx(
            REFERENCE_THRESHOLDS["stability_score_thresh"])
        assert len(state._callbacks) == n_before + 1
        viewer.window.remove_dock_widget("all")
        widget.deleteLater()
        qtbot.waitUntil(lambda: len(state._callbacks) == n_before, timeout=5000)  # disconnected when destroyed
        state.set_model(tiny_model)  # no callback into the deleted widget
    finally:
        del tiny_model.checkpoint_meta


def test_slider_moves_refilter_in_a_worker(scene, monkeypatch):
    """A slider move re-filters off the main thread (the viewer stays live on large images) and writes exactly what
    the synchronous re-filter gives; moves made while one runs are all applied, the last one last."""
    import threading

    import napari_sam._widgets.everything as ev

    viewer, w = scene
    assert w.run(**OPEN) and w.wait(120)
    threads = []
    real = ev.filtered_labels

    def spy(*a, **k):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*a, **k)

    monkeypatch.setattr(ev, "filtered_labels", spy)
    w.sliders["box_nms_thresh"].setValue(0.5)
    w.sliders["min_object_area"].setValue(40)  # while the first may still run
    assert w.busy() and w.wait(60)
    assert threads and not any(threads)  # never on the main thread
    out = np.asarray(viewer.layers["SAM everything"].data).copy()
    assert np.array_equal(out > 0, _core(w) > 0)
    assert "re-filtered" in w.status_label.text()


def test_a_refilter_planned_in_a_worker_keeps_what_is_painted_meanwhile(scene):
    """A slider move's write is planned in a worker against a snapshot of the plane; pixels painted between the
    snapshot and the write (which the plan would change) are left as painted, and the message says how many."""
    import time

    from napari_sam._widgets.everything import filter_and_plan

    viewer, w = scene
    assert w.run(**OPEN)
    assert w.wait(120)
    out = viewer.layers["SAM everything"]
    w.set_thresholds(min_object_area=0, box_nms_thresh=0.9)
    snap = w._snapshot()
    plan = filter_and_plan(w.proposals, dict(w._filter_params(), min_object_area=10 ** 6), snap)  # as in a worker
    assert plan.rows.size > 20
    spot = (plan.rows[:20], plan.cols[:20])
    out.data_setitem(spot, 777)  # painted meanwhile, on pixels the plan changes
    w._show_filtered(plan, snap, time.perf_counter())
    after = np.asarray(out.data)
    assert np.all(after[spot] == 777) and "20 pixel(s) painted meanwhile were kept" in w.status_label.text()
    rest = (plan.rows[20:], plan.cols[20:])
    assert np.array_equal(after[rest], plan.values[20:])
    out.undo()  # our write is one undo step: the paint is back as it was
    assert np.all(np.asarray(out.data)[spot] == 777)
    w.set_thresholds(min_object_area=10 ** 5)  # the next re-filter counts those pixels as the user's
    assert np.all(np.asarray(out.data)[spot] == 777)


def test_many_objects_widen_a_narrow_target(scene, nuclei_sample):
    """A uint8 target whose ids run out: the new ids do not wrap around (they did: 256 became 0), the layer is
    widened and the user's labels are kept."""
    viewer, w = scene
    gt = nuclei_sample[1]
    user = viewer.add_labels(np.where(gt > 0, 250, 0).astype(np.uint8), name="narrow")
    w.set_target("narrow")
    assert w.run(**OPEN)
    assert w.wait(120)
    data = np.asarray(user.data)
    assert data.dtype == np.int64 and np.all(data[gt > 0] == 250)
    new = np.unique(data[(gt == 0) & (data > 0)])
    assert new.size > 6 and new.min() == 251 and new.max() > 255


def _gate(monkeypatch, module, name):
    """Make ``module.name`` wait (in its worker) until the returned event is set."""
    import threading

    gate, real = threading.Event(), getattr(module, name)

    def gated(*a, **k):
        assert gate.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(module, name, gated)
    return gate


def test_an_object_committed_while_a_refilter_is_planned_keeps_its_id_alone(scene, monkeypatch):
    """A slider move's write is planned in a worker; the annotator commits an object (the next free id, here 1: the
    thresholds left no object) before the plan is written. The plan's ids came from the snapshot, so it is planned
    again past the committed id: that id stays on the committed object alone."""
    import napari_sam._widgets.everything as ev

    viewer, w = scene
    assert w.run(**OPEN) and w.wait(120)
    out = viewer.layers["SAM everything"]
    w.set_thresholds(pred_iou_thresh=1.0)  # (random IoUs are near 0)
    assert not np.asarray(out.data).any()
    gate = _gate(monkeypatch, ev, "filter_and_plan")
    try:
        w.sliders["pred_iou_thresh"].setValue(0.0)  # the user drags the slider: planned in a worker (held here)
        assert process_until(lambda: w._refilter_worker is not None)
        rr, cc = np.nonzero(_core(w) > 0)
        spot = (rr[:10], cc[:10])
        with out.block_history():  # as the annotator commits: one undo step, the next free id
            out.data_setitem(spot, 1)
    finally:
        gate.set()
    assert w.wait(60)
    after = np.asarray(out.data)
    assert np.count_nonzero(after == 1) == 10 and np.all(after[spot] == 1)  # id 1 is the committed object only
    ours = np.unique(after[after > 1])
    core = _core(w)
    assert ours.size == np.unique(core[core > 0]).size and ours.min() == 2


def test_an_id_committed_on_another_plane_is_not_reused(make_napari_viewer, qtbot, tiny_model, nuclei_sample):
    """A stack: segment everything on plane 0 (thresholds then leave no object there), the annotator commits id 1
    on plane 1; the next slider move gives plane 0's objects ids past it (the highest id off the plane was read
    when the result was first written, and commits since are followed through the paint events)."""
    from napari_sam._widgets._state import get_state

    viewer = make_napari_viewer(show=True)
    get_state(viewer).set_model(tiny_model, "random nsam_t")
    viewer.add_image(np.stack([nuclei_sample[0]] * 2), name="stack")
    viewer.dims.set_current_step(0, 0)
    dw, w = viewer.window.add_plugin_dock_widget("napari-sam", "Segment everything")
    qtbot.waitUntil(dw.isVisible, timeout=5000)
    w.set_image_layer("stack")
    assert w.run(**OPEN) and w.wait(120)
    out = viewer.layers["SAM everything"]
    assert np.asarray(out.data)[0].max() > 0 and not np.asarray(out.data)[1].any()
    w.set_thresholds(pred_iou_thresh=1.0)  # (random IoUs are near 0)
    assert not np.asarray(out.data).any()
    rr, cc = np.nonzero(_core(w) >= 0)
    with out.block_history():  # the annotator commits id 1 on plane 1
        out.data_setitem((np.ones(10, int), rr[:10], cc[:10]), 1)
    w.set_thresholds(pred_iou_thresh=0.0)
    after = np.asarray(out.data)
    assert np.count_nonzero(after[1] == 1) == 10 and np.count_nonzero(after == 1) == 10
    assert after[0].max() > 1 and np.unique(after[0][after[0] > 0]).min() == 2


def test_a_denoise_change_elsewhere_keeps_the_thresholds_and_the_result(scene, tiny_model):
    """Another widget's denoise change (the same model) neither resets the user's thresholds nor rewrites the result
    (no undo step), even after the user undid it; another model sets its recommended thresholds without writing,
    and the old model's outputs are not re-filtered any more."""
    import copy

    from napari_sam._widgets._state import get_state

    viewer, w = scene
    state = get_state(viewer)
    model = copy.deepcopy(tiny_model)  # (set_denoise changes the model object: not the shared fixture's)
    state.set_model(model, "random copy")
    assert w.run(**OPEN) and w.wait(120)
    out = viewer.layers["SAM everything"]
    w.set_thresholds(box_nms_thresh=0.5, min_object_area=50)
    tuned, written, steps = w.thresholds(), np.asarray(out.data).copy(), len(out._undo_history)
    state.set_denoise(1.0)  # as the 3D-propagation or the annotator widget's denoise box does
    assert state.model is model and w.wait(10)
    assert w.thresholds() == tuned and np.array_equal(np.asarray(out.data), written)
    assert len(out._undo_history) == steps
    while out._undo_history:
        out.undo()
    state.set_denoise(2.0)
    assert w.wait(10) and not np.asarray(out.data).any() and not out._undo_history
    other = copy.deepcopy(model)
    other.checkpoint_meta = {"amg_thresholds": {"pred_iou_thresh": 0.42}, "amg_settings": {"min_object_area": 30}}
    state.set_model(other, "other")
    assert w.sliders["pred_iou_thresh"].value() == pytest.approx(0.42)
    assert w.sliders["min_object_area"].value() == 30 and not w.busy()
    assert not np.asarray(out.data).any() and not out._undo_history
    assert w.proposals is None and "model changed" in w.status_label.text()
    w.sliders["min_object_area"].setValue(0)
    assert w.wait(10) and not np.asarray(out.data).any()


def test_closing_the_dock_stops_the_run_and_writes_nothing(scene, monkeypatch):
    """napari's close button only takes the widget out of its dock: the model run going on is cancelled and its
    result never written."""
    import napari_sam._widgets.everything as ev

    viewer, w = scene
    gate = _gate(monkeypatch, ev, "run_generation")
    try:
        assert w.run(**OPEN)
        viewer.window.remove_dock_widget(w)
    finally:
        gate.set()
    assert w.wait(120)
    assert "SAM everything" not in viewer.layers and "cancelled" in w.status_label.text()


def test_closing_the_dock_drops_a_refilter_in_flight(scene, monkeypatch):
    import napari_sam._widgets.everything as ev

    viewer, w = scene
    assert w.run(**OPEN) and w.wait(120)
    out = viewer.layers["SAM everything"]
    written, steps = np.asarray(out.data).copy(), len(out._undo_history)
    gate = _gate(monkeypatch, ev, "filter_and_plan")
    try:
        w.sliders["min_object_area"].setValue(10 ** 3)
        assert process_until(lambda: w._refilter_worker is not None)
        viewer.window.remove_dock_widget(w)
    finally:
        gate.set()
    assert w.wait(60)
    assert np.array_equal(np.asarray(out.data), written) and len(out._undo_history) == steps
    w.sliders["min_object_area"].setValue(0)  # a closed panel's sliders write nothing either
    assert w.wait(10) and np.array_equal(np.asarray(out.data), written)


def process_until(done, timeout=10.0):
    from napari_sam._widgets._workers import process_events_until

    return process_events_until(done, timeout)


def test_a_write_during_the_users_brush_stroke_waits_for_its_end(scene, monkeypatch):
    """A slider move's write arrives while the user's brush is down on the result (napari reports a stroke's
    pixels only on release): it waits, and is planned again after the release, so the stroke's pixels are kept
    (also those painted before the plan's snapshot) and the stroke and the write stay one undo step each."""
    import napari_sam._widgets.everything as ev

    viewer, w = scene
    assert w.run(**OPEN) and w.wait(120)
    out = viewer.layers["SAM everything"]
    w.set_thresholds(pred_iou_thresh=1.0)  # (random IoUs are near 0): no object
    assert not np.asarray(out.data).any()
    before = np.array(out.data)
    gate = _gate(monkeypatch, ev, "filter_and_plan")
    try:
        w.sliders["pred_iou_thresh"].setValue(0.0)  # planned in a worker, held here
        assert process_until(lambda: w._refilter_worker is not None)
        rr, cc = np.nonzero(_core(w) > 0)
        out.brush_size = 3
        out._begin_stroke()  # the mouse pressed, as napari's brush does
        out.paint((rr[0], cc[0]), 900, refresh=False)
    finally:
        gate.set()
    assert process_until(lambda: w._refilter_worker is None, 60)
    assert w.busy() and np.count_nonzero(np.asarray(out.data)) == np.count_nonzero(np.asarray(out.data) == 900)
    out.paint((rr[-1], cc[-1]), 900, refresh=False)
    out._commit_stroke()  # the mouse released
    stroke = np.array(out.data)
    assert w.wait(60)
    after = np.asarray(out.data)
    user = stroke == 900
    assert np.all(after[user] == 900)
    core = _core(w)
    assert np.array_equal(after[~user] > 0, core[~user] > 0)
    out.undo()  # the write
    assert np.array_equal(np.asarray(out.data), stroke)
    out.undo()  # the whole stroke
    assert np.array_equal(np.asarray(out.data), before)


def test_a_result_layer_removed_during_a_stroke_leaves_the_widget_free(scene):
    """The result layer is deleted while the user's brush is down on it (napari never ends that stroke): a write
    waiting for the stroke gives up, and the widget is not left busy."""
    viewer, w = scene
    assert w.run(**OPEN) and w.wait(120)
    out = viewer.layers["SAM everything"]
    out._begin_stroke()
    out.paint((3, 3), 900, refresh=False)
    w.sliders["pred_iou_thresh"].setValue(0.5)
    assert process_until(lambda: w._after_stroke.isActive())
    viewer.layers.remove(out)
    assert w.wait(5) and not w.busy()
