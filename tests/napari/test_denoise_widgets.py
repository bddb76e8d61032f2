"""The "denoise σ" control: one viewer-wide setting shown by the annotator, segment-everything and 3D widgets,
applied to the shared model (stale embeddings dropped), kept across model switches unless a checkpoint brings
its own."""

from __future__ import annotations

import copy

import numpy as np
import pytest

napari = pytest.importorskip("napari")

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def widgets(make_napari_viewer, qtbot, tiny_model):
    from napari_sam._widgets._state import get_state

    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((4, 32, 32), np.uint8), name="stack")
    state = get_state(viewer)
    state.set_model(copy.deepcopy(tiny_model), "random nsam_t")  # the session model is never changed
    out = {}
    for name in ("SAM annotator", "Segment everything", "3D propagation"):
        dw, out[name] = viewer.window.add_plugin_dock_widget("napari-sam", name)
        qtbot.waitUntil(dw.isVisible, timeout=5000)
    return state, out


def _spins(out):
    return [out["SAM annotator"].ui.denoise_spin, out["Segment everything"].denoise_spin,
            out["3D propagation"].denoise_spin]


def test_one_setting_for_every_widget(widgets, tiny_model):
    from napari_sam.core import set_denoise

    state, out = widgets
    assert [s.value() for s in _spins(out)] == [0.0, 0.0, 0.0]
    key = state.model_key
    state.embeddings.put("old", object())
    _spins(out)[2].setValue(2.0)  # set in the 3D widget ...
    assert state.denoise == 2.0 and state.model.denoise == 2.0
    assert [s.value() for s in _spins(out)] == [2.0, 2.0, 2.0]  # ... shown everywhere
    assert state.model_key > key and "old" not in state.embeddings  # embeddings of the old setting are gone
    plain = copy.deepcopy(tiny_model)
    state.set_model(plain, "another")  # a model without its own setting takes the viewer's
    assert plain.denoise == 2.0
    tuned = set_denoise(copy.deepcopy(tiny_model), 3.0)
    state.set_model(tuned, "tuned")  # a checkpoint saved with a sigma brings it
    assert state.denoise == 3.0 and [s.value() for s in _spins(out)] == [3.0, 3.0, 3.0]
    out["SAM annotator"].set_denoise(0)  # the annotator's scripting API
    assert tuned.denoise == 0.0 and [s.value() for s in _spins(out)] == [0.0, 0.0, 0.0]


def test_set_before_any_model_is_loaded(make_napari_viewer, qtbot):
    from napari_sam._widgets._state import get_state

    viewer = make_napari_viewer(show=True)
    dw, w = viewer.window.add_plugin_dock_widget("napari-sam", "Segment everything")
    w.denoise_spin.setValue(1.5)
    state = get_state(viewer)
    assert state.model is None and state.denoise == 1.5
    with pytest.raises(ValueError, match="between 0"):
        state.set_denoise(-1)
    assert state.denoise == 1.5
    from napari_sam._widgets.propagate import run_embedding

    vol = np.random.default_rng(0).integers(0, 255, (2, 24, 24)).astype(np.uint8)
    out = run_embedding(vol, None, lambda: False, lambda done, total: None, denoise=state.denoise)
    assert out["model"].denoise == 1.5  # the built-in model a worker loads lazily gets the viewer's setting
