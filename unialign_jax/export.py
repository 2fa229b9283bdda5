"""Exports the trained parts of a finished stage: safetensors weights and a JSON manifest.

    python -m unialign_jax.export --workdir=workdirs/comet_vt_at_it --out=exports/comet [--stage=NAME]

writes `weights.safetensors` and `manifest.json` into `--out` (a new or empty directory; format:
`unialign_jax.trained`). UniAlign's frozen pretrained backbone is left out (the manifest names it
and holds its fingerprint); `unialign_jax.load(out, backbone=FILE)` or the embed CLI's
`--backbone=FILE` read it back. A user error prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import functools

from absl import flags

from unialign_jax import cli
from unialign_jax import trained
from unialign_jax.inputs import InputError


def main(argv):
    if len(argv) > 1:
        raise InputError(f"unexpected arguments {argv[1:]}")
    options = flags.FLAGS
    print(f"exported to {trained.write_export(options.workdir, options.out, options.stage)}")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The CLI's flags (defined when run as a program, not at import; tests parse into their own)."""
    define = functools.partial(flags.DEFINE_string, flag_values=flag_values)
    define("workdir", None, "A workdir written by unialign_jax.train.")
    define("out", None, "The export directory to write (new or empty).")
    define("stage", None, "The stage to export (default: the last finished one).")
    flags.mark_flags_as_required(["workdir", "out"], flag_values=flag_values)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
