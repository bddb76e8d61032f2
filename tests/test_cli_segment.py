"""``napari-sam segment`` and ``napari-sam demo`` on real files with a random-weight checkpoint (plumbing):
outputs equal the API's, 2D and stacks, resumable, a corrupt file reported without stopping the batch."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import data_dir, read_image
from napari_sam.cli import main
from napari_sam.core import save_checkpoint

PARAMS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
          "--box-nms-thresh", "1.0", "--min-object-area", "0"]


@pytest.fixture(scope="module")
def ckpt(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(tiny_model, path)
    return path


def test_batch_stack_resume_and_corrupt_file(ckpt, tiny_model, tmp_path, capsys):
    from napari_sam import segment_everything

    d = data_dir("dsb2018_stage1_nuclei_2d")
    png = d / "00_fluo_c35e6e3e_image.png"
    img = read_image(png)
    stack_path = tmp_path / "in" / "stack.tif"
    stack_path.parent.mkdir()
    stack = np.stack([img[:96, :128], img[96:192, :128]])
    tifffile.imwrite(stack_path, stack)
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "out"
    rc = main(["segment", str(png), str(tmp_path / "in"), "--out", str(out), "--model", str(ckpt), *PARAMS,
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1  # one file failed, the others are done
    assert "broken.png: error" in err and "failed: " in err
    lab2d = tifffile.imread(out / "00_fluo_c35e6e3e_image_labels.tif")
    labz = tifffile.imread(out / "stack_labels.tif")
    assert lab2d.shape == img.shape[:2] and labz.shape == stack.shape
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
              min_object_area=0)
    assert np.array_equal(lab2d, segment_everything(img, tiny_model, **kw))
    assert np.array_equal(labz[1], segment_everything(stack[1], tiny_model, **kw))
    assert not (out / "broken_labels.tif").exists()
    assert not list(out.glob(".*partial"))
    # resume: finished outputs are skipped, the broken file is retried and reported again
    mtime = (out / "stack_labels.tif").stat().st_mtime_ns
    rc = main(["segment", str(png), str(tmp_path / "in"), "--out", str(out), "--model", str(ckpt), *PARAMS])
    err = capsys.readouterr().err
    assert rc == 1 and "2 already done (skipped), 1 to segment" in err
    assert (out / "stack_labels.tif").stat().st_mtime_ns == mtime


def test_bad_arguments(ckpt, tmp_path, capsys):
    assert main(["segment", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    img = tmp_path / "a.tif"
    tifffile.imwrite(img, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    assert main(["segment", str(img), "--out", str(tmp_path / "o"), "--model", str(ckpt),
                 "--pred-iou-thresh", "2"]) == 2
    assert "pred_iou_thresh" in capsys.readouterr().err
    assert main(["segment", str(img), "--out", str(tmp_path / "o"), "--model", str(ckpt), "--rescore"]) == 2
    assert "rescore=True needs a candidate scorer" in capsys.readouterr().err
    assert main(["segment", str(img), "--out", str(tmp_path / "o"), "--model", str(ckpt),
                 "--min-object-area", "-5"]) == 2  # a bad argument, said once: not a bad file
    err = capsys.readouterr().err
    assert "--min-object-area must be >= 0" in err and "fix or remove the file" not in err


def test_demo_writes_labels_and_overlay(ckpt, tmp_path, capsys):
    import imageio.v3 as iio

    rc = main(["demo", "--out", str(tmp_path), "--model", str(ckpt), *PARAMS, "--quiet"])
    assert rc == 0
    lab = tifffile.imread(tmp_path / "labels.tif")
    over = iio.imread(tmp_path / "overlay.png")
    assert lab.shape == (512, 512) and over.shape == (512, 512, 3)
    assert lab.max() >= 1
    assert "objects" in capsys.readouterr().err


def test_bad_paths_give_a_message_and_lose_nothing(ckpt, tmp_path, capsys):
    """Inputs whose outputs would share a name are refused before anything runs (one result would overwrite the
    other); evaluate's --out may not be the .md table's name nor a folder; a file that is not an image gives a
    one-line error, not a traceback."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        tifffile.imwrite(tmp_path / sub / "x.tif", np.zeros((32, 32), np.uint16))
    out = tmp_path / "o"
    assert main(["segment", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "x_labels.tif" in err and "separate --out folders" in err and not out.exists()
    d = data_dir("isbi2012_em_neurites_2d")
    res = tmp_path / "res"
    res.mkdir()
    for bad, says in ((res / "y.md", "give it a .json name"), (res, "is a folder")):
        assert main(["evaluate", "--images", str(d), "--out", str(bad), "--model", str(ckpt)]) == 2
        assert says in capsys.readouterr().err
    assert list(res.iterdir()) == []
    for flag in ("--max-objects", "--slices"):
        assert main(["evaluate", "--images", str(d), "--out", str(res / "r.json"), flag, "-1"]) == 2
        assert f"{flag} must be >= 1" in capsys.readouterr().err
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    tifffile.imwrite(stacks / "a_image.tif", np.zeros((2, 32, 32), np.uint16))
    tifffile.imwrite(stacks / "a_label.tif", np.ones((3, 32, 32), np.uint16))
    assert main(["evaluate", "--images", str(stacks), "--out", str(res / "r.json"), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "a_label.tif has shape (3, 32, 32) but a_image.tif has (2, 32, 32)" in err and "Traceback" not in err
    csv_path = tmp_path / "notes.csv"
    csv_path.write_text("name,split\na,test\n")
    assert main(["evaluate", "--images", str(d), "--split-csv", str(csv_path), "--split", "test",
                 "--out", str(res / "r.json"), "--model", str(ckpt)]) == 2
    assert "has no id column" in capsys.readouterr().err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    assert main(["demo", "--image", str(junk), "--out", str(tmp_path / "d"), "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-sam demo: error:") and "Traceback" not in err and len(err.splitlines()) == 1
