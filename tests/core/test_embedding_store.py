"""Stack embeddings on disk: reuse, staleness, crash recovery, unusable cache folders (real GoNuclear crops)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from napari_sam.core import SamConfig, build_sam
from napari_sam.core.embedding_store import (
    EmbeddingCacheWarning,
    StackEmbeddings,
    clean_cache,
    embeddings_dir,
    select_volume,
    validate_stack,
)
from napari_sam.core.predictor import SamPredictor

from conftest import data_dir, randomize_, read_image

# a small TinyViT-style encoder at 128 px (8x8 grid): plumbing only, fast on 2 cores
SMALL = SamConfig("store_test", "tiny_vit", img_size=128, tv_embed_dims=(16, 32, 64), tv_depths=(1, 1, 1),
                  tv_num_heads=(1, 2, 2), tv_window_sizes=(7, 4, 4), tv_merge_strides=(2, 2),
                  prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stack():
    vol = read_image(data_dir("gonuclear_3d_nuclei") / "1135_crop_image.tif")
    return np.ascontiguousarray(vol[40:45, 20:84, 10:90])  # (5, 64, 80) uint8, real nuclei


@pytest.fixture(scope="module")
def model():
    return randomize_(build_sam(SMALL), seed=3, std=0.5).eval()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NAPARI_SAM_EMBED_CACHE_MB", raising=False)
    return tmp_path / "cache" / "embeddings"


def count_encoder_calls(model):
    calls = []
    handle = model.image_encoder.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    return calls, handle


def test_compute_store_and_reopen_without_encoder(stack, model, cache):
    emb = StackEmbeddings(stack, model)
    assert not emb.in_memory and emb.path.parent == cache == embeddings_dir()
    progress = list(emb.compute(batch_size=2))  # (done, total) after each batch
    assert progress == [(0, 5), (2, 5), (4, 5), (5, 5)]
    import zarr

    stored = zarr.open_group(str(emb.path), mode="r")["features"]
    assert stored.dtype == np.float16 and stored.shape == (5, 32, 8, 8)
    calls, h = count_encoder_calls(model)
    try:
        again = StackEmbeddings(stack.copy(), model)  # equal data, another array object
        assert again.path == emb.path and again.missing() == []
        for z in range(5):
            assert torch.equal(again[z].features, emb[z].features)
        assert calls == []  # nothing was recomputed
    finally:
        h.remove()


def test_embeddings_match_the_predictor(stack, model):
    emb = StackEmbeddings(stack, model).compute_all()
    pred = SamPredictor(model)
    for z in (0, 3):
        ref = pred.compute_embedding(stack[z])
        got = emb[z]
        assert got.original_size == ref.original_size == (64, 80) and got.input_size == ref.input_size
        # only float16 rounding apart; exactly the float16 of the reference up to batching noise
        np.testing.assert_allclose(got.features.numpy(), ref.features.half().float().numpy(), atol=2e-3, rtol=2e-3)
        assert got.features.abs().max() > 0.1  # not a trivially small embedding


def test_changed_data_or_weights_never_reuse_a_stale_cache(stack, model):
    first = StackEmbeddings(stack, model).compute_all()
    changed = stack.copy()
    changed[2, 10:14, 10:14] = 255 - changed[2, 10:14, 10:14]  # a 4x4 patch of one slice
    second = StackEmbeddings(changed, model)
    assert second.key != first.key and second.missing() == list(range(5))
    assert not torch.equal(second[2].features, first[2].features)
    other = randomize_(build_sam(SMALL), seed=4, std=0.5).eval()
    assert StackEmbeddings(stack, other).key != first.key
    with torch.no_grad():  # fine-tuning changes weights in place: the key must follow
        next(model.parameters()).add_(0.01)
    try:
        assert StackEmbeddings(stack, model).key != first.key
    finally:
        with torch.no_grad():
            next(model.parameters()).sub_(0.01)


def test_torn_chunk_is_detected_and_recomputed(stack, model):
    emb = StackEmbeddings(stack, model).compute_all()
    good = emb[1].features.clone()
    chunk = emb.path / "features" / "c" / "1" / "0" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))  # crash mid-write
    reopened = StackEmbeddings(stack, model)
    with pytest.warns(EmbeddingCacheWarning, match="slice 1 .* damaged"):
        got = reopened[1].features
    assert torch.equal(got, good)
    assert chunk.read_bytes() == data  # rewritten


def test_half_written_store_is_rebuilt(stack, model):
    emb = StackEmbeddings(stack, model)
    list(emb.compute(slices=[0, 1]))
    (emb.path / "zarr.json").write_text("{ truncated")  # metadata torn by a crash
    with pytest.warns(EmbeddingCacheWarning, match="damaged or incomplete; rebuilding"):
        again = StackEmbeddings(stack, model)
    assert again.missing() == list(range(5)) and not again.in_memory
    assert torch.equal(again[0].features, emb[0].features)


def test_unwritable_cache_folder_falls_back_to_memory(stack, model, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(blocker))
    with pytest.warns(EmbeddingCacheWarning, match="cannot use the embedding cache folder"):
        emb = StackEmbeddings(stack, model)
    assert emb.in_memory
    ref = StackEmbeddings(stack, model, cache=False)[2].features
    assert torch.equal(emb[2].features, ref)


def test_size_limit_and_lru_clean_up(stack, model, cache):
    per_stack = 5 * 32 * 8 * 8 * 2
    with pytest.warns(EmbeddingCacheWarning, match="more than the cache limit"):
        assert StackEmbeddings(stack, model, max_bytes=per_stack // 2).in_memory
    a = StackEmbeddings(stack, model).compute_all()
    os.utime(a.path / "last_used", (1, 1))  # a is the least recently used
    b = StackEmbeddings(stack[::-1].copy(), model).compute_all()
    assert a.path.exists() and b.path.exists()
    limit = int(per_stack * 2.5)  # room for two stores and metadata: opening a third evicts a, not b
    c = StackEmbeddings(stack[:, ::-1].copy(), model, max_bytes=limit)
    assert not a.path.exists() and b.path.exists() and c.path.exists()
    assert clean_cache(0, keep=(c.key,)) == [b.path] and c.path.exists()
    # a folder of the user's in the cache folder (e.g. --cache-dir pointed at a results folder) is never deleted
    mine = c.path.parent / "my_results"
    mine.mkdir()
    (mine / "big.bin").write_bytes(b"x" * (4 * per_stack))
    assert clean_cache(0) == [c.path] and (mine / "big.bin").exists()


def test_cancel_keeps_finished_slices(stack, model):
    emb = StackEmbeddings(stack, model)
    seen = []
    for done, _total in emb.compute(batch_size=1, cancel=lambda: len(seen) >= 3):
        seen.append(done)
    assert seen == [0, 1, 2] and emb.missing() == [2, 3, 4]
    assert StackEmbeddings(stack, model).missing() == [2, 3, 4]  # persisted


def test_cancel_acts_while_the_stack_is_read(stack, model, cache):
    """Reading a large stack for its cache key takes seconds; Cancel stops it between slices (before, only once
    the whole stack was hashed), and no store is made."""
    from napari_sam.core.embedding_store import EmbeddingCancelled, volume_hash

    asked = []

    def cancelled():
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(EmbeddingCancelled):
        volume_hash(stack, cancelled)
    assert len(asked) == 3  # asked before each slice, stopped before the third
    with pytest.raises(EmbeddingCancelled):
        StackEmbeddings(stack, model, cancelled=lambda: True)
    assert not cache.exists() or not any(cache.iterdir())
    assert volume_hash(stack, lambda: False) == volume_hash(stack)


def test_bad_stacks_and_indices(stack, model):
    with pytest.raises(ValueError, match="2D image"):
        validate_stack(stack[0])
    with pytest.raises(ValueError, match="looks like one RGB"):
        validate_stack(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(T, Z, Y, X\)"):
        validate_stack(np.zeros((2, 3, 16, 16), np.uint8))
    emb = StackEmbeddings(stack, model, cache=False)
    with pytest.raises(IndexError, match="slice 5 is outside the stack"):
        emb[5]
    with pytest.raises(ValueError, match="NaN"):
        StackEmbeddings(np.full((2, 8, 8), np.nan, np.float32), model, cache=False)
    tzyx = np.stack([stack, stack[::-1]])
    assert np.array_equal(select_volume(tzyx, (1, 2, 0, 0)), stack[::-1])
    single = StackEmbeddings(stack[:1], model, cache=False)  # a single-slice stack is a valid stack
    assert single[0].features.shape == (1, 32, 8, 8)


def test_float_stacks_share_one_contrast(stack, model):
    vol = stack.astype(np.float32) * 10.0
    vol[0] *= 0.1  # a darker slice stays darker: normalisation is stack-wide, not per slice
    emb = StackEmbeddings(vol, model, cache=False)
    img0, img1 = emb._slice(0), emb._slice(1)
    assert img0.dtype == np.uint8 and img0.shape == (64, 80, 3)
    assert img0.mean() < 0.5 * img1.mean()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb[0]


def test_cli_embed_precomputes_the_cache(stack, model, tmp_path, capsys):
    import tifffile

    from napari_sam.cli import main
    from napari_sam.core import save_checkpoint

    path, ckpt = tmp_path / "stack.tif", tmp_path / "small.pt"
    tifffile.imwrite(path, stack)
    save_checkpoint(model, ckpt)
    assert main(["embed", str(path), "--model", str(ckpt), "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]) == 0
    assert "5 slices" in capsys.readouterr().out
    reopened = StackEmbeddings(stack, model, cache=tmp_path / "c")
    fresh = StackEmbeddings(stack, model, cache=False)[4].features
    assert reopened.missing() == [] and torch.equal(reopened[4].features, fresh)
    assert main(["embed", str(tmp_path / "nope.tif")]) == 2  # a clear error, no traceback
    assert "does not exist" in capsys.readouterr().err
    from napari_sam.core.propagation_views import view_embeddings

    args = ["embed", str(path), "--model", str(ckpt), "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    assert main(args + ["--views", "--spacing", "2", "1", "1"]) == 0  # the orthogonal views' planes too
    out = capsys.readouterr().out
    assert "XZ planes" in out and "YZ planes" in out
    xz, yz = view_embeddings(StackEmbeddings(stack, model, cache=tmp_path / "c"), (2, 1, 1), 2, 2.0)
    assert xz.missing() == [] and yz.missing() == [] and xz.volume.shape[1] == 10  # z: 5 slices -> 10 rows
    assert main(args + ["--views", "--spacing", "0", "1", "1"]) == 2
    assert "spacing" in capsys.readouterr().err


def test_write_failure_midway_keeps_going_in_memory(stack, model):
    import shutil

    emb = StackEmbeddings(stack, model)
    first = emb[0].features.clone()
    chunks = emb.path / "features" / "c"
    shutil.rmtree(chunks)
    chunks.write_text("blocks new chunk folders, like a full or read-only disk would")
    with pytest.warns(EmbeddingCacheWarning, match="writing the embedding cache .* failed"):
        emb[1]
    assert emb.in_memory and emb.missing() == [2, 3, 4]
    with pytest.warns(EmbeddingCacheWarning, match="slice 0 .* damaged"):  # its chunk went with the folder
        assert torch.equal(emb[0].features, first)  # recomputed in memory, never wrong
    assert emb.missing() == [2, 3, 4]


def test_a_slice_edited_in_place_is_never_stored_under_the_old_key(stack, model):
    """The key is the hash of the data when the stack is opened; a slice edited in place afterwards (the volume is
    a live view) raises StackChanged when it is embedded or checked, and nothing of it is stored: a later session on
    the original data never gets the edited slice's embedding."""
    from napari_sam.core.embedding_store import StackChanged

    vol = stack.copy()
    emb = StackEmbeddings(vol, model)
    emb[0]  # embedded and stored before the edit
    vol[:] = vol[:, ::-1]  # e.g. flipped in place from the napari console
    with pytest.raises(StackChanged, match="slice 2 of the stack changed after it was opened"):
        emb[2]
    with pytest.raises(StackChanged, match="slice 0"):
        emb.check_slice(0)  # a stored slice is checked on request (one slice's hash)
    assert emb.missing() == [1, 2, 3, 4]
    reopened = StackEmbeddings(stack, model)  # the original data, as a later session opens it
    assert reopened.missing() == [1, 2, 3, 4]
    np.testing.assert_array_equal(reopened.features(2), StackEmbeddings(stack, model, cache=False).features(2))
    edited = StackEmbeddings(vol, model)  # opened again: its own key, embeds the new pixels
    assert edited.key != emb.key and edited.missing() == [0, 1, 2, 3, 4]
    edited.check_slice(2)
    np.testing.assert_array_equal(edited.features(2), StackEmbeddings(vol.copy(), model, cache=False).features(2))
