"""``napari-sam`` command line: one sub-module per command, each with ``register(subparsers)``.

Commands: segment (batch segment-everything), train, evaluate, demo (headless main job).
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

COMMANDS = ("demo", "segment", "train", "evaluate", "embed")


def add_denoise_argument(p: argparse.ArgumentParser, default_text: str = "the checkpoint's") -> None:
    """``--denoise SIGMA``: the model's Gaussian smoothing before the encoder (see napari_sam.set_denoise)."""
    p.add_argument("--denoise", type=float, default=None, metavar="SIGMA",
                   help="Gaussian sigma in image pixels that smooths each image or slice before the encoder, for "
                        f"noisy data such as confocal stacks (try 1-3); default: {default_text} (0 = off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-sam", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = import_module(f"napari_sam.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"napari_sam.cli.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"napari-sam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written: say which, without a traceback
        from napari_sam.core.messages import first_line

        print(f"napari-sam {args.command}: error: {first_line(e)} (is the file an image, readable, not damaged? Is the "
              "output path writable?)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
