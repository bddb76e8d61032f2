"""Shared fixtures: the real data folder, reference packages, small random-weight models."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():  # CI clones main next to shared/
    DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_dir(name: str = "") -> Path:
    """Path to ../shared/data/<name>; skips the test with a clear reason when it is absent."""
    p = DATA / name
    if not p.exists():
        pytest.skip(f"real data folder {p} is absent (tests need ../shared/data next to the repo)")
    return p


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets a fresh napari-sam cache folder (embedding stores, checkpoints) instead of the user's."""
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path_factory.mktemp("nsam-cache")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return data_dir()


def read_image(path: Path) -> np.ndarray:
    if path.suffix in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    import imageio.v3 as iio

    return iio.imread(path)


@pytest.fixture(scope="session")
def nuclei_sample():
    """One real DSB2018 fluorescence image (uint8 RGB) and its instance labels."""
    d = data_dir("dsb2018_stage1_nuclei_2d")
    return read_image(d / "00_fluo_c35e6e3e_image.png"), read_image(d / "00_fluo_c35e6e3e_label.tif")


def _install_reference_stubs() -> None:
    """Minimal torchvision/timm stand-ins so Meta's and MobileSAM's packages import (torchvision cannot
    be installed beside torch 2.13 CPU; see ../shared/docs/ENVIRONMENT.md §6). Tested in test_reference_stubs."""
    if "torchvision" not in sys.modules:
        from PIL import Image

        tv = types.ModuleType("torchvision")
        ops = types.ModuleType("torchvision.ops")
        boxes = types.ModuleType("torchvision.ops.boxes")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")

        def box_area(b):
            return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

        def batched_nms(boxes, scores, idxs, iou_threshold):
            if boxes.numel() == 0:
                return torch.empty((0,), dtype=torch.int64, device=boxes.device)
            offs = idxs.to(boxes) * (boxes.max() + 1)
            b = boxes + offs[:, None]
            order = torch.argsort(scores, descending=True)
            keep = []
            area = box_area(b)
            suppressed = torch.zeros(len(b), dtype=torch.bool)
            for i in order.tolist():
                if suppressed[i]:
                    continue
                keep.append(i)
                lt = torch.maximum(b[i, :2], b[:, :2])
                rb = torch.minimum(b[i, 2:], b[:, 2:])
                wh = (rb - lt).clamp(min=0)
                inter = wh[:, 0] * wh[:, 1]
                iou = inter / (area[i] + area - inter)
                suppressed |= iou > iou_threshold
            return torch.tensor(keep, dtype=torch.int64, device=boxes.device)

        def resize(img, size, *args, **kwargs):
            h, w = size
            if img.size == (w, h):
                return img
            return img.resize((w, h), Image.BILINEAR)

        boxes.box_area = box_area
        boxes.batched_nms = batched_nms
        ops.boxes = boxes
        ops.box_area = box_area
        ops.batched_nms = batched_nms
        functional.resize = resize
        functional.to_pil_image = Image.fromarray
        transforms.functional = functional
        tv.ops = ops
        tv.transforms = transforms
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
                            "torchvision.transforms": transforms, "torchvision.transforms.functional": functional})
    if "timm" not in sys.modules:
        timm = types.ModuleType("timm")
        models = types.ModuleType("timm.models")
        layers = types.ModuleType("timm.models.layers")
        registry = types.ModuleType("timm.models.registry")

        class DropPath(torch.nn.Identity):
            def __init__(self, *args, **kwargs):
                super().__init__()

        layers.DropPath = DropPath
        layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        layers.trunc_normal_ = torch.nn.init.trunc_normal_
        registry.register_model = lambda f: f
        models.layers = layers
        models.registry = registry
        timm.models = models
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                            "timm.models.registry": registry})


@pytest.fixture(scope="session")
def reference():
    """Meta's ``segment_anything`` package (predictor, AMG, builders), or skip if not installed."""
    if importlib.util.find_spec("segment_anything") is None:
        pytest.skip("segment-anything==1.0 is not installed (pip install -e '.[testing]')")
    _install_reference_stubs()
    import segment_anything

    return segment_anything


@pytest.fixture(scope="session")
def mobile_reference():
    """MobileSAM's reference package (``mobile_sam``), or skip if not installed."""
    if importlib.util.find_spec("mobile_sam") is None:
        pytest.skip("mobilesam-mirror==1.0.0 is not installed (pip install -e '.[testing]')")
    _install_reference_stubs()
    import mobile_sam

    return mobile_sam


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter and BatchNorm statistic with seeded noise (random-weight plumbing tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * std)
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """A small random-weight model of our own architecture (fast on CPU): plumbing tests only."""
    from napari_sam.core import build_sam, get_config

    return randomize_(build_sam(get_config("nsam_t")), seed=1).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (small models gain nothing from a second one; on a shared 2-core
    machine it only adds contention). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def whole_across_tiles(gt: np.ndarray, lab: np.ndarray, borders=(256, 512)) -> tuple[int, int]:
    """(how many, of how many): the true objects of ``gt`` (H, W) that cross a tile border (a row or column index in
    ``borders``: the object has pixels on both sides of it, next to each other) and come out whole in ``lab`` (its
    label covering most of the object has IoU > 0.7 with it)."""
    crossing = set()
    for b in borders:
        if b < gt.shape[0]:
            crossing |= set(gt[b - 1][gt[b - 1] == gt[b]].tolist())
        if b < gt.shape[1]:
            crossing |= set(gt[:, b - 1][gt[:, b - 1] == gt[:, b]].tolist())
    crossing.discard(0)
    whole = 0
    for g in crossing:
        m = gt == g
        ids, counts = np.unique(lab[m], return_counts=True)
        k = ids[np.argmax(counts)]
        whole += bool(k) and (m & (lab == k)).sum() / (m | (lab == k)).sum() > 0.7
    return int(whole), len(crossing)
