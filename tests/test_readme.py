"""The README's user-code example runs as written, and its quick-start commands match CI (its "Use a
trained model" section runs in test_embed.py, on tiny workdirs)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_example_runs():
    library = README.split("## Using the library from your own code\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", library, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_quick_start_has_two_commands_and_ci_runs_the_test_command():
    quick_start = README.split("## Quick start", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", quick_start, flags=re.S).group(1).strip().splitlines()
    assert len(commands) == 2
    assert "python -m unialign_jax.train --config=configs/" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
