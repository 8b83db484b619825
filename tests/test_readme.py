"""The README's examples run as written (on the CPU reference path here)."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    example = re.search(r"## Use\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert tuple(scope["o"].shape) == (2, 64, 4, 128)
    assert tuple(scope["state"].shape) == (2, 4, 128, 128)


def test_readme_models_example_runs(capsys):
    pytest.importorskip("transformers")
    example = re.search(r"## Models\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope = {}
    exec(compile(example, "README.md (Models)", "exec"), scope)
    assert tuple(scope["out"].shape) == (2, 12)
    assert torch.equal(scope["out"][:, :8], scope["prompt"])  # generate returns the prompt, then the new tokens
    assert "torch.Size([2, 12])" in capsys.readouterr().out
