"""Converts pre-extracted features (npy / npz / h5) into the array_record dataset `features`.

    python -m unialign_jax.data.convert --name=vatex --data_dir=/data/tfds \
        --split=train=/data/vatex/train.h5 --split=test=/data/vatex/test.h5 [--class_names=classes.txt]

Then train with the data config `{name: 'features', data_dir: '/data/tfds', dataset: 'vatex'}`.
Input layouts and checks: `unialign_jax/data/features/__init__.py`. Problems in the inputs are
listed with their file, example index and id, and nothing is written (exit status 1).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from unialign_jax import cli
from unialign_jax import logs
from unialign_jax.data import features


def _split_argument(text: str) -> tuple[str, str]:
    split, separator, path = text.partition("=")
    if not separator or not split or not path:
        raise argparse.ArgumentTypeError(f"expected SPLIT=PATH (e.g. train=/data/train.npz), got {text!r}")
    return split, path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m unialign_jax.data.convert", description=__doc__.split("\n\n")[0],
        epilog="Input layouts: see unialign_jax/data/features/__init__.py.",
    )
    parser.add_argument("--name", required=True, help="dataset name (the data config's `dataset`)")
    parser.add_argument("--split", action="append", type=_split_argument, required=True, metavar="SPLIT=PATH",
                        help="a split and its input (.npz, .h5, folder of .npy, or folder with labels.csv); repeat")
    parser.add_argument("--data_dir", default=None,
                        help="tfds data dir (default: $UNIALIGN_DATA_DIR or ~/.cache/unialign_jax/tfds)")
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument("--num_classes", type=int, default=None, help="label space size (default: max label + 1)")
    classes.add_argument("--class_names", type=pathlib.Path, default=None,
                         help="text file with one class name per line, in label order")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the conversion; returns the exit status (0 converted, 2 bad inputs or arguments)."""
    args = parse_args(argv)
    logs.setup()
    splits = dict(args.split)
    if len(splits) != len(args.split):
        print(f"error: a split is given twice: {[split for split, _ in args.split]}", file=sys.stderr)
        return 2
    try:
        class_names = None
        if args.class_names is not None:
            class_names = [line.strip() for line in args.class_names.read_text().splitlines() if line.strip()]
        path = features.convert(
            args.name, splits, data_dir=args.data_dir, num_classes=args.num_classes, class_names=class_names,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as error:  # FeatureInputError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    logs.logger.info("Converted %s -> %s (data config: name='features', dataset=%r)", splits, path, args.name)
    return 0


if __name__ == "__main__":
    cli.guard(main)
