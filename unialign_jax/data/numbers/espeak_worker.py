"""Renders espeak-ng utterances in a clean process, one forked child per group (run by `spoken.render`).

libespeak-ng's output depends on the process's history (the same text comes out a few samples
longer or shorter after other utterances, or after other native code ran), so the renderings of a
build are made here: a fresh process that loads only numpy, scipy and `digits/speech.py` (by file,
not through the package, whose import loads JAX), initialises espeak-ng once and forks one child per
group; each child starts from the same state and renders its group in order. A group's samples are
thus a function of the group alone.

    stdin:  JSON [[[text, voice, rate, pitch], ...], ...]      (groups of utterances)
    stdout: an .npz with 'g<group>_<item>' float64[num_samples] and 'sample_rate'
"""

import importlib.util
import io
import json
import os
import pathlib
import sys
import tempfile

import numpy as np


def _speech_module():
    path = pathlib.Path(__file__).resolve().parents[1] / "digits" / "speech.py"
    spec = importlib.util.spec_from_file_location("_numbers_espeak_speech", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    groups = json.load(sys.stdin)
    synthesizer = _speech_module().EspeakSynthesizer()
    arrays = {"sample_rate": np.asarray(synthesizer.sample_rate)}
    with tempfile.TemporaryDirectory() as folder:
        for index, group in enumerate(groups):
            path = os.path.join(folder, f"{index}.npz")
            pid = os.fork()
            if pid == 0:  # the child: render, write, leave without running the parent's cleanup
                code = 1
                try:
                    np.savez(path, *[synthesizer.render_text(*item) for item in group])
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise RuntimeError(f"espeak-ng worker: rendering group {index} ({group[:1]}...) failed")
            with np.load(path) as stored:
                arrays.update({f"g{index}_{item}": stored[f"arr_{item}"] for item in range(len(group))})
    output = io.BytesIO()
    np.savez(output, **arrays)
    sys.stdout.buffer.write(output.getvalue())


if __name__ == "__main__":
    main()
