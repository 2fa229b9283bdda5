"""Embeds files with a trained model and compares them.

    python -m unialign_jax.embed --workdir=W --modality=audio one.wav two.wav    # similarity matrix
    python -m unialign_jax.embed --workdir=W --modality=audio one.wav --against_modality=image \
        --against=digit.png,other.png                                          # audio rows x image columns
    python -m unialign_jax.embed --workdir=W --modality=audio one.wav --classes=zero,one,two   # zero-shot
    python -m unialign_jax.embed --workdir=W --modality=audio one.wav two.wav --output=emb.npy

`--workdir` is a training workdir or an export directory (`unialign_jax.export`; `--backbone=FILE`
for a UniAlign export's frozen backbone). Accepted files per modality: `unialign_jax.inputs` (wav,
PNG, .npy, .npz). The similarity is the cosine of the embeddings (`unialign_jax.load`); `--output`
writes float32[N, D] to a `.npy` file, or to a `.npz` file with the file names and the method's
extras (CMG/COMET: `codes`). A user error (a bad file, an unknown modality or stage) prints one
`error: ...` line and exits with status 2.
"""

from __future__ import annotations

import functools

import numpy as np
from absl import flags

from unialign_jax import inference
from unialign_jax import cli
from unialign_jax import report
from unialign_jax.inputs import InputError, check_paths


def encode_files(model: inference.TrainedModel, modality: str, paths: list[str]) -> tuple[list[str], dict]:
    """(row names: a path, or `path[i]` for a file of several examples, {'embedding': [N, D], ...})."""
    names, parts = [], []
    for path in paths:
        inputs = model.inputs(modality, [path])
        names += [path] if len(inputs) == 1 else [f"{path}[{i}]" for i in range(len(inputs))]
        parts.append(model.encode(modality, inputs))
    return names, {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def similarity_table(rows: list[str], columns: list[str], similarity: np.ndarray) -> str:
    table = [{"": name, **{column: float(value) for column, value in zip(columns, line)}}
             for name, line in zip(rows, similarity)]
    return report.format_table(table, ["", *columns])


def run(argv: list[str], options) -> str:
    """The CLI's output for file arguments `argv` and parsed `options` (flags.FLAGS)."""
    if not argv:
        raise InputError("no input files: pass one or more files after the flags")
    if options.output and not options.output.endswith((".npy", ".npz")):
        raise InputError(f"--output={options.output}: name a .npy or .npz file")
    against = options.against.split(",") if options.against else []
    check_paths([*argv, *against])
    model = inference.load(options.workdir, options.stage, backbone=options.backbone)
    names, encoded = encode_files(model, options.modality, argv)
    if options.output:
        if options.output.endswith(".npy"):
            np.save(options.output, encoded["embedding"])
        else:
            np.savez(options.output, files=np.asarray(names), **encoded)
        return f"wrote {len(names)} {options.modality} embeddings of size {encoded['embedding'].shape[1]} to " \
               f"{options.output}"
    if options.classes:
        classes = [name.strip() for name in options.classes.split(",")]
        result = model.classify(options.modality, encoded["embedding"], classes)
        rows = [{"file": name, "label": label, "similarity": float(line.max())}
                for name, label, line in zip(names, result.labels, result.similarity)]
        return report.format_table(rows, ["file", "label", "similarity"])
    if against:
        columns, compared = encode_files(model, options.against_modality or options.modality, against)
        return similarity_table(names, columns, model.similarity(encoded["embedding"], compared["embedding"]))
    return similarity_table(names, names, model.similarity(encoded["embedding"], encoded["embedding"]))


def main(argv):
    print(run(argv[1:], flags.FLAGS))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The CLI's flags (defined when run as a program, not at import; tests parse into their own)."""
    define = functools.partial(flags.DEFINE_string, flag_values=flag_values)
    define("workdir", None, "A workdir of unialign_jax.train or an export of unialign_jax.export.")
    define("modality", None, "The modality of the files.")
    define("stage", None, "The stage to use (default: the last finished one).")
    define("backbone", None, "An export's frozen backbone weights (default: where training found them).")
    define("classes", None, "Comma-separated class names: print each file's zero-shot label.")
    define("against", None, "Comma-separated files to compare with (the similarity's columns).")
    define("against_modality", None, "The modality of --against (default: --modality).")
    define("output", None, "Write the embeddings to this .npy (or .npz) file instead of printing.")
    flags.mark_flags_as_required(["workdir", "modality"], flag_values=flag_values)

if __name__ == "__main__":
    define_flags()
    cli.run(main)
