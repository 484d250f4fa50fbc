"""The tools a lent GPU runs unattended (tools/gpu_check.py, benchmarks/gpu_bench.py, tools/gpu_cases.py):
what can be checked without one. The dry run itself is `make gpu-check` here."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(rel):
    spec = importlib.util.spec_from_file_location(os.path.basename(rel)[:-3], os.path.join(ROOT, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load("tools/gpu_check.py")


def test_budget_fits_nine_minutes():
    fixed = sum(b for _, b in gpu_check.BUDGET if b is not None)
    assert fixed + 20 <= gpu_check.TOTAL_S == 9 * 60  # 20 s for the start and the copies back; ncu only if time is left
    assert [n for n, _ in gpu_check.BUDGET] == ["build", "tests", "memcheck", "racecheck", "synccheck", "bench", "ncu"]


@pytest.mark.parametrize("out, expected", [
    ("===== 120 passed, 3 skipped in 9.1s =====", {"passed": 120, "failed": 0, "skipped": 3}),
    ("FAILED tests/x.py::t\n2 failed, 97 passed, 1 skipped, 1 error in 3.2s", {"passed": 97, "failed": 3, "skipped": 1}),
    ("nothing ran", {"passed": 0, "failed": 0, "skipped": 0}),
])
def test_pytest_counts(out, expected):
    assert gpu_check.pytest_counts(out) == expected


def test_step_timeout_is_reported_not_raised(tmp_path):
    log = gpu_check.Log(str(tmp_path / "log"))
    rc, _ = gpu_check.run_step(log, "sleep", ["sleep", "5"], timeout=0.5)
    assert rc == "timeout"
    assert "step sleep: rc timeout" in (tmp_path / "log").read_text()


def test_markdown_table_from_a_results_file():
    torch = pytest.importorskip("torch")  # gpu_bench imports torch at module level
    del torch
    gpu_bench = _load("benchmarks/gpu_bench.py")
    data = {"device": "NVIDIA H200", "date": "2026-12-01", "torch": "2.11", "cuda": "13.0", "commit": "abc",
            "tests": {"passed": 1, "failed": 0, "skipped": 0}, "ceilings": {"copy_gbps": 4300.0},
            "results": [
                {"op": "attention", "case": "B4 S1024 causal", "impl": "fused", "pass": "fwd", "median_ms": 1.0,
                 "tflops": 400.0, "gbps": None},
                {"op": "attention", "case": "B4 S1024 causal [flash]", "impl": "sdpa", "pass": "fwd",
                 "median_ms": 1.5, "tflops": 266.7, "gbps": None},
                {"op": "attention", "case": "B4 S1024 causal", "impl": "reference", "pass": "fwd", "median_ms": 9.0,
                 "tflops": None, "gbps": None}]}
    md = gpu_bench.markdown(data)
    assert "| attention | B4 S1024 causal | fwd | 1.0 | 1.5 | 9.0 | 1.50x (sdpa flash) | 400.0 TFLOP/s |" in md


def test_gpu_cases_refuse_to_run_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu_check runs these cases for real")
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_cases.py"), "--ops", "reparameterize"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0  # no silent success without a device
