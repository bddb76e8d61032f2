"""Annotation logic without a viewer: commit planning (ids, no-overwrite, dtype), prompts, embedding
progress / cancel, single and batch prediction (random-weight model: plumbing only) on a real image."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.core import SamPredictor
from napari_sam.core.annotation import (
    EmbeddingCancelled,
    Prompts,
    Result,
    compute_embedding,
    dtype_for,
    enforce_negative_points,
    next_free_id,
    plan_commit,
    predict,
)


def _disk(shape, center, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= r * r


def test_next_free_id_and_dtype_ladder():
    assert next_free_id(np.zeros((4, 4), np.uint8)) == 1
    a = np.zeros((3, 5, 5), np.uint16)
    a[2, 1, 1] = 41
    assert next_free_id(a) == 42
    assert dtype_for(np.uint8, 255) == np.uint8
    assert dtype_for(np.uint8, 256) == np.uint16
    assert dtype_for(np.int8, 128) == np.int16
    assert dtype_for(np.uint16, 70000) == np.uint32
    with pytest.raises(ValueError, match="integer dtype"):
        dtype_for(np.float32, 3)


def test_plan_commit_never_overwrites_without_permission(nuclei_sample):
    _, gt = nuclei_sample
    existing = gt.astype(np.uint16)
    obj = existing == 5
    blob = np.zeros_like(obj)
    rows, cols = np.nonzero(obj)
    blob[max(rows.min() - 6, 0): rows.max() + 6, max(cols.min() - 6, 0): cols.max() + 6] = True  # covers nucleus 5
    first = next_free_id(existing)
    plan = plan_commit(existing, [blob], first)
    assert plan.ids == [first]
    _, r, c = plan.writes[0]
    assert np.all(existing[r, c] == 0)  # only background written
    assert plan.protected_pixels == int((blob & (existing != 0)).sum()) > 0
    out = existing.copy()
    out[r, c] = first
    assert np.array_equal(out[existing != 0], existing[existing != 0])  # every existing object intact
    # with permission the whole blob becomes the new object
    plan_ow = plan_commit(existing, [blob], first, overwrite=True)
    assert len(plan_ow.writes[0][1]) == int(blob.sum())
    # an object lying entirely on existing labels takes no id
    assert plan_commit(existing, [obj], first).skipped == 1


def test_plan_commit_matches_a_whole_plane_reference(nuclei_sample):
    """plan_commit works inside each mask's bounding box (a batch of boxes on a 4096-px plane went from 0.5 s to
    10 ms); its writes, skips and kept pixels equal those of the plain whole-plane rule, on the real labels of a
    sample with overlapping masks (dilated nuclei, an empty one, one inside an object, one at the image corner)."""
    from scipy import ndimage as ndi

    _, gt = nuclei_sample
    existing = np.where(np.isin(gt, np.arange(1, gt.max() + 1, 2)), gt, 0).astype(np.uint16)  # odd ids exist
    masks = [ndi.binary_dilation(gt == i, iterations=4) for i in range(1, int(gt.max()) + 1, 3)]
    corner = np.zeros(gt.shape, bool)
    corner[-3:, -5:] = True
    masks += [np.zeros(gt.shape, bool), gt == 1, corner]

    def reference(overwrite):
        taken = existing != 0 if not overwrite else np.zeros(existing.shape, bool)
        writes, skipped, protected, nid = [], 0, 0, 7
        for m in masks:
            allowed = m & ~taken
            protected += int((m & taken).sum())
            if not allowed.any():
                skipped += 1
                continue
            writes.append((nid, *np.nonzero(allowed)))
            taken |= allowed
            nid += 1
        return writes, skipped, protected

    for overwrite in (False, True):
        plan = plan_commit(existing, masks, 7, overwrite=overwrite)
        writes, skipped, protected = reference(overwrite)
        assert (plan.skipped, plan.protected_pixels) == (skipped, protected) and protected > 0
        assert len(plan.writes) == len(writes) > 10
        for (i, r, c), (j, r2, c2) in zip(plan.writes, writes):
            assert i == j and np.array_equal(r, r2) and np.array_equal(c, c2)
        # the masks off the image's edges, cut to the box around all of them, at its offset: the same plan
        inner = [m for m in masks if not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())]
        res = Result(np.stack(inner), np.zeros(len(inner)), np.zeros((len(inner), 4, 4)), batch=True).cropped()
        assert min(res.offset) > 0 and len(inner) > 8
        plan = plan_commit(existing, inner, 7, overwrite=overwrite)
        patched = plan_commit(existing, res.patch_objects(), 7, overwrite=overwrite, offset=res.offset)
        assert (patched.skipped, patched.protected_pixels, patched.dtype) == (plan.skipped, plan.protected_pixels,
                                                                               plan.dtype)
        for (i, r, c), (j, r2, c2) in zip(patched.writes, plan.writes, strict=True):
            assert i == j and np.array_equal(r, r2) and np.array_equal(c, c2)
    with pytest.raises(ValueError, match="does not match the label plane"):
        plan_commit(existing, [np.ones((5, 5), bool)], 1, offset=(gt.shape[0] - 4, 0))


def test_a_cropped_result_is_the_same_prediction(tiny_model, nuclei_sample):
    """Result.cropped keeps the box around every candidate; masks, previews and objects stay exactly the same
    (a click, a batch, and an all-empty result)."""
    img, _ = nuclei_sample
    pred = SamPredictor(tiny_model)
    pred.set_image(img)
    one = predict(pred, Prompts([[60, 60]], [1]))
    batch = predict(pred, Prompts([[60, 60], [30, 30]], [1, 1], [[10, 10, 50, 50]]), batch=True)
    empty = Result(np.zeros((3,) + img.shape[:2], bool), one.iou, one.logits, prompts=one.prompts)
    for full in (one, batch, empty):
        for choice in range(len(full.patches)) if not full.batch else (0,):
            full.choice = choice
            cut = full.cropped()
            cut.choice = choice
            assert cut.shape == img.shape[:2] and cut.plane_shape == full.plane_shape
            np.testing.assert_array_equal(cut.masks, full.masks)
            np.testing.assert_array_equal(cut.mask, full.mask)
            np.testing.assert_array_equal(cut.preview(), full.preview())
            np.testing.assert_array_equal(cut.preview_patch(), full.preview()[cut.box])
            for a, b in zip(cut.objects(), full.objects(), strict=True):
                np.testing.assert_array_equal(a, b)
            assert not full.masks.any() or not np.delete(full.masks.any(0), cut.box[0], 0).any()
    assert empty.cropped().patches.shape == (3, 0, 0)


def test_plan_commit_batch_objects_do_not_overlap_and_dtype_upgrade():
    shape = (40, 40)
    a, b = _disk(shape, (15, 15), 8), _disk(shape, (15, 25), 8)
    existing = np.zeros(shape, np.uint8)
    existing[0, 0] = 254
    plan = plan_commit(existing, [a, b, np.zeros(shape, bool)], next_free_id(existing))
    assert plan.ids == [255, 256]
    assert plan.dtype == np.uint16  # 256 does not fit uint8
    ra, ca = plan.writes[0][1:]
    rb, cb = plan.writes[1][1:]
    assert not (set(zip(ra.tolist(), ca.tolist())) & set(zip(rb.tolist(), cb.tolist())))
    assert len(ra) == int(a.sum()) and len(rb) == int((b & ~a).sum())
    assert plan.skipped == 1


def test_prompts_extend_and_validate():
    p1 = Prompts([[3, 4]], [1])
    p2 = Prompts([[3, 4], [5, 6]], [1, 0])
    assert p2.extends(p1) and not p1.extends(p2)
    assert not Prompts([[5, 6], [3, 4]], [0, 1]).extends(p1)
    assert not Prompts([[3, 4], [5, 6]], [1, 0], [[0, 0, 9, 9]]).extends(p1)  # a new box: start afresh
    assert Prompts().empty and p1.n_positive == 1 and p2.n_positive == 1
    with pytest.raises(ValueError, match="one label per point"):
        Prompts([[1, 2]], [1, 0])


def test_embedding_progress_and_cancel(tiny_model, nuclei_sample):
    img, _ = nuclei_sample
    pred = SamPredictor(tiny_model)
    seen = []
    emb = compute_embedding(pred, img, progress=lambda d, t: seen.append((d, t)))
    ref = pred.compute_embedding(img)
    assert np.allclose(emb.features.numpy(), ref.features.numpy())
    total = seen[-1][1]
    assert seen[-1] == (total, total) and total >= 3
    assert [d for d, _ in seen[:-1]] == list(range(1, len(seen)))
    calls = []

    def cancel_after_first():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(EmbeddingCancelled):
        compute_embedding(pred, img, cancelled=cancel_after_first)
    # hooks are removed after a cancel: a later run is unaffected
    assert np.allclose(compute_embedding(pred, img).features.numpy(), ref.features.numpy())


def test_predict_single_batch_and_refine(tiny_model, nuclei_sample):
    img, gt = nuclei_sample
    pred = SamPredictor(tiny_model)
    pred.set_image(img)
    one = predict(pred, Prompts([[60, 60]], [1]))
    assert one.masks.shape == (3, *img.shape[:2]) and one.masks.dtype == bool
    assert one.choice == int(np.argmax(one.iou)) and not one.batch
    assert one.preview().max() <= 1 and np.array_equal(one.preview() == 1, one.mask)
    two = Prompts([[60, 60], [90, 90]], [1, 0])
    plain = predict(pred, two)
    refined = predict(pred, two, mask_input=one.logits[one.choice])
    assert plain.masks.shape == (1, *img.shape[:2])
    assert not np.allclose(plain.logits, refined.logits)  # the previous logits reach the decoder
    batch = predict(pred, Prompts([[60, 60], [90, 90], [30, 30]], [1, 0, 1], [[10, 10, 50, 50]]), batch=True)
    assert batch.batch and batch.masks.shape == (3, *img.shape[:2])  # 1 box + 2 positive points
    assert len(batch.objects()) == 3
    with pytest.raises(ValueError, match="positive point"):
        predict(pred, Prompts([[60, 60]], [0]))
    with pytest.raises(ValueError, match="batch mode"):
        predict(pred, Prompts(boxes=[[0, 0, 9, 9], [10, 10, 20, 20]]))
    with pytest.raises(ValueError, match="no prompts"):
        predict(pred, Prompts())


# ------------------------------------------------------------------ negative points as hard constraints
def test_a_negative_point_removes_a_separate_piece_and_nothing_else():
    a, b = _disk((80, 80), (20, 20), 8), _disk((80, 80), (55, 55), 8)
    mask = a | b
    out = enforce_negative_points(mask, np.array([[20.0, 20.0], [55.0, 55.0]]), np.array([1, 0]))
    assert np.array_equal(out, a)
    # a negative point outside the mask, or no negative point: the mask comes back unchanged
    same = enforce_negative_points(mask, np.array([[20.0, 20.0], [70.0, 5.0]]), np.array([1, 0]))
    assert np.array_equal(same, mask)
    assert enforce_negative_points(mask, np.array([[20.0, 20.0]]), np.array([1])) is mask
    # a piece with no click at all is left alone; points outside the image are ignored
    out = enforce_negative_points(mask, np.array([[55.0, 55.0], [-5.0, 300.0]]), np.array([0, 0]))
    assert np.array_equal(out, a)


def test_a_negative_point_splits_touching_objects_at_the_neck():
    # two discs of radius 10 joined by a neck: a positive click in the left one, a negative in the right one
    a, b = _disk((40, 80), (20, 20), 10), _disk((40, 80), (20, 52), 10)
    neck = np.zeros_like(a)
    neck[18:23, 20:53] = True
    mask = a | b | neck
    out = enforce_negative_points(mask, np.array([[20.0, 20.0], [20.0, 52.0]]), np.array([1, 0]))
    assert not (out & ~mask).any() and np.array_equal(out & a, a) and not (out & b).any()
    # the cut falls inside the neck: what is left of it is the part joined to the kept disc
    rest = out & neck & ~a
    assert rest.any() and np.array_equal(out, a | rest) and np.nonzero(rest)[1].max() < 42
    # the same mask, the clicks swapped: the other disc stays
    out = enforce_negative_points(mask, np.array([[20.0, 52.0], [20.0, 20.0]]), np.array([1, 0]))
    assert np.array_equal(out & b, b) and not (out & a).any()


def test_a_negative_point_near_the_edge_takes_only_the_rim_beyond_it():
    """A mask a little too large (a disc of radius 20 over an object of radius 16): a negative click in the extra
    rim removes a sliver there, not the side of the object nearer to the click."""
    mask = _disk((60, 60), (30, 30), 20)
    out = enforce_negative_points(mask, np.array([[30.0, 30.0], [30.0, 47.0]]), np.array([1, 0]))
    assert not out[30, 47] and not (out & ~mask).any()
    assert _disk((60, 60), (30, 30), 16).sum() == (out & _disk((60, 60), (30, 30), 16)).sum()
    removed = mask & ~out
    assert 0 < removed.sum() < 0.1 * mask.sum() and np.nonzero(removed)[1].min() >= 47


def test_a_negative_point_inside_one_object_carves_the_side_near_it():
    mask = _disk((60, 60), (30, 30), 20)
    out = enforce_negative_points(mask, np.array([[30.0, 30.0], [30.0, 48.0]]), np.array([1, 0]))
    assert out[30, 30] and not out[30, 48] and out.sum() < mask.sum() and not (out & ~mask).any()
    removed = mask & ~out
    cols = np.nonzero(removed)[1]
    assert cols.min() > 30  # only the negative click's side goes
    # a negative point on the positive one's pixel wins: the whole piece goes
    gone = enforce_negative_points(mask, np.array([[30.0, 30.0], [30.0, 30.0]]), np.array([1, 0]))
    assert not gone.any()


def test_predict_enforces_negative_points_unless_told_not_to(tiny_model, nuclei_sample):
    img, _ = nuclei_sample
    pred = SamPredictor(tiny_model)
    pred.set_image(img)
    prompts = Prompts([[60, 60], [70, 75]], [1, 0])
    raw = predict(pred, prompts, enforce_negatives=False)
    ref = pred.predict(points=prompts.points, point_labels=prompts.labels, multimask=False)
    assert np.array_equal(raw.masks, ref.masks)  # off: exactly the model's masks
    cut = predict(pred, prompts)
    want = np.stack([enforce_negative_points(m, prompts.points, prompts.labels) for m in raw.masks])
    assert np.array_equal(cut.masks, want) and np.array_equal(cut.logits, raw.logits)
    assert not cut.mask[70, 75]
