"""Registry of official checkpoints, the cache folder, and verified downloads (no GUI here)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "NAPARI_SAM_CACHE_DIR"


@dataclass(frozen=True)
class CheckpointInfo:
    model: str  # config name in MODEL_CONFIGS
    url: str
    filename: str
    sha256: str
    size: int  # bytes


# sha256 and byte sizes cross-checked against several independent public listings of the official files
# (e.g. micro-sam's checksum table for all four, download scripts quoting Content-Length); not downloaded here.
CHECKPOINTS: dict[str, CheckpointInfo] = {
    "vit_h": CheckpointInfo(
        "vit_h", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2564550879),
    "vit_l": CheckpointInfo(
        "vit_l", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth", "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1249524607),
    "vit_b": CheckpointInfo(
        "vit_b", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375042383),
    "vit_t": CheckpointInfo(
        "vit_t", "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt", "mobile_sam.pt",
        "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", 40728226),
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or of another model; the message says how to fix it."""


def cache_dir() -> Path:
    """Folder for downloaded checkpoints and caches: $NAPARI_SAM_CACHE_DIR, else the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif os.uname().sysname == "Darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "napari-sam"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, info: CheckpointInfo) -> None:
    """Raise CheckpointError if ``path`` is truncated or its hash differs from the registry."""
    size = path.stat().st_size
    if size != info.size:
        raise CheckpointError(
            f"{path} has {size} bytes but {info.filename} has {info.size} (truncated or another file). "
            f"Delete it and download again from {info.url}"
        )
    digest = sha256_file(path)
    if digest != info.sha256:
        raise CheckpointError(
            f"{path} has sha256 {digest}, expected {info.sha256} for {info.filename}. "
            f"Delete it and download again from {info.url}"
        )


def get_checkpoint(
    name: str,
    progress: Callable[[int, int], None] | None = None,
    download: bool = True,
    verify: bool = True,
) -> Path:
    """Path to the verified official checkpoint ``name``, downloading it into :func:`cache_dir` if needed.

    ``progress(done_bytes, total_bytes)`` is called during the download. Offline, or with a damaged file,
    raises CheckpointError naming the file, the URL, and the folder to put it in.
    """
    if name not in CHECKPOINTS:
        raise CheckpointError(f"no official checkpoint named {name!r}; known: {sorted(CHECKPOINTS)}")
    info = CHECKPOINTS[name]
    path = cache_dir() / info.filename
    if path.exists():
        if verify:
            verify_file(path, info)
        return path
    if not download:
        raise CheckpointError(f"{info.filename} is not in {path.parent}; download it from {info.url} and put it there")
    _download(info, path, progress)
    if verify:
        try:
            verify_file(path, info)
        except CheckpointError:
            path.unlink(missing_ok=True)
            raise
    return path


def _download(info: CheckpointInfo, path: Path, progress: Callable[[int, int], None] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=info.filename, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(info.url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or info.size)
            done = 0
            while block := resp.read(1 << 20):
                out.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
        shutil.move(tmp, path)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(
            f"could not download {info.filename} from {info.url} ({e}). If this machine is offline, download "
            f"the file elsewhere and put it at {path} (or set {CACHE_ENV}), or pass its path as the model"
        ) from e
