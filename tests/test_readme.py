"""The README's Python examples run as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_python_block_runs(index):
    code = _blocks()[index]
    if "vae_ext.models" in code:
        pytest.importorskip("vae_ext.models")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})
