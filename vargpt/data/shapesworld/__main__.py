"""``python -m vargpt.data.shapesworld --out DIR --n-train N --n-test M [--seed S] [--image-size 32]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from vargpt.data.shapesworld.generate import write_dataset


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, write the dataset and print its counts as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m vargpt.data.shapesworld", description=__doc__)
    parser.add_argument("--out", required=True, help="dataset folder (created if needed)")
    parser.add_argument("--n-train", type=int, required=True, help="number of training images")
    parser.add_argument("--n-test", type=int, required=True, help="number of test images")
    parser.add_argument("--seed", type=int, default=0, help="everything is a function of the seed")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--binding-questions", action="store_true",
                        help="train split: ask every question type about each object of a two-object image, "
                             "not about one of them")
    parser.add_argument("--plain-classes", action="store_true",
                        help="give the generation records the class \"{colour} {shape}\" instead of "
                             "\"{size} {colour} {shape} {position}\" (the image they ask for, with its layout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = write_dataset(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                           image_size=args.image_size, progress=not args.no_progress,
                           binding_questions=args.binding_questions, layout_classes=not args.plain_classes)
    sys.stdout.write(json.dumps(counts) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
