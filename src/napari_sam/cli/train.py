"""``napari-sam train``: train from scratch or fine-tune on image + label folders; resumable, time-boxable."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
import threading
import time

from . import add_denoise_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model on image + instance-label pairs",
                       description=__doc__)
    p.add_argument("--images", required=True, help="image folder (or a dsb2018_full-style root with --split-csv)")
    p.add_argument("--labels", default=None, help="label folder (default: the image folder, *_label.tif)")
    p.add_argument("--split-csv", default=None, help="split CSV (id,split,modality); images/<id>.png, labels/<id>.tif")
    p.add_argument("--split", default="train", help="split to train on (with --split-csv)")
    p.add_argument("--val-split", default="val", help="split to validate on (with --split-csv)")
    p.add_argument("--val-limit", type=int, default=24, help="number of validation images (fixed subset)")
    p.add_argument("--val-images", default=None, help="validation image folder (without --split-csv)")
    p.add_argument("--val-labels", default=None)
    p.add_argument("--model", default="nsam_t", help="config name (scratch) or model name / checkpoint (fine-tune)")
    p.add_argument("--mode", default="scratch", choices=("scratch", "full", "decoder"))
    p.add_argument("--out", required=True, help="run folder: last.pt (resume), best.pt, final.pt, history.jsonl")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--images-per-step", type=int, default=1)
    p.add_argument("--objects", type=int, default=10, help="objects per image per step")
    p.add_argument("--point-prob", type=float, default=0.5,
                   help="share of steps whose first prompt is a point (the rest: a noisy box)")
    p.add_argument("--click-prob", type=float, default=0.5,
                   help="share of steps that continue with corrective clicks")
    p.add_argument("--click-iters", type=int, default=3, help="max corrective-click iterations per step")
    p.add_argument("--grad-all-iters", action="store_true",
                   help="back-propagate every click iteration (default: the first and the last only)")
    p.add_argument("--edit-prob", type=float, default=0.0,
                   help="share of steps that are negative-click lessons: a neighbour taken in and removed by a "
                        "negative click, or a negative click inside the object carving it")
    p.add_argument("--encoder-lr-mult", type=float, default=1.0,
                   help="the image encoder's learning rate as a multiple of --lr (fine-tuning: keep it low)")
    p.add_argument("--pixel-loss", default="wbce", choices=("wbce", "focal"),
                   help="wbce: object-weighted BCE + dice (default; learns from scratch); focal: the paper's "
                        "20*focal + dice")
    p.add_argument("--focal-ramp", type=int, default=400, help="steps over which the focal term is ramped in")
    p.add_argument("--focal-balanced", action="store_true",
                   help="class-balanced focal term (object and background halves; no alpha)")
    p.add_argument("--focal-start-iou", type=float, default=0.0,
                   help="start the focal ramp only once the running first-prompt IoU reaches this (0: at step 0)")
    p.add_argument("--zoom-prob", type=float, default=0.0,
                   help="share of training images zoomed by a random factor in [0.6, 1.7] (scale augmentation)")
    p.add_argument("--noise-prob", type=float, default=0.0,
                   help="share of training images blurred and given Gaussian noise (image-quality augmentation)")
    p.add_argument("--eval-every-min", type=float, default=10.0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--ckpt-every-min", type=float, default=5.0)
    add_denoise_argument(p, "the fine-tuned checkpoint's, 0 from scratch; saved in the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bfloat16 autocast of the forward passes, fp32 weights and losses (GPU)")
    p.add_argument("--device", default="auto",
                   help="cuda, mps or cpu (default auto: an accelerator when there is one). On an accelerator the "
                        "training images are kept and augmented there")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from napari_sam.core.build import set_denoise
    from napari_sam.core.image import denoise_of, max_upscale_of
    from napari_sam.core.training import TrainConfig, Trainer, make_model
    from napari_sam.core.training.data import load_folder, load_split_folder

    for flag in ("steps", "log_every", "images_per_step", "objects"):
        value = getattr(args, flag, None)
        if value is not None and not value > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model(args.model, args.mode, args.device)
    print(f"training on {model.device}", flush=True)
    if args.denoise is not None:
        set_denoise(model, args.denoise)
    size, prep = model.img_size, dict(denoise=denoise_of(model), max_upscale=max_upscale_of(model))  # as at inference
    t0 = time.time()
    if args.split_csv:
        train = load_split_folder(args.images, args.split, size, csv_path=args.split_csv, **prep)
        val = load_split_folder(args.images, args.val_split, size, limit=args.val_limit,
                                csv_path=args.split_csv, **prep) if args.val_split else []
    else:
        train = load_folder(args.images, args.labels, size, **prep)
        val = load_folder(args.val_images, args.val_labels, size, **prep)[: args.val_limit] if args.val_images else []
    print(f"loaded {len(train)} training and {len(val)} validation images in {time.time() - t0:.1f} s", flush=True)
    cfg = TrainConfig(mode=args.mode, steps=args.steps, max_minutes=args.max_minutes, lr=args.lr,
                      warmup_steps=args.warmup, images_per_step=args.images_per_step, objects_per_image=args.objects,
                      max_click_iters=args.click_iters, grad_all_iters=args.grad_all_iters,
                      edit_prob=args.edit_prob, amp=args.amp, encoder_lr_mult=args.encoder_lr_mult,
                      point_prob=args.point_prob, click_prob=args.click_prob, focal_ramp_steps=args.focal_ramp,
                      focal_start_iou=args.focal_start_iou, focal_balanced=args.focal_balanced,
                      pixel_loss=args.pixel_loss, seed=args.seed,
                      zoom_prob=args.zoom_prob, noise_prob=args.noise_prob, eval_every_s=60 * args.eval_every_min,
                      log_every=args.log_every, ckpt_every_s=60 * args.ckpt_every_min)
    meta = {"command": "napari-sam " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "data": f"{args.images} split={args.split if args.split_csv else 'all'}", "train_config": vars(cfg)}
    stop = []  # SIGTERM (a cluster's time limit, kill) or Ctrl-C: finish the step, save, and exit
    trainer = Trainer(model, train, cfg, val=val, out_dir=args.out, meta=meta,
                      progress=lambda rec: print(json.dumps(rec), flush=True), should_stop=lambda: bool(stop))
    if not args.no_resume and trainer.resume():
        print(f"resumed from {args.out}/last.pt at step {trainer.step}", flush=True)
    with _stop_on_signals(stop):
        trainer.fit()
    if stop:
        print(f"stopped at step {trainer.step} ({stop[0]}); the state is saved in {args.out}/last.pt: run the same "
              "command to resume", file=sys.stderr, flush=True)
        return 1
    print(f"done: step {trainer.step}, best val score {trainer.best:.4f}", flush=True)
    return 0


@contextlib.contextmanager
def _stop_on_signals(stop: list):
    """While training: SIGTERM or SIGINT appends its name to ``stop`` (the trainer stops after its step and saves);
    a second one interrupts at once (the state is still saved)."""
    def ask(signum, _frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)
        print(f"{stop[0]}: stopping after this step (again to stop at once)", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    old = {s: signal.signal(s, ask) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
