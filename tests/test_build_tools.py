"""tools/cuda_toolkit.py: how setup.py and the CUDA emulation find the toolkit."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import cuda_toolkit  # noqa: E402


def _fake_toolkit(root):
    for rel in ("bin/nvcc", "include/cuda_runtime.h", "include/crt/host_defines.h"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return root


def test_toolkit_behind_a_wrapper_script(tmp_path, monkeypatch):
    real = _fake_toolkit(tmp_path / "cuda-99.0")
    wrapper_dir = tmp_path / "wrapper" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec "{real}/bin/nvcc" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    # dirname(dirname(which nvcc)) is tmp/wrapper, which holds no toolkit: the script names the real one
    assert cuda_toolkit.find_cuda_home() == os.path.realpath(real)
    assert cuda_toolkit.cuda_include_dir() == os.path.realpath(real / "include")


def test_cuda_home_wins(tmp_path, monkeypatch):
    real = _fake_toolkit(tmp_path / "mine")
    monkeypatch.setenv("CUDA_HOME", str(real))
    assert cuda_toolkit.find_cuda_home() == os.path.realpath(real)


def test_no_toolkit(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cuda_toolkit.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(cuda_toolkit.os.path, "isfile",
                        lambda p, _isfile=os.path.isfile: _isfile(p) and not p.startswith("/usr/local/cuda"))
    assert cuda_toolkit.find_cuda_home() is None
