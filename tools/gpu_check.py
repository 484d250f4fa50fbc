#!/usr/bin/env python3
"""`make gpu-check`: everything a lent GPU should run, as one unattended command.

On a CUDA machine (the lent H200: 16 cores, its own python3 with torch, nvcc,
compute-sanitizer, ncu; no network) it runs, in order, each step under its own
timeout, within 9 minutes of wall time in all:

  step        budget  what
  build        180 s  the extension for this GPU only (TORCH_CUDA_ARCH_LIST=9.0, all cores), in place
  tests        120 s  the whole test suite on the CUDA device (the emulated-CUDA tests left out: the real
                      kernels run here), pytest-xdist when present
  memcheck      45 s  compute-sanitizer --tool memcheck: one small forward+backward of every op
  racecheck     30 s  compute-sanitizer --tool racecheck: the attention kernels
  synccheck     25 s  compute-sanitizer --tool synccheck: the attention kernels
  bench        120 s  benchmarks/gpu_bench.py: copy bandwidth and bf16 matmul ceilings, then every op fused
                      vs reference vs the best peer (SDPA's fastest backend, flash_attn if importable,
                      torch.compile), bf16 first, then fp16
  ncu          rest   if at least 40 s are left: ncu on one attention forward and one backward
                      (occupancy, SM and DRAM throughput, registers, spills)

The budgets add up to 520 s, leaving 20 s of the 540 for the start and the
copies back. A step that runs out of time is killed and the next one runs;
everything is written as it finishes, so a run killed at minute 9 still leaves
what was done. Files written to --out (default $OUT, else benchmarks/results;
build/gpu-check for a dry run), at most 8: gpu-check.log, <device>-<yyyymmdd>.json (DESIGN.md's results format),
<device>-<yyyymmdd>.md, tests.txt, sanitizer.txt, ncu.txt.

Without a CUDA device it is a dry run of the same steps: it builds the extension
as `make build` does (CPU and CUDA compile for sm_80 and sm_90; incremental:
only what changed), runs the emulated CUDA tests, prints each GPU step with the
budget it would get, and exits 0 when both pass. Measured on the 2-core build
machine (2026-12-01, shared with other builds): the build from scratch 967 s
(11.5 min of CPU), the emulated CUDA tests 121 s (397 tests, race detection on).

Usage: python3 tools/gpu_check.py [--out DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_S = 540
BUDGET = [("build", 180), ("tests", 120), ("memcheck", 45), ("racecheck", 30), ("synccheck", 25),
          ("bench", 120), ("ncu", None)]
NCU_MIN_S = 40
EMULATION_TESTS = sorted(glob.glob(os.path.join(ROOT, "tests", "test_*cuda_emulation.py")))


class Log:
    def __init__(self, path):
        self.path = path
        self.start = time.monotonic()
        if path:
            open(path, "w").close()

    def __call__(self, msg):
        line = f"[{time.monotonic() - self.start:6.1f}s] {msg}"
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def elapsed(self):
        return time.monotonic() - self.start


def run_step(log, name, cmd, timeout, env=None, out_file=None):
    """Runs cmd with a timeout; its output goes to the log (tail) and to out_file (whole, appended)."""
    log(f"step {name}: {' '.join(cmd) if isinstance(cmd, list) else cmd} (timeout {timeout:.0f} s)")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = (e.stdout or b"").decode("utf-8", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += (e.stderr or b"").decode("utf-8", "replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    except OSError as e:
        rc, out = "error", str(e)
    dt = time.monotonic() - t0
    if out_file:
        with open(out_file, "a") as f:
            f.write(f"===== {name}: rc {rc}, {dt:.1f} s\n{out}\n")
    tail = "\n".join(out.strip().splitlines()[-15:])
    log(f"step {name}: rc {rc} after {dt:.1f} s\n{tail}")
    return rc, out


def pytest_counts(out):
    """{'passed': N, 'failed': N, 'skipped': N} from pytest's closing line."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    lines = [l for l in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", l)]
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1]):
            key = "failed" if what.startswith("error") else what
            counts[key] += int(n)
    return counts


def has_cuda_device():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def device_name():
    import torch
    return torch.cuda.get_device_name().replace(" ", "-")


def commit():
    sha = os.environ.get("VAE_EXT_COMMIT")
    if sha:
        return sha
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def dry_run(log):
    log("no CUDA device: dry run (build as `make build` does, then the emulated CUDA tests)")
    env = dict(os.environ)
    rc, _ = run_step(log, "build", [sys.executable, "setup.py", "build_ext", "--inplace"], 3600, env=env)
    if rc != 0:
        log("dry run FAILED: the build")
        return 1
    rc, out = run_step(log, "emulated CUDA tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
                       + EMULATION_TESTS, 3600, env=dict(env, OMP_NUM_THREADS="1"))
    log(f"emulated CUDA tests: {pytest_counts(out)}")
    if rc != 0:
        log("dry run FAILED: the emulated CUDA tests")
        return 1
    log("on a CUDA machine these steps would run, with these budgets (9 minutes in all):")
    for name, budget in BUDGET:
        log(f"  {name:10s} {'rest (>= %d s)' % NCU_MIN_S if budget is None else '%d s' % budget}")
    log("dry run passed")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="where the files go (default $OUT, else benchmarks/results; build/gpu-check for a dry run)")
    ap.add_argument("--dry-run", action="store_true", help="the steps without a GPU, whatever is present")
    args = ap.parse_args()
    dry = args.dry_run or not has_cuda_device()
    args.out = args.out or os.path.join(ROOT, *(("build", "gpu-check") if dry else ("benchmarks", "results")))
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu-check.log"))
    if dry:
        return dry_run(log)

    import torch
    dev = device_name()
    stamp = datetime.date.today().strftime("%Y%m%d")
    results_path = os.path.join(args.out, f"{dev}-{stamp}.json")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS=str(os.cpu_count() or 8), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    header = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit(),
              "tests": None, "ceilings": None, "results": [], "steps": {}}
    with open(results_path, "w") as f:
        json.dump(header, f, indent=1)
    log(f"gpu-check on {header['device']}, torch {header['torch']}, CUDA {header['cuda']}, commit {header['commit']}")

    def record_step(name, rc, dt):
        with open(results_path) as f:
            data = json.load(f)
        data["steps"][name] = {"rc": rc, "seconds": round(dt, 1)}
        with open(results_path, "w") as f:
            json.dump(data, f, indent=1)

    def remaining():
        return TOTAL_S - 20 - log.elapsed()

    budgets = dict(BUDGET)
    sanitizer_txt = os.path.join(args.out, "sanitizer.txt")
    tests_txt = os.path.join(args.out, "tests.txt")
    py = sys.executable

    t0 = time.monotonic()
    rc, _ = run_step(log, "build", [py, "setup.py", "build_ext", "--inplace"], min(budgets["build"], remaining()),
                     env=env)
    record_step("build", rc, time.monotonic() - t0)
    if rc != 0:
        log("the build failed: nothing else can run")
        return 1

    t0 = time.monotonic()
    xdist = ["-n", "8"] if _importable("xdist") else []
    cmd = [py, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-o", "addopts="] + xdist
    cmd += [f"--ignore={p}" for p in EMULATION_TESTS]
    rc, out = run_step(log, "tests", cmd, min(budgets["tests"], remaining()), env=env, out_file=tests_txt)
    counts = pytest_counts(out)
    record_step("tests", rc, time.monotonic() - t0)
    with open(results_path) as f:
        data = json.load(f)
    data["tests"] = counts
    with open(results_path, "w") as f:
        json.dump(data, f, indent=1)
    log(f"tests: {counts}")

    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    case = os.path.join(ROOT, "tools", "gpu_cases.py")
    for tool, ops in (("memcheck", "all"), ("racecheck", "attention"), ("synccheck", "attention")):
        t0 = time.monotonic()
        budget = min(budgets[tool], remaining())
        if budget < 5:
            log(f"step {tool}: skipped, no time left")
            continue
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "3", "--print-limit", "20"]
        if tool != "memcheck":
            cmd += ["--kernel-name", "regex:attn"]
        cmd += [py, case, "--ops", ops, "--size", "small"]
        rc, _ = run_step(log, tool, cmd, budget, env=env, out_file=sanitizer_txt)
        record_step(tool, rc, time.monotonic() - t0)

    t0 = time.monotonic()
    budget = min(budgets["bench"], remaining())
    rc, _ = run_step(log, "bench", [py, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), "--results", results_path,
                                    "--budget", str(int(budget) - 5)], budget, env=env)
    record_step("bench", rc, time.monotonic() - t0)
    _write_markdown(results_path, log)

    left = remaining()
    if left >= NCU_MIN_S:
        t0 = time.monotonic()
        ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
        cmd = [ncu, "--clock-control", "none", "--kernel-name", "regex:attn_(fwd|bwd)", "--launch-count", "2",
               "--section", "SpeedOfLight", "--section", "Occupancy", "--section", "LaunchStats",
               "--section", "MemoryWorkloadAnalysis", py, case, "--ops", "attention", "--size", "large"]
        rc, out = run_step(log, "ncu", cmd, left, env=env, out_file=os.path.join(args.out, "ncu.txt"))
        record_step("ncu", rc, time.monotonic() - t0)
    else:
        log(f"step ncu: skipped ({left:.0f} s left, needs {NCU_MIN_S})")
    log(f"gpu-check done in {log.elapsed():.0f} s; results in {results_path}")
    return 0


def _importable(name):
    try:
        __import__(name)
        return True
    except Exception:
        return False


def _write_markdown(results_path, log):
    try:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import gpu_bench
        md = results_path[:-5] + ".md"
        with open(results_path) as f:
            data = json.load(f)
        with open(md, "w") as f:
            f.write(gpu_bench.markdown(data))
        log(f"table in {md}")
    except Exception as e:  # the JSON is what matters; a table can be made from it later
        log(f"no markdown table: {e!r}")


if __name__ == "__main__":
    sys.exit(main())
