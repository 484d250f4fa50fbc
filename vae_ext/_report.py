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
    """Horizontal bars of speed relative to the reference (higher is better): one panel per
    op, one group of bars per (case, device, pass), one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    by_op = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["op"] != "ceiling":
            by_op[r["op"]][f"{r['case']}\n{r['device']} {r['pass_']}"][r["impl"]] = r["median_ms"]
    if not by_op:
        return
    order = ["fused", "reference", "compile", "sdpa"]
    impls = sorted({i for groups in by_op.values() for g in groups.values() for i in g},
                   key=lambda i: (order.index(i) if i in order else 9, i))
    colors = {impl: f"C{k}" for k, impl in enumerate(impls)}
    ops = sorted(by_op)
    heights = [len(by_op[op]) * (0.35 * len(impls) + 0.4) + 0.8 for op in ops]
    fig, axes = plt.subplots(len(ops), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, op in zip(axes[:, 0], ops):
        names = sorted(by_op[op])
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            ys, xs = [], []
            for k, n in enumerate(names):
                g = by_op[op][n]
                if impl in g:
                    ys.append(k + (i - (len(impls) - 1) / 2) * width)
                    xs.append(g.get("reference", max(g.values())) / g[impl])
            ax.barh(ys, xs, width, color=colors[impl], label=impl)
            for y, x in zip(ys, xs):
                ax.text(x, y, f" {x:.2f}x", va="center", fontsize=7)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="gray", lw=0.6)
        ax.set_title(op, fontsize=10, loc="left")
        ax.set_xlabel("speed vs the eager reference (x), higher is better", fontsize=8)
        ax.margins(x=0.15)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i]) for i in impls]
    fig.legend(handles, impls, loc="upper right", fontsize=8, ncol=len(impls))
    if title:
        fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
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
