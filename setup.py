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


# Run-time CPU-capability dispatch (csrc/common/cpu_capability.h): the CPU kernel
# sources are compiled once per capability, with ATen's flags for it; every other
# source is built for the portable x86-64 baseline (DEFAULT).
CPU_KERNEL_SOURCES = ["csrc/attention/attention_cpu.cpp", "csrc/elbo/elbo_cpu.cpp",
                      "csrc/reparameterize/reparameterize_cpu.cpp"]
CPU_CAPABILITY_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mbmi", "-mbmi2", "-mlzcnt"],
}


def cpu_capabilities():
    """The capabilities beyond DEFAULT to build: VAE_EXT_CPU_CAPABILITIES=avx2,avx512 (default on x86-64)."""
    import platform

    wanted = os.environ.get("VAE_EXT_CPU_CAPABILITIES")
    if wanted is None:
        wanted = "avx2,avx512" if platform.machine().lower() in ("x86_64", "amd64") else ""
    caps = [c.strip().upper() for c in wanted.split(",") if c.strip() and c.strip().lower() != "default"]
    unknown = [c for c in caps if c not in CPU_CAPABILITY_FLAGS]
    if unknown:
        raise SystemExit(f"VAE_EXT_CPU_CAPABILITIES: unknown {unknown}; choose from avx2, avx512")
    return [c for c in CPU_CAPABILITY_FLAGS if c in caps]


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

    caps = cpu_capabilities()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/*/*.cpp"))
    defines = [
        f'-DVAE_EXT_BUILT_WITH_TORCH="{torch.__version__}"',
        "-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT",
    ] + [f"-DVAE_EXT_HAVE_CPU_{c}" for c in caps]
    cpu_caps = ",".join(["default"] + [c.lower() for c in caps])
    cxx = ["-O3", "-fopenmp", "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-Wno-interference-size"] + defines
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(name="vae_ext._C", include_dirs=include_dirs, extra_link_args=["-fopenmp"])

    if not with_cuda:
        print(f"vae_ext: building the CPU kernels only (CPU capabilities: {cpu_caps})", flush=True)
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
        ext.cpu_capabilities = caps
        return ext

    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
    include_dirs += nvidia_pip_include_dirs()
    cuda_defines = ["-DVAE_EXT_WITH_CUDA", f'-DVAE_EXT_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xfatbin", "-compress-all",
            "-DVAE_EXT_WITH_CUDA"]
    print(f"vae_ext: building CPU and CUDA kernels (CUDA {cuda_home}, archs {archs}, CPU capabilities: {cpu_caps})",
          flush=True)
    ext = cpp_extension.CUDAExtension(
        sources=sources, extra_compile_args={"cxx": cxx + cuda_defines, "nvcc": nvcc}, **kwargs)
    ext.cpu_capabilities = caps
    return ext


def build_ext_cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithCpuCapabilities(BuildExtension):
        """Compiles CPU_KERNEL_SOURCES once more per capability (own flags, own object
        folder) and links those objects in; the rest is BuildExtension's."""

        def build_extension(self, ext):
            objects = []
            for cap in getattr(ext, "cpu_capabilities", []):
                args = ext.extra_compile_args
                cxx = list(args["cxx"] if isinstance(args, dict) else args)
                cxx += ["-UCPU_CAPABILITY", "-UCPU_CAPABILITY_DEFAULT", f"-DCPU_CAPABILITY={cap}",
                        f"-DCPU_CAPABILITY_{cap}"] + CPU_CAPABILITY_FLAGS[cap]
                objects += self.compiler.compile(
                    [os.path.join(ROOT, src) for src in CPU_KERNEL_SOURCES],
                    output_dir=os.path.join(self.build_temp, "cpu_capability", cap.lower()),
                    macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs={"cxx": cxx, "nvcc": []}, depends=ext.depends)
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return {"build_ext": BuildWithCpuCapabilities.with_options(
        use_ninja=shutil.which("ninja") is not None or _has_ninja())}


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
