"""Where the CUDA toolkit is: used by setup.py, the CUDA emulation's harness (tests/cuda_emu) and the
reports in tools/. Plain Python, no torch."""

import glob
import os
import shutil
import sys


def toolkit_candidates():
    """Folders that may hold the CUDA toolkit, most specific first.

    torch guesses dirname(dirname(which nvcc)), which is wrong when `nvcc` on the PATH is a wrapper
    script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc): follow links, read wrapper
    scripts, then try the standard locations.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        yield os.path.dirname(os.path.dirname(real))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):  # a wrapper script: the real nvcc it runs
                for token in head.decode("utf-8", "replace").split():
                    token = token.strip("\"'")
                    if token.endswith("/bin/nvcc"):
                        yield os.path.dirname(os.path.dirname(token))
        except OSError:
            pass
    yield "/usr/local/cuda"
    yield from sorted(glob.glob("/usr/local/cuda-*"), reverse=True)


def find_cuda_home():
    """The toolkit folder (bin/nvcc and include/cuda_runtime.h), or None."""
    for path in toolkit_candidates():
        if path and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
                os.path.join(path, "include", "cuda_runtime.h")):
            return os.path.realpath(path)
    return None


def cuda_include_dir():
    """The toolkit's include folder with the host-mode headers (cuda_runtime.h, crt/host_defines.h), or None."""
    for home in toolkit_candidates():
        inc = os.path.join(home, "include")
        if os.path.isfile(os.path.join(inc, "cuda_runtime.h")) and os.path.isfile(
                os.path.join(inc, "crt", "host_defines.h")):
            return os.path.realpath(inc)
    return None


def nvidia_pip_include_dirs():
    """Include folders of the `nvidia` pip packages that CUDA torch wheels bring (cusparse.h, cublas_v2.h...)."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))
