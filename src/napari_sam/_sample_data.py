"""Sample images for the annotator (bundled with scikit-image: no download, works offline)."""

from __future__ import annotations


def ihc_nuclei():
    """Immunohistochemistry of a colon tissue section (512, 512, 3) uint8 RGB: hematoxylin-stained nuclei."""
    from skimage import data

    return [(data.immunohistochemistry(), {"name": "IHC nuclei", "rgb": True})]


def hematoxylin_channel():
    """The hematoxylin (nuclear stain) channel of the IHC sample, (512, 512) float32 in [0, 1]."""
    import numpy as np
    from skimage import color, data

    h = color.rgb2hed(data.immunohistochemistry())[..., 0]
    h = (h - h.min()) / (h.max() - h.min())
    return [(h.astype(np.float32), {"name": "hematoxylin", "colormap": "gray"})]


def phase_contrast_cell():
    """A phase-contrast light micrograph of one cell (660, 550) uint8 grayscale."""
    from skimage import data

    return [(data.cell(), {"name": "cell"})]
