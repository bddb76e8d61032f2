"""Real quality with the built-in model on real nuclei (DSB2018, ground truth): one click on a nucleus
commits an object with IoU >= 0.7; a negative point and a box change the mask as expected. Skipped,
with the reason, while the built-in model file does not exist."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from annotator_helpers import interior_point, wait_idle  # noqa: E402

from napari_sam.core.build import builtin_checkpoint_path  # noqa: E402

pytestmark = [
    pytest.mark.gui,
    pytest.mark.slow,
    pytest.mark.skipif(not builtin_checkpoint_path().is_file(),
                       reason=f"the built-in model {builtin_checkpoint_path()} does not exist yet (training makes it)"),
]


def _iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture
def builtin_annotator(make_napari_viewer, qtbot, nuclei_sample):
    viewer = make_napari_viewer(show=True)
    img, gt = nuclei_sample
    viewer.add_image(img, name="nuclei")
    dw, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    qtbot.waitUntil(dw.isVisible, timeout=5000)
    assert w.ui.model_combo.currentText() == "builtin"  # the default choice
    w.set_image_layer("nuclei")  # the built-in model loads in a worker on first use
    return viewer, w, gt


def _nuclei_by_size(gt):
    """Ids of nuclei not touching the border, largest first."""
    ids, counts = np.unique(gt[gt > 0], return_counts=True)
    border = set(np.unique(np.concatenate([gt[0], gt[-1], gt[:, 0], gt[:, -1]])).tolist())
    return [int(i) for _, i in sorted(zip(counts, ids), reverse=True) if i not in border]


def test_click_on_a_nucleus_commits_it(builtin_annotator, qtbot):
    viewer, w, gt = builtin_annotator
    nid = _nuclei_by_size(gt)[len(_nuclei_by_size(gt)) // 2]  # a typical (median-size) nucleus
    target = gt == nid
    w.add_point(interior_point(target))
    wait_idle(qtbot, w, timeout=120000)
    assert w.state.model_name == "builtin"
    assert not w.ui.refine_check.isChecked()  # the built-in model refines clicks without its logits
    ids = w.commit()
    assert ids, f"nothing committed (empty mask); status: {w.ui.status_label.text()}"
    committed = viewer.layers["SAM labels"].data == ids[0]
    iou = _iou(committed, target)
    print(f"built-in model, one click on nucleus {nid}: IoU {iou:.3f}")
    assert iou >= 0.7
    viewer.layers["SAM labels"].undo()
    assert not viewer.layers["SAM labels"].data.any()


def test_a_box_around_a_nucleus_segments_it(builtin_annotator, qtbot):
    viewer, w, gt = builtin_annotator
    nid = _nuclei_by_size(gt)[0]  # the largest nucleus
    target = gt == nid
    rows, cols = np.nonzero(target)
    w.add_box((rows.min() - 2, cols.min() - 2, rows.max() + 2, cols.max() + 2))
    wait_idle(qtbot, w, timeout=120000)
    box_iou = _iou(w.result.mask, target)
    print(f"built-in model, box around nucleus {nid}: IoU {box_iou:.3f}")
    assert box_iou >= 0.7
    outside_box = np.ones_like(target)
    outside_box[rows.min() - 2: rows.max() + 3, cols.min() - 2: cols.max() + 3] = False
    assert (w.result.mask & outside_box).sum() <= 0.05 * w.result.mask.sum()  # the mask stays in the box


# Fed its own logits back, the built-in model alone ignores such a click (models/MODEL_CARD.md); the annotator makes
# negative points hard constraints (core.annotation.enforce_negative_points, on by default). Without the logits (the
# built-in model's default) the model honours most such clicks itself, re-predicting the whole mask.
@pytest.mark.parametrize("refine", [False, True], ids=["default", "refine"])
def test_a_negative_click_inside_the_object_carves_it_out(builtin_annotator, qtbot, refine):
    viewer, w, gt = builtin_annotator
    target = gt == _nuclei_by_size(gt)[0]  # the largest nucleus
    # a positive click in the nucleus, then a negative one inside it far from the first: the negative pixel
    # leaves the mask, the positive one stays, and (without the logits fed back) the mask shrinks
    r, c = interior_point(target)
    w.add_point((r, c))
    wait_idle(qtbot, w, timeout=120000)
    assert w.ui.refine_check.isChecked() is False  # the built-in model's default
    w.ui.refine_check.setChecked(refine)
    before = w.result.mask.copy()
    assert before[r, c] and _iou(before, target) >= 0.5
    rows, cols = np.nonzero(target & before)
    far = int(np.argmax((rows - r) ** 2 + (cols - c) ** 2))
    rn, cn = int(rows[far]), int(cols[far])  # the masked nucleus pixel farthest from the positive click
    w.toggle_polarity()
    w.add_point((rn, cn))
    wait_idle(qtbot, w, timeout=120000)
    after = w.result.mask.copy()
    print(f"negative point at {(rn, cn)}: mask {before.sum()} -> {after.sum()} px")
    assert not after[rn, cn] and after[r, c]
    assert _iou(after, target) >= 0.5  # the nucleus stays mostly whole
    if not refine:
        assert after.sum() < before.sum()
    else:  # refined from the previous mask, the model grows it a little elsewhere, and the enforced cut takes only
        # the rim beyond a click at the edge (core tests: test_a_negative_point_near_the_edge_takes_only_the_rim...)
        assert after.sum() <= 1.05 * before.sum()  # 400 -> 403 px with the shipped model


def test_a_negative_click_takes_a_touching_neighbour_out(builtin_annotator, qtbot):
    from scipy import ndimage

    viewer, w, gt = builtin_annotator
    # positive clicks on two touching nuclei make one mask; a negative click on the second, with the positive
    # one on it removed, leaves the first
    for a in _nuclei_by_size(gt):
        ring = ndimage.binary_dilation(gt == a, iterations=2) & (gt != a) & (gt > 0)
        if ring.any():
            b = int(np.bincount(gt[ring]).argmax())
            break
    pa, pb = interior_point(gt == a), interior_point(gt == b)
    w.add_point(pa)
    w.add_point(pb)
    wait_idle(qtbot, w, timeout=120000)
    assert w.result.mask[pa] and w.result.mask[pb]
    both = w.result.mask.copy()
    w.clear_prompts()
    w.add_point(pa)
    w.toggle_polarity()
    w.add_point(pb)
    wait_idle(qtbot, w, timeout=120000)
    after = w.result.mask
    print(f"nuclei {a} + {b}: IoU with {a} {_iou(both, gt == a):.2f} -> {_iou(after, gt == a):.2f}")
    assert after[pa] and not after[pb]
    assert _iou(after, gt == a) > _iou(both, gt == a)


def test_zoom_checkbox_on_a_large_image(make_napari_viewer, qtbot, nuclei_sample):
    """The real nuclei image enlarged 3x (768 px, nuclei 3x larger than the model saw them in training): a click
    is decoded from the 256-px window around it (checkbox on, the default), or from the whole image (off); both
    find the nucleus, before and after a refining click."""
    viewer = make_napari_viewer(show=True)
    img, gt = nuclei_sample
    f = np.ones((3, 3) + (1,) * (img.ndim - 2), img.dtype)
    img, gt = np.kron(img, f), np.kron(gt, np.ones((3, 3), gt.dtype))
    viewer.add_image(img, name="big")
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_image_layer("big")
    nid = _nuclei_by_size(gt)[len(_nuclei_by_size(gt)) // 2]
    target = gt == nid
    p = interior_point(target)
    assert w.ui.zoom_check.isChecked()
    w.add_point(p)
    wait_idle(qtbot, w, timeout=120000)
    win = w.result.window
    assert win is not None and (win[2] - win[0], win[3] - win[1]) == (256, 256)
    assert _iou(w.result.mask, target) >= 0.7
    w.ui.zoom_check.setChecked(False)  # re-runs on the whole image, refined by the zoomed logits (moved)
    wait_idle(qtbot, w, timeout=120000)
    assert tuple(w.result.window) == (0, 0) + gt.shape
    assert _iou(w.result.mask, target) >= 0.6
    w.add_point((p[0] + 2, p[1] + 2))
    wait_idle(qtbot, w, timeout=120000)
    assert _iou(w.result.mask, target) >= 0.6


def test_a_left_out_positive_click_is_retried_with_a_box(builtin_annotator, qtbot):
    """A second positive click the built-in model leaves out (found with the core on this image) is in the
    annotator's mask with *positive points: retry with a box* on (the default), and left out with it off."""
    from napari_sam.core.annotation import Prompts, predict
    from napari_sam.core.build import load_model
    from napari_sam.core.evaluation import center_point, error_click
    from napari_sam.core.predictor import SamPredictor

    viewer, w, gt = builtin_annotator
    pred = SamPredictor(load_model(device="cpu"))
    pred.set_image(viewer.layers["nuclei"].data)
    case = None
    for nid in _nuclei_by_size(gt):
        c = center_point(gt == nid)
        first = predict(pred, Prompts([c], [1]))
        click, v = error_click(first.mask, gt == nid)
        prompts = Prompts([c, click], [1, 1])
        if (v == 1 and not predict(pred, prompts, follow_positives=False).mask[click]
                and predict(pred, prompts, previous=first.mask).mask[click]):
            case = nid, c, click
            break
    assert case is not None, "no left-out second click on this image"
    nid, c, click = case
    assert w.ui.follow_check.isChecked()  # the default
    for follow in (True, False):
        w.clear_prompts()
        w.ui.follow_check.setChecked(follow)
        w.add_point(c)
        wait_idle(qtbot, w, timeout=120000)
        w.add_point(click)
        wait_idle(qtbot, w, timeout=120000)
        assert bool(w.result.mask[click]) is follow, f"nucleus {nid}, click {click}, retry {follow}"
