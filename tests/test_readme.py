"""The README's usage example runs as written (on the CPU reference path here)."""
import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = re.search(r"## Use\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert tuple(scope["o"].shape) == (2, 64, 4, 128)
    assert tuple(scope["state"].shape) == (2, 4, 128, 128)
