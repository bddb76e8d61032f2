"""Make the README screenshot of the SAM annotator at work (docs/images/annotator.png).

Run under a display, e.g.:  xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python scripts/screenshot.py
Uses the built-in model (``--model PATH`` for another checkpoint). Opens the bundled IHC sample
(or ``--image FILE``), commits a few clicked objects, and leaves one preview with prompts on screen.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin", help="builtin, vit_t/b/l/h or a checkpoint path")
    ap.add_argument("--image", default=None, help="an image file instead of the IHC sample")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images" / "annotator.png"))
    args = ap.parse_args(argv)

    import imageio.v3 as iio
    import napari
    from scipy import ndimage

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    if args.image:
        img = iio.imread(args.image)
        viewer.add_image(img, name=Path(args.image).stem, rgb=img.ndim == 3 and img.shape[-1] in (3, 4))
    else:
        viewer.open_sample("napari-sam", "ihc")
    image = viewer.layers[-1]
    _, w = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    w.set_model(args.model)
    w.wait(600)
    w.set_image_layer(image)
    # click the centres of the strongest nuclear-stain blobs
    data = np.asarray(image.data)
    if data.ndim == 3:  # RGB: the hematoxylin (nuclear stain) channel
        from skimage.color import rgb2hed

        gray = rgb2hed(data[..., :3])[..., 0]
    else:
        gray = data.astype(np.float32)
    smooth = ndimage.gaussian_filter(gray, 4)
    peaks = (smooth == ndimage.maximum_filter(smooth, 25)) & (smooth > np.percentile(smooth, 97))
    centres = [tuple(int(v) for v in c) for c in np.argwhere(peaks)][:8]
    committed = []
    for rc in centres[:-1]:
        w.add_point(rc)
        w.wait(120)
        committed += w.commit()
    w.add_point(centres[-1])
    w.wait(120)
    viewer.layers.selection.active = w.points_layer
    shot = viewer.screenshot(canvas_only=False, flash=False)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.out, shot)
    print(f"saved {args.out} {shot.shape}; committed objects {committed}; status: {w.ui.status_label.text()}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
