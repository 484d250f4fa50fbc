#!/usr/bin/env python3
"""Static resources of every CUDA kernel instantiation on sm_90, and the occupancy that follows.

Compiles each csrc/**/*.cu to PTX for sm_90 (nvcc, the flags of setup.py), reads each entry's
.maxntid (threads per block from __launch_bounds__), runs `ptxas -v` on it (registers, spill stores and
loads, stack frame, static shared memory), takes each kernel's dynamic shared memory from its launches
under the CPU emulation (tests/cuda_emu, the sizes of tools/emu_counters.py plus every head dim), and
computes the theoretical occupancy on an H100/H200 SM: 64K 32-bit registers (allocated per warp in units
of 256), 228 KB of shared memory (1 KB reserved per block), 2048 threads, 64 warps, 32 blocks.
Writes a markdown table (default benchmarks/results/cuda_resources.md). Needs nvcc; no GPU.

For every kernel that spills, its SASS (cuobjdump, from the toolkit or Triton's package) says where the
local-memory accesses are: how many LDL/STL lie inside the kernel's main loop (the outermost backward
branch around its mma instructions) against that loop's length.

Usage: python tools/cuda_resources.py [--out FILE] [--no-emulation]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

SM_REGS, SM_SMEM, SM_THREADS, SM_WARPS, SM_BLOCKS = 65536, 228 * 1024, 2048, 64, 32
SMEM_RESERVED_PER_BLOCK = 1024
NVCC_FLAGS = ["-std=c++17", "-arch=sm_90", "-O3", "--expt-relaxed-constexpr", "-DVAE_EXT_WITH_CUDA"]


def nvcc_includes():
    from cuda_toolkit import nvidia_pip_include_dirs
    return ["-I" + d for d in [os.path.join(ROOT, "csrc")] + nvidia_pip_include_dirs()]


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name):
    """A demangled kernel name without return type, namespaces and parameter list."""
    from emu_counters import _short  # the names of the emulation's counters report, to join on
    return _short(name).strip()


def find_cuobjdump():
    import shutil
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:
        import triton
        exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return exe if os.path.exists(exe) else None
    except Exception:
        return None


def spills_in_main_loop(src, tmp, mangled_names):
    """{mangled name: (LDL/STL inside the main loop, instructions in it, all LDL/STL)} from the SASS."""
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        return {}
    cubin = os.path.join(tmp, os.path.basename(src) + ".cubin")
    subprocess.run(["nvcc", *NVCC_FLAGS, *nvcc_includes(), "-cubin", src, "-o", cubin], check=True,
                   capture_output=True, text=True)
    sass = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
    out = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if name not in mangled_names:
            continue
        ins = [(int(m.group(1), 16), m.group(2).strip())
               for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", chunk)]
        local = [a for a, t in ins if re.match(r"(@!?P\d\s+)?(LDL|STL)\b", t)]
        loops = [(int(m.group(1), 16), a) for a, t in ins
                 for m in [re.search(r"BRA\s+`?\(?0x([0-9a-f]+)", t)] if m and int(m.group(1), 16) < a]
        mma = [a for a, t in ins if "HMMA" in t or "FFMA" in t]
        loops = [(b, e) for b, e in loops if any(b <= x <= e for x in mma)]
        if not loops:
            out[name] = (None, None, len(local))
            continue
        b, e = max(loops, key=lambda l: l[1] - l[0])
        out[name] = (sum(b <= a <= e for a in local), sum(b <= a <= e for a, _ in ins), len(local))
    return out


def compile_kernels(src, tmp):
    """[(mangled name, maxntid, ptxas properties)] of one .cu."""
    ptx = os.path.join(tmp, os.path.basename(src) + ".ptx")
    subprocess.run(["nvcc", *NVCC_FLAGS, *nvcc_includes(), "-ptx", src, "-o", ptx], check=True, capture_output=True,
                   text=True)
    text = open(ptx).read()
    maxntid = {}
    for m in re.finditer(r"\.entry\s+(\S+)\(.*?\)\s*((?:\.\w+[^\n]*\n)*)", text, re.S):
        t = re.search(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)", m.group(2))
        maxntid[m.group(1)] = int(t.group(1)) * int(t.group(2)) * int(t.group(3)) if t else None
    out = subprocess.run(["ptxas", "-v", "-arch=sm_90", ptx, "-o", os.devnull], check=True, capture_output=True,
                         text=True).stderr
    props, cur = {}, None
    for line in out.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = m.group(1)
            props[cur] = {"regs": 0, "spill_st": 0, "spill_ld": 0, "stack": 0, "smem": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            props[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            props[cur]["regs"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            props[cur]["smem"] = int(m.group(1))
    spilling = {name for name, p in props.items() if p["spill_st"] or p["spill_ld"]}
    loops = spills_in_main_loop(src, tmp, spilling) if spilling else {}
    for name in spilling:
        props[name]["loop"] = loops.get(name)
    return [(name, maxntid.get(name), p) for name, p in props.items()]


def occupancy(regs, threads, smem):
    """(blocks per SM, active warps per SM, the limiting resource)."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = {"warps": SM_WARPS // warps, "threads": SM_THREADS // threads, "blocks": SM_BLOCKS,
              "registers": (SM_REGS // regs_per_warp) // warps}
    if smem:
        limits["shared memory"] = SM_SMEM // (smem + SMEM_RESERVED_PER_BLOCK)
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: limits[k])
    return blocks, blocks * warps, limiter


def emulated_launches():
    """{short kernel name: (threads, dynamic smem bytes)} of the launches under the CPU emulation."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import cuda_emu
    import emu_counters

    emu = cuda_emu.load()
    launches = {}
    cases = [c[2] for c in emu_counters._cases(quick=True)]

    def attention(dtype, d):
        def run(emu):
            q, k, v = (torch.randn(1, 1, 64, d).to(dtype) for _ in range(3))
            out, lse, rng = emu.attention_forward(q, k, v, None, None, True, d ** -0.5)
            emu.attention_backward(torch.randn(out.shape).to(dtype), q, k, v, out, lse, rng, None, None, True,
                                   d ** -0.5)
        return run
    cases += [attention(torch.bfloat16, d) for d in (32, 64, 96, 128, 256)]
    cases += [attention(torch.float16, d) for d in (32, 64, 96, 128)]
    cases += [attention(torch.float32, d) for d in (64, 128, 256)]
    for run in cases:
        emu.reset_counters()
        old = emu.set_checks(False, True)
        try:
            run(emu)
        finally:
            emu.set_checks(bool(old[0]), bool(old[1]))
        for line in emu.counters().splitlines():
            name, *fields = line.split("\t")
            f = {k: int(v) for k, v in (x.split("=") for x in fields)}
            prev = launches.get(short(name), (0, 0))
            launches[short(name)] = (max(prev[0], f["threads"]), max(prev[1], f["dynamic_smem"]))
    return launches


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cuda_resources.md"))
    ap.add_argument("--no-emulation", action="store_true", help="leave out dynamic shared memory")
    a = ap.parse_args()
    launches = {} if a.no_emulation else emulated_launches()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)):
            kernels = compile_kernels(src, tmp)
            names = demangle([k[0] for k in kernels])
            for mangled, threads, p in kernels:
                rows.append((os.path.relpath(src, ROOT), short(names[mangled]), threads, p))
    lines = ["# Static resources of the CUDA kernels on sm_90 (H100 / H200)", "",
             "Made by `python tools/cuda_resources.py` (`make cuda-resources`) from `ptxas -v`; threads per block",
             "from `__launch_bounds__`, dynamic shared memory from the kernels' largest launch under the CPU",
             "emulation at the test sizes (n/a: not launched there). Occupancy: blocks and warps per SM (of 64)",
             "and what limits them. Spills in loop: the LDL/STL inside the kernel's main loop / that loop's",
             "instructions (from the SASS; the loop is the outermost one around the mma or FFMA instructions).", "",
             "| file | kernel | threads | registers | spill st/ld (B) | stack (B) | static smem (B) | dynamic smem (B) "
             "| blocks/SM | warps/SM | limited by | spills in loop |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for src, name, threads, p in sorted(rows):
        dyn = launches.get(name, (None, None))[1]
        t = threads or launches.get(name, (None, None))[0]
        occ = occupancy(p["regs"], t, p["smem"] + (dyn or 0)) if t else None
        lines.append(f"| {src} | `{name}` | {t or 'n/a'} | {p['regs']} | {p['spill_st']}/{p['spill_ld']} | "
                     f"{p['stack']} | {p['smem']} | {dyn if dyn is not None else 'n/a'} | "
                     + (f"{occ[0]} | {occ[1]} | {occ[2]} |" if occ else "n/a | n/a | |")
                     + (f" {loop[0]} / {loop[1]} |" if (loop := p.get("loop")) and loop[0] is not None else " |"))
    text = "\n".join(lines) + "\n"
    with open(a.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
