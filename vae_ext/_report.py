"""Benchmark rows to a markdown table, a PNG chart and the results-file format of DESIGN.md.

Shared by `python -m vae_ext bench` and benchmarks/report.py (which reads pytest-benchmark
runs). A row is a dict: op, case, impl (fused | reference | sdpa | compile | copy | matmul),
pass_ (fwd | fwd+bwd), device, median_ms, gbps (or None), tflops (or None). Rows with op
'ceiling' are the device's measured copy bandwidth and matrix rate; the other rows are also
stated as a fraction of them.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections import defaultdict


def ceilings(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        if r["op"] != "ceiling":
            continue
        if r["impl"] == "copy":
            out[f"{r['device']}_copy_gbps"] = r["gbps"]
        elif r["impl"] == "matmul":
            out[f"{r['device']}_matmul_tflops"] = r["tflops"]
    return out


def markdown(rows: list[dict], ceil: dict) -> str:
    groups = defaultdict(list)
    for r in rows:
        if r["op"] != "ceiling":
            groups[(r["op"], r["case"], r["device"], r["pass_"])].append(r)
    lines = []
    if ceil:
        lines.append("Ceilings measured in this run: " + ", ".join(
            f"{k.replace('_', ' ')} {v:.3g}" for k, v in sorted(ceil.items())))
        lines.append("")
    lines.append("| op | case | device | pass | impl | median ms | vs reference | vs best peer | GB/s | TFLOP/s |")
    lines.append("|---|---|---|---|---|---:|---:|---:|---:|---:|")
    for (op, case, device, pass_), group in sorted(groups.items()):
        ref = next((r["median_ms"] for r in group if r["impl"] == "reference"), None)
        peers = [r["median_ms"] for r in group if r["impl"] not in ("fused", "reference")]
        best_peer = min(peers) if peers else None
        for r in sorted(group, key=lambda r: r["median_ms"]):
            vs_ref = f"{ref / r['median_ms']:.2f}x" if ref else ""
            vs_peer = f"{best_peer / r['median_ms']:.2f}x" if best_peer else ""
            gbps = tflops = ""
            if r.get("gbps") is not None:
                frac = ceil.get(f"{device}_copy_gbps")
                gbps = f"{r['gbps']:.3g}" + (f" ({100 * r['gbps'] / frac:.0f}%)" if frac else "")
            if r.get("tflops") is not None:
                frac = ceil.get(f"{device}_matmul_tflops")
                tflops = f"{r['tflops']:.3g}" + (f" ({100 * r['tflops'] / frac:.0f}%)" if frac else "")
            lines.append(f"| {op} | {case} | {device} | {pass_} | {r['impl']} | {r['median_ms']:.3f} | {vs_ref} | "
                         f"{vs_peer} | {gbps} | {tflops} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: str, title: str | None = None) -> None:
    """Bars of speed relative to the reference (higher is better), one group per (op, case, pass)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    groups = defaultdict(dict)
    for r in rows:
        if r["op"] != "ceiling":
            groups[f"{r['op']}\n{r['case']}\n{r['device']} {r['pass_']}"][r["impl"]] = r["median_ms"]
    order = ["fused", "reference", "compile", "sdpa"]
    impls = sorted({impl for g in groups.values() for impl in g}, key=lambda i: (order.index(i) if i in order else 9, i))
    names = sorted(groups)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        values = []
        for n in names:
            g = groups[n]
            base = g.get("reference", max(g.values()))
            values.append(base / g[impl] if impl in g else 0.0)
        ax.bar([k + i * width for k in range(len(names))], values, width, label=impl)
    ax.set_xticks([k + width * (len(impls) - 1) / 2 for k in range(len(names))])
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel("speed vs reference (x), higher is better")
    ax.axhline(1.0, color="gray", lw=0.5)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return None


def _sig(x, digits: int = 4):
    """x to `digits` significant digits (None stays None): small CPU rates must not round to 0."""
    return None if x is None else float(f"{x:.{digits}g}")


def results(rows: list[dict], ceil: dict, device_name: str, device_type: str, tests: dict | None = None,
            extra: dict | None = None) -> dict:
    """The results-file dict of DESIGN.md ("Benchmarks")."""
    import torch

    out = {
        "device": device_name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "tests": tests,
        "ceilings": {"copy_gbps": ceil.get(f"{device_type}_copy_gbps"),
                     "bf16_matmul_tflops" if device_type == "cuda" else "fp32_matmul_tflops":
                         ceil.get(f"{device_type}_matmul_tflops")},
        "results": [{"op": r["op"], "case": r["case"], "impl": r["impl"], "pass": r["pass_"], "device": r["device"],
                     "median_ms": _sig(r["median_ms"]), "tflops": _sig(r.get("tflops")), "gbps": _sig(r.get("gbps"))}
                    for r in rows if r["op"] != "ceiling"],
    }
    if extra:
        out.update(extra)
    return out
