import sys, threading, time, traceback
import numpy as np
from annotator_helpers import annotator, model, wait_idle  # noqa
from test_annotator_responsive import Heartbeat

def test_watch(annotator, qtbot):
    viewer, w = annotator
    qtbot.wait(200)
    main = threading.main_thread().ident
    stop = [False]
    reports = []
    t0 = time.perf_counter()
    w.add_point((10, 10)); qtbot.wait(300); w.clear_prompts(); qtbot.wait(300); wait_idle(qtbot, w)
    print("warmup done", time.perf_counter()-t0)
    t0 = time.perf_counter()
    with Heartbeat() as hb:
        def watch():
            while not stop[0]:
                time.sleep(0.02)
                if time.perf_counter() - hb.last > 0.08:
                    fr = traceback.extract_stack(sys._current_frames()[main])
                    ours = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in fr if 'napari_sam' in f.filename or 'test_' in f.filename]
                    reports.append((round(time.perf_counter()-t0,3), round(time.perf_counter()-hb.last,3), ours[-3:], f"{fr[-1].filename.split('site-packages/')[-1]}:{fr[-1].lineno} {fr[-1].name}"))
                    time.sleep(0.05)
        th = threading.Thread(target=watch, daemon=True); th.start()
        w.add_point((60, 140))
        qtbot.waitUntil(lambda: w._embed_worker is not None, timeout=5000)
        w.add_point((200, 60)); w.toggle_polarity(); w.add_point((90, 170))
        wait_idle(qtbot, w)
        w.commit()
        qtbot.wait(100)
    stop[0] = True
    print("MAXGAP", hb.max_gap)
    for r in reports: print(r)
