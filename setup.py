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


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit folder, or None.

    torch guesses dirname(dirname(which nvcc)), which is wrong when `nvcc` on
    the PATH is a wrapper script (e.g. /usr/local/bin/nvcc -> exec
    /usr/local/cuda-13.0/bin/nvcc). Follow links, read wrapper scripts, then try
    the standard locations.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):  # a wrapper script: look for the real nvcc it runs
                for token in head.decode("utf-8", "replace").split():
                    token = token.strip("\"'")
                    if token.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_toolkit(path):
            return os.path.realpath(path)
    return None


def nvidia_pip_include_dirs():
    """Include folders of the `nvidia` pip packages that CUDA torch wheels bring (cusparse.h, cublas_v2.h...)."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


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
