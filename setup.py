"""Build of vae_ext's compiled operators (vae_ext._C) with torch.utils.cpp_extension.

A CUDAExtension (CPU and CUDA sources) when torch is a CUDA build and nvcc is
found, else a CppExtension (CPU sources only).

Environment switches:
  VAE_EXT_CPU_ONLY=1         build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0": A100 and H100)
  MAX_JOBS                   parallel compile jobs (ninja)
  VAE_EXT_CPU_ARCH           "auto" (default: AVX2 + FMA when the build machine has them), "avx2" or "generic"
  CUDA_HOME                  the CUDA toolkit; found by searching when unset
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_toolkit import find_cuda_home, nvidia_pip_include_dirs  # noqa: E402


def cpu_arch_flags():
    wanted = os.environ.get("VAE_EXT_CPU_ARCH", "auto").lower()
    if wanted == "auto":
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
            wanted = "avx2" if (" avx2" in flags and " fma" in flags) else "generic"
        except OSError:
            wanted = "generic"
    if wanted == "avx2":
        # ATen's at::vec picks its AVX2 implementation from these macros.
        return "avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "generic", []


def make_extension():
    import torch

    cpu_only = os.environ.get("VAE_EXT_CPU_ONLY", "0") not in ("", "0", "false", "False")
    cuda_home = None if cpu_only or torch.version.cuda is None else find_cuda_home()
    with_cuda = cuda_home is not None
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home  # in case torch.utils.cpp_extension was imported before

    cpu_arch, arch_flags = cpu_arch_flags()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/*/*.cpp"))
    defines = [
        f'-DVAE_EXT_CPU_ARCH="{cpu_arch}"',
        f'-DVAE_EXT_BUILT_WITH_TORCH="{torch.__version__}"',
    ]
    cxx = ["-O3", "-fopenmp", "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-Wno-interference-size"] + arch_flags + defines
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(name="vae_ext._C", include_dirs=include_dirs, extra_link_args=["-fopenmp"])

    if not with_cuda:
        print(f"vae_ext: building the CPU kernels only (cpu arch: {cpu_arch})", flush=True)
        return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)

    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
    include_dirs += nvidia_pip_include_dirs()
    cuda_defines = ["-DVAE_EXT_WITH_CUDA", f'-DVAE_EXT_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xfatbin", "-compress-all",
            "-DVAE_EXT_WITH_CUDA"]
    print(f"vae_ext: building CPU and CUDA kernels (CUDA {cuda_home}, archs {archs}, cpu arch: {cpu_arch})",
          flush=True)
    return cpp_extension.CUDAExtension(
        sources=sources, extra_compile_args={"cxx": cxx + cuda_defines, "nvcc": nvcc}, **kwargs)


def build_ext_cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja())}


def _has_ninja():
    try:
        subprocess.check_output([sys.executable, "-m", "ninja", "--version"])
        return True
    except Exception:
        return False


setup(
    packages=find_packages(include=["vae_ext", "vae_ext.*"]),
    ext_modules=[make_extension()],
    cmdclass=build_ext_cmdclass(),
)
