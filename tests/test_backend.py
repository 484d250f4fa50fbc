"""Backend selection: the extension when it loads and supports the input, the
reference otherwise; VAE_EXT_BACKEND and use_backend override it."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vae_ext
from conftest import EXT, requires_ext
from vae_ext import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_backend_info_describes_build_and_ops():
    info = vae_ext.backend_info()
    for key in ("version", "torch", "cuda", "mode", "extension_loaded", "build", "ops"):
        assert key in info
    assert info["ops"]["reparameterize"]["cpu"]["backend"] == ("extension" if EXT else "reference")
    if EXT:
        built = info["build"]["cpu_capabilities"].split(",")
        assert built[0] == "default" and set(built) <= {"default", "avx2", "avx512"}
        assert info["build"]["cpu_capability"] in built
        assert isinstance(info["build"]["cuda"], bool)


def test_use_backend_context_manager(monkeypatch):
    calls = []
    real = vae_ext.reference.reparameterize
    monkeypatch.setattr(vae_ext.reference, "reparameterize", lambda *a, **k: calls.append(1) or real(*a, **k))
    mu = torch.zeros(4)
    with vae_ext.use_backend("reference"):
        assert _backend.mode() == "reference"
        vae_ext.reparameterize(mu, mu)
        assert vae_ext.backend_info()["ops"]["reparameterize"]["cpu"]["backend"] == "reference"
    assert _backend.mode() == "auto"
    assert calls == [1]
    vae_ext.reparameterize(mu, mu)
    assert calls == ([1] if EXT else [1, 1])
    with pytest.raises(ValueError, match="name"):
        with vae_ext.use_backend("fast"):
            pass


@requires_ext
def test_forced_extension_on_unsupported_input_raises():
    mu = torch.zeros(4, device="meta")
    with vae_ext.use_backend("extension"):
        with pytest.raises(RuntimeError, match="does not support"):
            vae_ext.reparameterize(mu, mu)


def test_env_var_selects_reference():
    out = _run("""
        import torch, vae_ext
        from vae_ext import _backend
        print(_backend.mode(), vae_ext.backend_info()['ops']['reparameterize']['cpu']['backend'])
    """, VAE_EXT_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "reference"]


def test_missing_extension_falls_back_with_one_warning():
    out = _run("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "vae_ext._C":
                    raise ImportError("simulated missing extension")
        sys.meta_path.insert(0, Block())
        import torch, vae_ext
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mu = torch.zeros(3)
            z1 = vae_ext.reparameterize(mu, mu, seed=1)
            z2 = vae_ext.reparameterize(mu, mu, seed=1)
        msgs = [str(w.message) for w in caught if "extension" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "simulated missing extension" in msgs[0]
        assert torch.equal(z1, z2) and z1.shape == (3,)
        info = vae_ext.backend_info()
        assert info["extension_loaded"] is False and info["ops"]["reparameterize"]["cpu"]["backend"] == "reference"
        with vae_ext.use_backend("extension"):
            try:
                vae_ext.reparameterize(mu, mu)
            except RuntimeError as e:
                assert "did not load" in str(e)
            else:
                raise AssertionError("forced extension without the extension must raise")
        print("ok")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@requires_ext
def test_cuda_head_dim_limits_come_from_the_build(monkeypatch, request):
    from vae_ext.ops import attention as attention_ops

    info = _backend.build_info()
    if info.get("cuda"):  # csrc/attention/attention.h, as build_info reports it
        assert list(info["attention_cuda_tensor_core_head_dims"]) == [32, 64, 96, 128]
        assert info["attention_cuda_max_head_dim"] == 512
        assert info["attention_cuda_max_backward_head_dim"] == 256
    else:
        assert "attention_cuda_max_head_dim" not in info
    attention_ops._supports.cache_clear()
    request.addfinalizer(attention_ops._supports.cache_clear)  # its answers are cached per build; this test changes the build
    monkeypatch.setattr(_backend, "device_supported", lambda device: (True, "pretend CUDA"))
    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "build_info", lambda: {"attention_cuda_tensor_core_head_dims": [32, 64, 96, 128],
                                                         "attention_cuda_max_head_dim": 256})
    assert attention_ops.supports(cuda, torch.bfloat16, 80) == (True, "pretend CUDA: tensor-core kernels (head dim "
                                                                      "padded to 96)")
    assert attention_ops.supports(cuda, torch.bfloat16, 200)[1].endswith("FFMA kernels (float32 arithmetic)")
    assert not attention_ops.supports(cuda, torch.float32, 512)[0]
    attention_ops._supports.cache_clear()
    monkeypatch.setattr(_backend, "build_info", lambda: {"attention_cuda_tensor_core_head_dims": [32, 64, 96, 128],
                                                         "attention_cuda_max_head_dim": 512,
                                                         "attention_cuda_max_backward_head_dim": 256})
    assert attention_ops.supports(cuda, torch.bfloat16, 512)[0]  # the SD VAE mid-block, forward only
    ok, why = attention_ops.supports(cuda, torch.bfloat16, 512, needs_grad=True)
    assert not ok and "no CUDA backward kernel" in why
    assert attention_ops.supports(cuda, torch.float32, 256, needs_grad=True)[0]
    # a build that reports other limits changes the answer: supports() restates none of them
    attention_ops._supports.cache_clear()
    monkeypatch.setattr(_backend, "build_info", lambda: {"attention_cuda_tensor_core_head_dims": [64],
                                                         "attention_cuda_max_head_dim": 512})
    assert attention_ops.supports(cuda, torch.bfloat16, 80)[1].endswith("FFMA kernels (float32 arithmetic)")
    assert attention_ops.supports(cuda, torch.float32, 512)[0]
    attention_ops._supports.cache_clear()
    monkeypatch.setattr(_backend, "build_info", lambda: {})  # a CPU-only build
    assert not attention_ops.supports(cuda, torch.bfloat16, 64)[0]
