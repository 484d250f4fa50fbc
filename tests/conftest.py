import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import vae_ext  # noqa: E402
from vae_ext import _backend  # noqa: E402

CUDA = torch.cuda.is_available()
EXT = _backend.extension_loaded()
EXT_CUDA = EXT and bool(_backend.build_info().get("cuda")) and CUDA

requires_ext = pytest.mark.skipif(not EXT, reason=f"compiled extension not loaded: {_backend.load_error()}")
requires_cuda = pytest.mark.skipif(not EXT_CUDA, reason="needs a CUDA GPU and a CUDA build of the extension")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Tolerances by dtype (DESIGN.md): low-precision results are compared with a float64 reference.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}


def assert_close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"] * scale,
                               atol=tol["atol"] * scale)


def pytest_report_header(config):
    info = vae_ext.backend_info()
    return [f"vae_ext {info['version']}: extension loaded={info['extension_loaded']} build={info['build']} "
            f"gpu={info['gpu']}"]


@pytest.fixture(scope="session")
def emu():
    """The project's CUDA kernels built under the CPU emulation: torch.ops.vae_ext_emu (tests/cuda_emu)."""
    import cuda_emu

    return cuda_emu.load()
