"""napari widgets (thin; they delegate to napari_sam.core)."""
