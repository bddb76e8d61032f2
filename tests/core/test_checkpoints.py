"""Checkpoints: local paths anywhere a name works, round trips, and clear errors for every broken case."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sam.core import CheckpointError, SamPredictor, get_config, load_model, save_checkpoint
from napari_sam.core import checkpoints as ck
from napari_sam.core.build import infer_config

from conftest import randomize_


@pytest.fixture(scope="module")
def official_vit_t(tmp_path_factory, mobile_reference):
    """A file in MobileSAM's own format (plain state dict, ImageNet head included), random weights."""
    ref = mobile_reference.sam_model_registry["vit_t"](checkpoint=None)
    randomize_(ref, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "mobile_sam_random.pt"
    torch.save(ref.state_dict(), path)
    return path, ref.state_dict()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(ck.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_info(monkeypatch, tmp_path: Path, payload: bytes, name: str = "vit_t", sha: str | None = None,
               size: int | None = None, url: str | None = None) -> ck.CheckpointInfo:
    src = tmp_path / "server" / "model.pt"
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(payload)
    info = ck.CheckpointInfo(name, url or src.as_uri(), "model.pt", sha or hashlib.sha256(payload).hexdigest(),
                             len(payload) if size is None else size)
    monkeypatch.setitem(ck.CHECKPOINTS, name, info)
    return info


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv(ck.CACHE_ENV, str(tmp_path / "x"))
    assert ck.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(ck.CACHE_ENV)
    assert ck.cache_dir().name == "napari-sam"


def test_local_official_file_works_wherever_a_name_does(official_vit_t):
    path, sd = official_vit_t
    for m in (load_model(path), load_model(str(path)), load_model("vit_t", checkpoint=path),
              load_model(checkpoint=path), SamPredictor(path).model):
        assert m.config.name == "vit_t" and not m.training
        own = m.state_dict()
        assert set(own) == {k for k in sd if not k.startswith(("image_encoder.head.", "image_encoder.norm_head."))}
        assert all(torch.equal(own[k], sd[k]) for k in own)


def test_infer_config_from_keys(official_vit_t):
    assert infer_config(official_vit_t[1]).name == "vit_t"
    for name in ("vit_b", "vit_l", "vit_h"):
        dim = get_config(name).vit_embed_dim
        sd = {"image_encoder.pos_embed": torch.empty((1, 64, 64, dim), device="meta"),
              "image_encoder.blocks.0.attn.qkv.weight": torch.empty((3 * dim, dim), device="meta")}
        assert infer_config(sd).name == name
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        infer_config({"foo.weight": torch.zeros(1)})


def test_save_load_round_trip(tiny_model, tmp_path, nuclei_sample):
    path = save_checkpoint(tiny_model, tmp_path / "sub" / "m.pt", epoch=3)
    m = load_model(path)
    assert m.config == tiny_model.config and m.checkpoint_meta == {"epoch": 3}
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    image = nuclei_sample[0]
    a, b = SamPredictor(tiny_model), SamPredictor(m)
    a.set_image(image)
    b.set_image(image)
    pa, pb = a.predict(points=[[40, 50]]), b.predict(points=[[40, 50]])
    np.testing.assert_array_equal(pa.low_res_logits, pb.low_res_logits)
    half = load_model(save_checkpoint(tiny_model, tmp_path / "h.pt", half=True))
    assert half.image_encoder.neck[0].weight.dtype == torch.float32
    assert (tmp_path / "h.pt").stat().st_size < 0.6 * path.stat().st_size


def test_truncated_file(official_vit_t, tmp_path):
    data = official_vit_t[0].read_bytes()
    bad = tmp_path / "mobile_sam.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    assert str(bad) in str(e.value) and "truncated" in str(e.value)
    junk = tmp_path / "notes.pt"
    junk.write_bytes(b"\x80\x02 not a checkpoint at all")  # a pickle torch refuses: one short line, no advice pages
    with pytest.raises(CheckpointError) as e:
        load_model(junk)
    assert len(str(e.value).splitlines()) == 1 and "weights_only" not in str(e.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="unknown model 'vit_z'"):
        load_model("vit_z")


def test_checkpoint_of_another_model_type(official_vit_t, tiny_model, tmp_path):
    path = official_vit_t[0]
    with pytest.raises(CheckpointError) as e:
        load_model("vit_b", checkpoint=path)
    assert "vit_t" in str(e.value) and "vit_b" in str(e.value) and str(path) in str(e.value)
    ours = save_checkpoint(tiny_model, tmp_path / "nsam.pt")
    with pytest.raises(CheckpointError, match="nsam_t checkpoint, not vit_t"):
        load_model("vit_t", checkpoint=ours)
    # a state dict whose keys do not fit the architecture: the message names what was found
    sd = {k: v for k, v in official_vit_t[1].items() if "mask_decoder" not in k}
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*mask_decoder"):
        load_model(tmp_path / "partial.pt")


def test_download_with_progress_and_hash(official_vit_t, cache, tmp_path, monkeypatch):
    payload = official_vit_t[0].read_bytes()
    _fake_info(monkeypatch, tmp_path, payload)
    calls = []
    m = load_model("vit_t", progress=lambda done, total: calls.append((done, total)))
    assert m.config.name == "vit_t"
    assert (cache / "model.pt").read_bytes() == payload
    assert calls and calls[-1] == (len(payload), len(payload))
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    # second use: no download, file verified from the cache
    calls.clear()
    assert ck.get_checkpoint("vit_t", progress=lambda *a: calls.append(a)) == cache / "model.pt"
    assert not calls


def test_wrong_hash_is_rejected_and_removed(cache, tmp_path, monkeypatch):
    info = _fake_info(monkeypatch, tmp_path, b"not really a checkpoint" * 100, sha="0" * 64)
    with pytest.raises(CheckpointError) as e:
        ck.get_checkpoint("vit_t")
    msg = str(e.value)
    assert "sha256" in msg and "0" * 64 in msg and info.url in msg
    assert not (cache / "model.pt").exists()


def test_truncated_cached_file_names_size_and_url(cache, tmp_path, monkeypatch):
    payload = b"x" * 1000
    info = _fake_info(monkeypatch, tmp_path, payload)
    cache.mkdir(parents=True)
    (cache / "model.pt").write_bytes(payload[:400])
    with pytest.raises(CheckpointError) as e:
        ck.get_checkpoint("vit_t")
    assert "400 bytes" in str(e.value) and "truncated" in str(e.value) and info.url in str(e.value)


def test_offline_download_says_where_to_put_the_file(cache, tmp_path, monkeypatch):
    _fake_info(monkeypatch, tmp_path, b"abc", url="http://127.0.0.1:9/model.pt")  # nothing listens on port 9
    with pytest.raises(CheckpointError) as e:
        load_model("vit_t")
    msg = str(e.value)
    assert "offline" in msg and str(cache / "model.pt") in msg and ck.CACHE_ENV in msg
    assert not list(cache.glob("*.part"))
    with pytest.raises(CheckpointError, match="download it from"):
        ck.get_checkpoint("vit_t", download=False)


def test_registry_is_consistent():
    for name, info in ck.CHECKPOINTS.items():
        assert info.model == name and name in ck.CHECKPOINTS
        assert len(info.sha256) == 64 and int(info.sha256, 16) >= 0
        assert info.url.endswith(info.filename) and info.size > 10**7
        get_config(name)


def test_builtin_missing_is_a_clear_error(monkeypatch, tmp_path):
    from napari_sam.core import build

    monkeypatch.setattr(build, "builtin_checkpoint_path", lambda: tmp_path / "builtin_nuclei.pt")
    with pytest.raises(CheckpointError, match="built-in model file .* is missing"):
        load_model()
