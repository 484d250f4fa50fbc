"""The README's self-contained Python examples (marked `<!-- test: run -->`) run as written."""

import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"<!-- test: run -->\n```python\n(.*?)```", text, flags=re.S)


def test_readme_has_runnable_examples():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_python_block_runs(index):
    code = _blocks()[index]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what matters is that the examples run, not how fast
    try:
        exec(compile(code, f"README.md runnable block {index}", "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
