"""Training: data validation, the paper's prompt simulation on real labels, exact losses, decoder-only
fine-tuning on real data, exact resume, clear errors for bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_sam.core.build import build_sam
from napari_sam.core.config import get_config
from napari_sam.core.training import DataError, TrainConfig, Trainer, TrainingError, finetune, from_arrays
from napari_sam.core.training.data import load_folder, pairs_from_folder
from napari_sam.core.training.losses import dice_loss, focal_loss, mask_iou, sam_loss, weighted_bce
from napari_sam.core.training.simulate import (corrective_clicks, far_points, mask_boxes, nearest_neighbours,
                                               noisy_boxes, sample_points, split_toward)
from tests.conftest import data_dir, read_image

# nsam_t's architecture at 128 px (8x8 grid): cheap enough for a full from-scratch step in a test.
SMALL = dataclasses.replace(get_config("nsam_t"), name="nsam_t_test128", img_size=128)


def _nuclei_masks(labels: np.ndarray, n: int = 8) -> torch.Tensor:
    ids = np.unique(labels)[1: n + 1]
    return torch.from_numpy(labels[None] == ids[:, None, None])


# ------------------------------------------------------------------ prompt simulation on real labels
def test_points_are_inside_their_objects(nuclei_sample):
    _, labels = nuclei_sample
    gt = _nuclei_masks(labels, 12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        xy = sample_points(gt, gen)[:, 0].long()
        assert gt[torch.arange(len(gt)), xy[:, 1], xy[:, 0]].all()


def test_noisy_boxes_stay_within_the_noise_bound(nuclei_sample):
    _, labels = nuclei_sample
    gt = _nuclei_masks(labels, 12)
    tight = mask_boxes(gt)
    rr, cc = np.nonzero(gt[0].numpy())
    assert tight[0].tolist() == [cc.min(), rr.min(), cc.max(), rr.max()]
    gen = torch.Generator().manual_seed(1)
    boxes = torch.stack([noisy_boxes(gt, gen) for _ in range(20)])
    side = torch.stack([tight[:, 2] - tight[:, 0] + 1, tight[:, 3] - tight[:, 1] + 1] * 2, -1)
    dev = (boxes - tight).abs()
    assert (dev <= torch.clamp(side, max=1e9) * 10).all() and (dev <= 20.0 + 1e-4).all()
    assert (dev > 0).any()  # there is noise
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()


def test_corrective_clicks_fall_in_error_regions_with_the_right_label(nuclei_sample):
    _, labels = nuclei_sample
    gt = _nuclei_masks(labels, 10)
    # prediction: objects 0-4 under-segmented (only their upper half), 5-9 over-segmented (dilated box)
    pred = gt.clone()
    for k in range(5):
        rows = torch.nonzero(gt[k].any(1)).flatten()
        pred[k, rows[len(rows) // 2]:] = False
    for k in range(5, 10):
        x0, y0, x1, y1 = mask_boxes(gt[k: k + 1])[0].long().tolist()
        pred[k, max(y0 - 3, 0): y1 + 4, max(x0 - 3, 0): x1 + 4] = True
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        pts, lab = corrective_clicks(pred, gt, gen)
        x, y = pts[:, 0, 0].long(), pts[:, 0, 1].long()
        b = torch.arange(10)
        assert (pred ^ gt)[b, y, x].all()
        assert lab[:5, 0].tolist() == [1] * 5 and lab[5:, 0].tolist() == [0] * 5
        assert torch.equal(lab[:, 0], gt[b, y, x].long())
    # a perfect mask gets a positive click inside the object
    pts, lab = corrective_clicks(gt, gt, gen)
    assert lab.eq(1).all() and gt[torch.arange(10), pts[:, 0, 1].long(), pts[:, 0, 0].long()].all()


def test_nearest_neighbours_match_a_brute_force_search_on_real_labels(nuclei_sample):
    from scipy import ndimage

    _, labels = nuclei_sample
    ids = np.unique(labels)[1:]
    area = ndimage.sum_labels(np.ones_like(labels), labels, ids)
    cen = np.array(ndimage.center_of_mass(np.ones_like(labels), labels, ids))
    rad = np.sqrt(area / np.pi)
    got = nearest_neighbours(labels, ids, min_px=16, reach=3.0)
    for k, a in enumerate(ids):
        d = np.hypot(*(cen - cen[k]).T)
        d[k] = np.inf
        d[area < 16] = np.inf
        j = int(np.argmin(d))
        want = ids[j] if d[j] <= 3.0 * (rad[k] + rad[j]) else 0
        assert got[k] == want, (a, got[k], want)
    assert (got > 0).sum() >= len(ids) // 2  # nuclei here mostly have a near neighbour
    # a lone object has none
    lone = np.zeros((64, 64), np.int32)
    lone[10:20, 10:20] = 1
    lone[50:52, 50:52] = 2  # too small to count
    assert nearest_neighbours(lone, np.array([1])).tolist() == [0]


def test_carving_clicks_split_an_object_between_the_two_clicks(nuclei_sample):
    _, labels = nuclei_sample
    gt = _nuclei_masks(labels, 10)
    gen = torch.Generator().manual_seed(3)
    p = sample_points(gt, gen)[:, 0]
    q = far_points(gt, p, gen, min_frac=0.6)
    b = torch.arange(len(gt))
    assert gt[b, q[:, 1].long(), q[:, 0].long()].all()
    for k in range(len(gt)):
        yy, xx = np.nonzero(gt[k].numpy())
        d = np.hypot(xx - float(p[k, 0]), yy - float(p[k, 1]))
        assert np.hypot(*(q[k] - p[k]).tolist()) >= 0.6 * d.max() - 1e-4
    keep = split_toward(gt, p, q)
    assert keep[b, p[:, 1].long(), p[:, 0].long()].all() and not keep[b, q[:, 1].long(), q[:, 0].long()].any()
    assert (keep <= gt).all() and (keep.flatten(1).sum(1) < gt.flatten(1).sum(1)).all()
    # exact: a pixel is kept iff it is in the object and strictly nearer the positive click
    yy, xx = np.mgrid[: gt.shape[1], : gt.shape[2]]
    k = 0
    want = gt[k].numpy() & ((xx - float(p[k, 0])) ** 2 + (yy - float(p[k, 1])) ** 2
                            < (xx - float(q[k, 0])) ** 2 + (yy - float(q[k, 1])) ** 2)
    assert np.array_equal(keep[k].numpy(), want)


def test_negative_click_lessons_train_with_a_slower_encoder():
    samples = _real_samples(128, 2)
    cfg = TrainConfig(mode="scratch", steps=4, lr=1e-3, warmup_steps=1, objects_per_image=4, edit_prob=1.0,
                      encoder_lr_mult=0.25, log_every=1, eval_every_s=0, ckpt_every_s=1e9)
    torch.manual_seed(0)
    tr = Trainer(build_sam(SMALL), samples, cfg)
    lrs = sorted({g["lr_mult"] for g in tr.opt.param_groups})
    assert lrs == [0.25, 1.0]
    tr.fit()
    assert len(tr.history) == 4 and all(h["edit"] == 1.0 and h["n_iter"] in (2, 3) for h in tr.history)
    assert all(np.isfinite(h["loss"]) for h in tr.history)
    enc = [g for g in tr.opt.param_groups if g["lr_mult"] == 0.25][0]
    dec = [g for g in tr.opt.param_groups if g["lr_mult"] == 1.0][0]
    assert enc["lr"] == pytest.approx(0.25 * dec["lr"]) and dec["lr"] > 0


# ------------------------------------------------------------------ losses on exact references
def test_losses_match_hand_computed_values():
    logits = torch.tensor([0.0, float(np.log(3.0))]).view(1, 1, 1, 2)  # p = 0.5, 0.75
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    # dice: 1 - (2 * 0.5 + 1) / (1.25 + 1 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - 2 / 3.25, abs=1e-6)
    # focal (alpha 0.25, gamma 2): mean(0.25 * 0.5^2 * ln 2, 0.75 * 0.75^2 * ln 4)
    ref = (0.25 * 0.25 * np.log(2) + 0.75 * 0.5625 * np.log(4)) / 2
    assert focal_loss(logits, target).item() == pytest.approx(ref, abs=1e-6)
    assert mask_iou(logits, target).item() == 0.0  # pred {1}, target {0}
    m, i = sam_loss(logits, target, torch.tensor([[0.5]]))
    assert m.item() == pytest.approx(20 * ref + 1 - 2 / 3.25, abs=1e-5)
    assert i.item() == pytest.approx(0.25, abs=1e-6)


def test_weighted_bce_balances_a_small_object_against_its_background():
    logits = torch.tensor([0.0, float(np.log(3.0)), 0.0, 0.0]).view(1, 1, 1, 4)  # p = 0.5, 0.75, 0.5, 0.5
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)  # object share 1/4 -> object weight 3
    # (3 ln 2 + ln 4 + ln 2 + ln 2) / 4 / 2
    assert weighted_bce(logits, target).item() == pytest.approx(7 * np.log(2) / 8, abs=1e-6)
    m, _ = sam_loss(logits, target, torch.tensor([[0.0]]), pixel_loss="wbce")
    assert m.item() == pytest.approx(7 * np.log(2) / 8 + dice_loss(logits, target).item(), abs=1e-6)
    # an all-background prediction is no longer cheap: it costs as much as an all-object one
    t = torch.zeros(1, 1, 10, 10)
    t[..., :1, :1] = 1  # 1 % object
    all_bg, all_fg = weighted_bce(torch.full_like(t, -4.0), t), weighted_bce(torch.full_like(t, 4.0), t)
    assert all_bg.item() == pytest.approx(all_fg.item(), rel=1e-5)
    assert focal_loss(torch.full_like(t, -4.0), t).item() < 0.1 * focal_loss(torch.full_like(t, 4.0), t).item()
    assert TrainConfig().pixel_loss == "wbce"
    with pytest.raises(ValueError, match="unknown pixel_loss"):
        sam_loss(logits, target, torch.tensor([[0.0]]), pixel_loss="bce")


# ------------------------------------------------------------------ data and bad input
def test_folder_pairs_and_bad_input(tmp_path, nuclei_sample):
    import tifffile
    from imageio.v3 import imwrite

    image, labels = nuclei_sample
    imwrite(tmp_path / "a_image.png", image)
    tifffile.imwrite(tmp_path / "a_label.tif", labels)
    samples = load_folder(tmp_path, None, 256)
    assert len(samples) == 1 and max(samples[0].image.shape[:2]) == 256
    assert samples[0].labels.shape == samples[0].image.shape[:2] and samples[0].ids.size > 10
    imwrite(tmp_path / "b_image.png", image)  # no label file
    with pytest.raises(DataError, match="no label file.*b_image.png"):
        pairs_from_folder(tmp_path)
    with pytest.raises(DataError, match="does not match the image"):
        from_arrays([image], [labels[:-3]], 256)
    with pytest.raises(DataError, match="empty"):
        from_arrays([image], [np.zeros_like(labels)], 256)
    with pytest.raises(DataError, match="integers"):
        from_arrays([image], [labels.astype(np.float32)], 256)
    # a napari-style stack: empty slices are skipped
    gray = image if image.ndim == 2 else image[..., 0]
    stack = from_arrays(np.stack([gray] * 3), np.stack([labels, np.zeros_like(labels), labels]), 128)
    assert len(stack) == 2


def test_3d_labels_beside_a_2d_image_are_refused(nuclei_sample):
    """(H, W, 3) labels beside an (H, W, 3) image were read as a stack of (W, 3) rows and trained on silently."""
    image, labels = nuclei_sample
    rgb = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
    for im, lab in [(rgb, np.stack([labels] * 3, -1)), (rgb, labels[..., None]), (rgb[..., 0], labels[..., None]),
                    (np.dstack([rgb, rgb[..., :1]]), np.stack([labels] * 4, -1))]:
        with pytest.raises(DataError, match=r"labels must be \(H, W\) for an \(H, W\) or \(H, W, 3\) image"):
            from_arrays(im, lab, 128)
    assert len(from_arrays(rgb, labels, 128)) == 1  # the right shapes still pass


@pytest.mark.parametrize("dtype, big", [(np.uint64, 2**32 + 1), (np.uint32, 3_000_000_000), (np.int64, 2**40)])
def test_ids_beyond_int32_are_renumbered_not_wrapped(nuclei_sample, dtype, big):
    image, labels = nuclei_sample
    lab = labels.astype(dtype)
    lab[labels == 2] = big  # 2**32 + 1 wrapped to 1 (merged with object 1); 3e9 to a negative id
    (s,) = from_arrays(image, lab, max(labels.shape))  # no resize: the labels come back pixel for pixel
    assert s.labels.dtype == np.int32
    np.testing.assert_array_equal(s.labels, np.searchsorted(np.unique(lab), lab))  # the rank of each id, 0 kept
    assert s.ids.size == np.unique(labels).size - 1
    np.testing.assert_array_equal(from_arrays(image, labels, max(labels.shape))[0].labels, labels)  # small: kept


def test_negative_ids_are_refused_with_a_clear_error(nuclei_sample):
    image, labels = nuclei_sample
    lab = labels.astype(np.int32)
    lab[labels == 2] = -5  # crashed deep in the trainer ("'list' argument must have no negative elements")
    with pytest.raises(DataError, match=r"negative ids \(min -5\).*must be >= 0"):
        from_arrays(image, lab, 128)


def _real_samples(img_size: int, n: int = 2):
    d = data_dir("dsb2018_stage1_nuclei_2d")
    files = sorted(d.glob("*_fluo_*_image.png"))[:n]
    return from_arrays([read_image(f) for f in files],
                       [read_image(f.with_name(f.name.replace("_image.png", "_label.tif"))) for f in files], img_size)


def test_non_finite_loss_raises_a_clear_error():
    model = build_sam(SMALL)
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.fill_(float("nan"))
    tr = Trainer(model, _real_samples(128, 1), TrainConfig(steps=1, objects_per_image=2, click_prob=0))
    with pytest.raises(TrainingError, match="non-finite loss"):
        tr.train_step()


# ------------------------------------------------------------------ fine-tuning and resume
@pytest.mark.parametrize("pixel_loss, factor", [("focal", 0.8), ("wbce", 0.95)])
def test_decoder_only_finetuning_lowers_the_loss_on_real_data(pixel_loss, factor):
    torch.manual_seed(0)
    model = build_sam("nsam_t")
    samples = _real_samples(512, 1)
    cfg = TrainConfig(mode="decoder", steps=10, lr=3e-3, warmup_steps=1, objects_per_image=6, click_prob=0,
                      focal_ramp_steps=0, point_prob=0.0, augment=False, pixel_loss=pixel_loss)
    tr = Trainer(model, samples, cfg)
    enc_before = [p.clone() for p in model.image_encoder.parameters()]
    before = tr.eval_loss()
    tr.fit()
    after = tr.eval_loss()
    assert after < factor * before, (before, after)
    assert all(torch.equal(a, b) for a, b in zip(enc_before, model.image_encoder.parameters()))  # frozen


def test_full_finetuning_after_a_decoder_run_trains_the_encoder_again(nuclei_sample):
    """A decoder-only run freezes the encoder; a later full run on the same model object must unfreeze it."""
    image, labels = nuclei_sample
    torch.manual_seed(0)
    model = build_sam(SMALL)
    finetune(model, image, labels, steps=1, mode="decoder", objects_per_image=2)
    enc = [p.clone() for p in model.image_encoder.parameters()]
    finetune(model, image, labels, steps=1, mode="full", lr=1e-3, objects_per_image=2)
    assert all(p.requires_grad for p in model.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(enc, model.image_encoder.parameters())]
    assert sum(changed) > 0.9 * len(changed), (sum(changed), len(changed))


@pytest.mark.parametrize("kw, match", [({"steps": 0}, "steps must be a whole number >= 1, got 0"),
                                       ({"steps": -3}, "steps must be a whole number >= 1, got -3"),
                                       ({"steps": 2.5}, "steps must be a whole number >= 1, got 2.5"),
                                       ({"steps": 1, "lr": -1e-3}, "lr must be a finite number > 0, got -0.001"),
                                       ({"steps": 1, "lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
                                       ({"steps": 1, "lr": float("nan")}, "lr must be a finite number > 0, got nan")])
def test_finetune_refuses_bad_steps_and_learning_rates(nuclei_sample, kw, match):
    """steps=0 / -3 returned [] silently; a negative or NaN lr failed inside torch."""
    image, labels = nuclei_sample
    model = build_sam(SMALL)
    with pytest.raises(ValueError, match=match):
        finetune(model, image, labels, objects_per_image=2, **kw)


def test_quick_eval_prompts_are_the_objects_tight_boxes_and_centre_points_in_xy():
    """quick_eval's prompts in the model's (x, y) frame, against find_objects boxes and the full protocol's
    centre points (napari_sam.core.evaluation.center_point) on real labels."""
    from scipy import ndimage

    from napari_sam.core.evaluation import center_point
    from napari_sam.core.training.validate import quick_eval

    samples = _real_samples(128, 2)
    model = build_sam(SMALL).eval()
    seen: list[dict] = []
    hook = model.prompt_encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    res = quick_eval(model, samples, max_objects=5)
    hook.remove()
    assert res["objects"] == 10 and len(seen) == 4  # a box call and a point call per sample
    for s, box_kw, pt_kw in zip(samples, seen[0::2], seen[1::2]):
        ids = s.ids[:5]
        sl = ndimage.find_objects(s.labels)
        ref_boxes = [[sl[i - 1][1].start, sl[i - 1][0].start, sl[i - 1][1].stop - 1, sl[i - 1][0].stop - 1]
                     for i in ids]  # (x0, y0, x1, y1), max inclusive
        assert box_kw["boxes"].tolist() == ref_boxes and pt_kw["boxes"] is None
        ref_pts = [list(center_point(s.labels == i))[::-1] for i in ids]  # (row, col) -> (x, y)
        assert pt_kw["points"][0][:, 0].tolist() == ref_pts and pt_kw["points"][1].tolist() == [[1]] * len(ids)
        assert all(s.labels[y, x] == i for (x, y), i in zip(ref_pts, ids))


def test_interrupted_run_resumes_exactly(tmp_path):
    samples = _real_samples(128, 2)
    cfg = TrainConfig(mode="scratch", steps=4, objects_per_image=3, max_click_iters=2, click_prob=1.0,
                      warmup_steps=2, log_every=1, ckpt_every_s=1e9, eval_every_s=0)
    torch.manual_seed(0)
    straight = Trainer(build_sam(SMALL), samples, cfg, out_dir=tmp_path / "a")
    straight.fit()
    # the same run, interrupted after 2 steps (cancel), then resumed in a fresh process-like trainer
    torch.manual_seed(0)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    first = Trainer(build_sam(SMALL), samples, cfg, out_dir=tmp_path / "b", should_stop=stop)
    first.fit()
    assert first.step == 2 and (tmp_path / "b" / "last.pt").is_file()
    torch.manual_seed(123)  # a different global state must not matter
    second = Trainer(build_sam(SMALL), samples, cfg, out_dir=tmp_path / "b")
    assert second.resume() and second.step == 2
    second.fit()
    assert second.step == 4
    for (n, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in second.history]
    # a last.pt of another mode, or a damaged one: a clear error naming the file and the way out
    other = Trainer(build_sam(SMALL), samples, TrainConfig(mode="decoder", steps=1, objects_per_image=3),
                    out_dir=tmp_path / "b")
    with pytest.raises(TrainingError, match=r"cannot resume from .*last.pt.*--no-resume"):
        other.resume()
    (tmp_path / "b" / "last.pt").write_bytes(b"truncated")
    with pytest.raises(TrainingError, match="damaged or from a run with another model"):
        second.resume()


# ------------------------------------------------------------------ the built-in architecture's normalisation
def test_per_image_norm_is_what_training_saw_and_ignores_the_batch():
    """nsam_t normalises its conv stages with each image's own statistics: in inference exactly what
    one-image-per-step BatchNorm training computed, whatever else is in the batch. With running statistics
    (MobileSAM's BatchNorm in eval), a dark fluorescence image and a bright brightfield one cannot both fit."""
    from napari_sam.core.modeling.tiny_vit import Conv2d_BN
    from tests.conftest import randomize_

    assert get_config("nsam_t").tv_norm == "image" and get_config("vit_t").tv_norm == "batch"
    d = data_dir("dsb2018_stage1_nuclei_2d")
    files = [sorted(d.glob("*_fluo_*_image.png"))[0], sorted(d.glob("*_color_he_*_image.png"))[0]]
    model = randomize_(build_sam(SMALL), seed=3, std=0.1)
    x = torch.cat([model.preprocess(torch.from_numpy(s.image.copy()).permute(2, 0, 1)[None].float())
                   for s in from_arrays([read_image(f) for f in files],
                                        [np.ones(read_image(f).shape[:2], np.int32) for f in files], 128)])
    assert x[0].mean() < x[1].mean() - 1  # a dark and a bright image
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model.image_encoder(x[i:i + 1]) for i in range(2)])
        together = model.image_encoder(x)
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
        # what training computed: BatchNorm in train mode on one image at a time
        for m in model.image_encoder.modules():
            if isinstance(m, Conv2d_BN):
                m.per_image_norm = False
        model.image_encoder.train()
        trained = torch.cat([model.image_encoder(x[i:i + 1]) for i in range(2)])
        torch.testing.assert_close(alone, trained, rtol=0, atol=1e-4)
        model.image_encoder.eval()  # running statistics (MobileSAM's BatchNorm): a different function
        assert (model.image_encoder(x[:1]) - alone[:1]).abs().max() > 1e-2


# ------------------------------------------------------------------ training on an accelerator
def test_augmentation_of_tensors_matches_that_of_arrays(nuclei_sample):
    """The accelerator path augments device tensors; the same draws must give the CPU path's pixels and labels."""
    from napari_sam.core.training.trainer import augment_pair

    image, labels = nuclei_sample
    labels = labels.astype(np.int32)  # as Sample holds them
    rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
    for seed in range(8):  # every rot90 / flip combination shows up
        a_img, a_lab = augment_pair(rgb, labels, np.random.default_rng(seed))
        t_img, t_lab = augment_pair(torch.from_numpy(rgb.copy()), torch.from_numpy(labels.copy()),
                                    np.random.default_rng(seed))
        assert np.array_equal(t_lab.numpy(), a_lab)
        diff = np.abs(t_img.numpy().astype(int) - a_img.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding at uint8 boundaries only


def test_training_with_images_kept_on_the_device_follows_the_array_path():
    """``data_on_device`` (automatic on CUDA) keeps images as tensors and pads them by an index map: the same
    steps, losses and weights as the numpy path, here both on the CPU."""
    samples = _real_samples(128, 2)
    runs = []
    for on_dev in (False, True):
        cfg = TrainConfig(mode="scratch", steps=3, images_per_step=2, objects_per_image=3, max_click_iters=2,
                          click_prob=1.0, warmup_steps=1, log_every=1, eval_every_s=0, data_on_device=on_dev)
        torch.manual_seed(0)
        tr = Trainer(build_sam(SMALL), samples, cfg)
        assert (tr._on_device is not None) == on_dev
        tr.fit()
        runs.append(tr)
    a, b = runs
    assert [h["objects"] for h in a.history] == [h["objects"] for h in b.history]
    np.testing.assert_allclose([h["loss"] for h in a.history], [h["loss"] for h in b.history], rtol=2e-3)
    for (n, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-4, msg=n)


def test_mixed_precision_steps_keep_fp32_weights_and_match_the_fp32_loss():
    """``amp``: bfloat16 autocast of the forward passes (here on the CPU; the same code runs under CUDA)."""
    samples = _real_samples(128, 2)
    losses = []
    for amp in (False, True):
        torch.manual_seed(0)
        model = build_sam(SMALL)
        before = [p.detach().clone() for p in model.parameters()]
        cfg = TrainConfig(mode="scratch", steps=1, objects_per_image=3, max_click_iters=2, click_prob=1.0,
                          warmup_steps=1, amp=amp, augment=False)
        tr = Trainer(model, samples, cfg)
        model.train()
        losses.append(tr.train_step()["loss"])
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it stepped
    assert losses[1] != losses[0]  # bfloat16 arithmetic did run
    assert np.isfinite(losses[1]) and abs(losses[1] - losses[0]) < 0.05 * abs(losses[0]), losses


# ------------------------------------------------------------------ scale and image-quality augmentation
def _rgb_labels(nuclei_sample):
    image, labels = nuclei_sample
    rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else np.ascontiguousarray(image[..., :3])
    return rgb, labels.astype(np.int32)


def _inner_areas(labels: np.ndarray) -> dict[int, int]:
    """Areas of the objects that do not touch the border."""
    edge = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    ids, counts = np.unique(labels, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts) if i and i not in edge}


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_zoom_scales_objects_and_keeps_image_and_labels_aligned(nuclei_sample, factor):
    from napari_sam.core.training.trainer import zoom_noise_pair

    rgb, labels = _rgb_labels(nuclei_sample)
    img, lab = zoom_noise_pair(rgb, labels, np.random.default_rng(0), zoom_prob=1.0, zoom_range=(factor, factor),
                               noise_prob=0.0)
    h, w = labels.shape
    assert img.dtype == np.uint8 and lab.dtype == np.int32
    assert lab.shape == ((round(h * factor), round(w * factor)) if factor < 1 else (h, w)) == img.shape[:2]
    before, after = _inner_areas(labels), _inner_areas(lab)
    common = [i for i in after if i in before and before[i] >= 100]
    assert len(common) >= 5
    ratios = np.array([after[i] / before[i] for i in common])
    assert abs(np.median(ratios) / factor**2 - 1) < 0.1
    for i in common:  # each object's mean brightness moves with it: image and labels stay aligned
        assert abs(float(img[lab == i].mean()) - float(rgb[labels == i].mean())) < 12


def test_zoom_and_noise_give_the_same_result_on_tensors_as_on_arrays(nuclei_sample):
    from napari_sam.core.training.trainer import zoom_noise_pair

    rgb, labels = _rgb_labels(nuclei_sample)
    changed = 0
    for seed in range(6):
        a_img, a_lab = zoom_noise_pair(rgb, labels, np.random.default_rng(seed), 0.7, (0.6, 1.7), 0.7)
        t_img, t_lab = zoom_noise_pair(torch.from_numpy(rgb.copy()), torch.from_numpy(labels.copy()),
                                       np.random.default_rng(seed), 0.7, (0.6, 1.7), 0.7)
        assert np.array_equal(t_lab.numpy(), a_lab) and np.array_equal(t_img.numpy(), a_img)
        changed += a_img.shape != rgb.shape or not np.array_equal(a_img, rgb)
    assert changed >= 3


def test_noise_changes_pixels_not_labels(nuclei_sample):
    from napari_sam.core.training.trainer import zoom_noise_pair

    rgb, labels = _rgb_labels(nuclei_sample)
    img, lab = zoom_noise_pair(rgb, labels, np.random.default_rng(1), zoom_prob=0.0, noise_prob=1.0)
    assert np.array_equal(lab, labels)
    d = img.astype(float) - rgb.astype(float)
    assert 0.5 < d.std() < 40 and abs(d.mean()) < 3
    assert np.array_equal(img[..., 0], img[..., 1])  # grey stays grey: one noise field for every channel


def test_training_with_zoom_samples_objects_present_after_the_zoom():
    samples = _real_samples(128, 2)
    cfg = TrainConfig(mode="scratch", steps=4, images_per_step=2, objects_per_image=4, warmup_steps=1, log_every=1,
                      eval_every_s=0, zoom_prob=1.0, zoom_range=(1.7, 1.7), noise_prob=0.5, click_prob=0.0)
    torch.manual_seed(0)
    tr = Trainer(build_sam(SMALL), samples, cfg)
    tr.fit()
    assert len(tr.history) == 4 and all(np.isfinite(h["loss"]) and h["objects"] >= 2 for h in tr.history)
    # every sampled id is present in its zoomed labels (else its target would be empty and its IoU 0)
    lab = np.zeros((60, 60), np.int32)
    lab[5:15, 5:15], lab[40:58, 40:58] = 3, 7
    assert set(tr._objects_in(lab)) == {3, 7}
