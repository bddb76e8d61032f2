"""Denoising preprocessing (``model.denoise``): exact references for the smoothing, one setting that reaches every
path (2D predictor, stack embeddings and their cache key, checkpoints, fine-tuning data, CLI), bad values, and
the gain it gives the trained built-in model on real noisy confocal slices (GoNuclear)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import data_dir, read_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ref_uint8(plane: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(np.rint(gaussian_filter(plane.astype(np.float32), sigma, mode="reflect")), 0, 255).astype(np.uint8)


@pytest.fixture
def noisy():
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (70, 90)).astype(np.uint8)


@pytest.fixture
def model(tiny_model):
    return copy.deepcopy(tiny_model)  # the session model stays without denoising


def test_denoise_plane_exact_references(noisy):
    from napari_sam.core.image import denoise_plane

    assert denoise_plane(noisy, 0) is noisy  # off: the very same array
    out = denoise_plane(noisy, 1.5)
    assert out.dtype == np.uint8 and np.array_equal(out, _ref_uint8(noisy, 1.5))  # uint8 stays uint8, same range
    f = noisy.astype(np.float64) * 3.7 - 100
    assert np.allclose(denoise_plane(f, 2), gaussian_filter(f.astype(np.float32), 2), atol=1e-4)
    rgb = np.zeros((70, 90, 3), np.uint8)
    rgb[..., 1] = noisy
    out = denoise_plane(rgb, 1)  # channels are smoothed alone, never mixed
    assert not out[..., 0].any() and not out[..., 2].any()
    assert np.array_equal(out[..., 1], _ref_uint8(noisy, 1))
    assert np.abs(out[..., 1].astype(float) - 127.5).std() < noisy.std()  # it does smooth


def test_to_rgb_uint8_smooths_before_normalising(noisy):
    from napari_sam.core.image import _normalise, to_rgb_uint8

    assert np.array_equal(to_rgb_uint8(noisy, denoise=2)[..., 0], _ref_uint8(noisy, 2))
    u16 = noisy.astype(np.uint16) * 200
    ref = _normalise(gaussian_filter(u16.astype(np.float32), 2).astype(np.float64), 0.5, 99.5)
    assert np.array_equal(to_rgb_uint8(u16, denoise=2)[..., 0], ref)
    assert np.array_equal(to_rgb_uint8(noisy), to_rgb_uint8(noisy, denoise=0))


def test_the_model_setting_reaches_the_predictor(model, noisy):
    from napari_sam.core import SamPredictor, set_denoise
    from napari_sam.core.image import denoise_plane

    p = SamPredictor(model)
    plain = p.compute_embedding(noisy).features
    smoothed_input = p.compute_embedding(denoise_plane(noisy, 2)).features
    set_denoise(model, 2)
    assert torch.equal(p.compute_embedding(noisy).features, smoothed_input)
    assert not torch.equal(smoothed_input, plain)
    set_denoise(model, 0)
    assert torch.equal(p.compute_embedding(noisy).features, plain)


def test_stack_embeddings_use_it_and_key_on_it(model, tmp_path):
    from napari_sam.core import SamPredictor, set_denoise
    from napari_sam.core.embedding_store import StackEmbeddings
    from napari_sam.core.image import denoise_plane

    vol = read_image(data_dir("gonuclear_3d_nuclei") / "1135_crop_image.tif")[40:43, :64, :64]
    plain = StackEmbeddings(vol, model, cache=tmp_path)
    set_denoise(model, 1.5)
    smooth = StackEmbeddings(vol, model, cache=tmp_path)
    assert smooth.key != plain.key  # a cache written without denoising is never reused with it
    assert StackEmbeddings(vol, model, cache=tmp_path).key == smooth.key  # same setting, same store
    ref = SamPredictor(copy.deepcopy(model))
    ref.model.denoise = 0.0
    want = ref.compute_embedding(denoise_plane(vol[1], 1.5)).features.half().float()  # the store keeps float16
    assert torch.equal(smooth[1].features, want)
    assert not torch.equal(plain[1].features, smooth[1].features)


def test_checkpoints_carry_it(model, tmp_path):
    from napari_sam.core import load_model, save_checkpoint, set_denoise

    set_denoise(model, 2.5)
    path = save_checkpoint(model, tmp_path / "noisy.pt")
    assert load_model(path, device="cpu").denoise == 2.5
    assert load_model(path, device="cpu", denoise=0).denoise == 0.0  # an explicit choice wins
    set_denoise(model, 0)
    assert load_model(save_checkpoint(model, tmp_path / "plain.pt"), device="cpu").denoise == 0.0


def test_finetuning_data_is_smoothed_like_inference(noisy):
    from napari_sam.core.training.data import from_arrays

    labels = np.zeros(noisy.shape, np.int32)
    labels[10:30, 20:50] = 1
    plain, smooth = from_arrays([noisy], [labels], 90), from_arrays([noisy], [labels], 90, denoise=2)
    assert np.array_equal(plain[0].image[..., 0], noisy)  # 90 px: no resizing
    assert np.array_equal(smooth[0].image[..., 0], _ref_uint8(noisy, 2))


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), 100, "strong", None])
def test_bad_values_name_the_fix(model, bad):
    from napari_sam.core import set_denoise

    with pytest.raises(ValueError, match="denoise=.*(between 0|a number)"):
        set_denoise(model, bad)
    assert model.denoise == 0.0


def test_cli_rejects_a_bad_sigma(tmp_path, capsys, noisy):
    import imageio.v3 as iio

    from napari_sam.cli import main

    iio.imwrite(tmp_path / "x.png", noisy)
    assert main(["segment", str(tmp_path / "x.png"), "--out", str(tmp_path / "out"), "--denoise", "-2"]) == 2
    assert "denoise=-2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


def test_denoising_helps_the_builtin_model_on_noisy_confocal_slices():
    """GoNuclear's raw channel is noisy; the built-in model was trained on clean DSB2018 images. Crop 1135 (the
    crop the sigma was chosen on), every 10th slice, up to 8 nuclei each: one click and box mIoU must rise."""
    from napari_sam.core import load_model
    from napari_sam.core.evaluation import evaluate_dataset

    d = data_dir("gonuclear_3d_nuclei")
    vol, gt = read_image(d / "1135_crop_image.tif"), read_image(d / "1135_crop_label.tif")
    items = [(str(z), vol[z], gt[z], "") for z in range(0, 100, 10)]
    res = {s: evaluate_dataset(load_model(denoise=s, device="cpu"), items, prompts=("point", "box"),
                               max_objects=8).summary()["all"] for s in (0, 2)}
    assert res[0]["objects"] == res[2]["objects"] >= 50
    assert res[2]["point"] >= res[0]["point"] + 0.15, res
    assert res[2]["box"] >= res[0]["box"] + 0.05, res
