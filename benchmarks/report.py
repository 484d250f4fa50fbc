"""Turn a pytest-benchmark JSON run into a markdown table, a PNG chart and
(optionally) the results file format of DESIGN.md.

    python benchmarks/report.py RUN.json [--markdown OUT.md] [--png OUT.png]
        [--results OUT.json --tests-passed N --tests-failed N --tests-skipped N]

Rows are grouped by (op, case, device, pass); each row gives the median time,
the speed-up over the reference and over the best peer, and GB/s or TFLOP/s,
also as a fraction of the ceilings (copy bandwidth, matrix rate) measured in
the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from collections import defaultdict


def load_rows(path: str) -> tuple[list[dict], dict]:
    with open(path) as f:
        run = json.load(f)
    rows = []
    for bench in run["benchmarks"]:
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue
        median_s = bench["stats"]["median"]
        row = dict(op=info["op"], case=info["case"], impl=info["impl"], pass_=info["pass"],
                   device=info.get("device", "cpu"), median_ms=median_s * 1e3, gbps=None, tflops=None)
        if info.get("bytes"):
            row["gbps"] = info["bytes"] / median_s / 1e9
        if info.get("flops"):
            row["tflops"] = info["flops"] / median_s / 1e12
        rows.append(row)
    return rows, run.get("machine_info", {})


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
            f"{k.replace('_', ' ')} {v:.1f}" for k, v in sorted(ceil.items())))
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
            if r["gbps"] is not None:
                frac = ceil.get(f"{device}_copy_gbps")
                gbps = f"{r['gbps']:.1f}" + (f" ({100 * r['gbps'] / frac:.0f}%)" if frac else "")
            if r["tflops"] is not None:
                frac = ceil.get(f"{device}_matmul_tflops")
                tflops = f"{r['tflops']:.2f}" + (f" ({100 * r['tflops'] / frac:.0f}%)" if frac else "")
            lines.append(f"| {op} | {case} | {device} | {pass_} | {r['impl']} | {r['median_ms']:.3f} | {vs_ref} | "
                         f"{vs_peer} | {gbps} | {tflops} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(dict)
    for r in rows:
        if r["op"] != "ceiling":
            groups[f"{r['op']}\n{r['case']}\n{r['device']} {r['pass_']}"][r["impl"]] = r["median_ms"]
    impls = sorted({impl for g in groups.values() for impl in g})
    names = sorted(groups)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        # speed relative to the reference (or the slowest impl) of each group: higher is better
        values = []
        for n in names:
            g = groups[n]
            base = g.get("reference", max(g.values()))
            values.append(base / g[impl] if impl in g else 0.0)
        ax.bar([k + i * width for k in range(len(names))], values, width, label=impl)
    ax.set_xticks([k + width * (len(impls) - 1) / 2 for k in range(len(names))])
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel("speed vs reference (x)")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def results_file(rows, ceil, machine, tests) -> dict:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else machine.get("cpu", {}).get("brand_raw", "cpu")
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                         cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        commit = None
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "tests": tests,
        "ceilings": {"copy_gbps": ceil.get(f"{gpu}_copy_gbps"), "bf16_matmul_tflops": ceil.get(f"{gpu}_matmul_tflops")},
        "results": [{"op": r["op"], "case": r["case"], "impl": r["impl"], "pass": r["pass_"], "device": r["device"],
                     "median_ms": round(r["median_ms"], 4),
                     "tflops": None if r["tflops"] is None else round(r["tflops"], 2),
                     "gbps": None if r["gbps"] is None else round(r["gbps"], 1)}
                    for r in rows if r["op"] != "ceiling"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--markdown")
    p.add_argument("--png")
    p.add_argument("--results")
    p.add_argument("--tests-passed", type=int, default=0)
    p.add_argument("--tests-failed", type=int, default=0)
    p.add_argument("--tests-skipped", type=int, default=0)
    args = p.parse_args(argv)
    rows, machine = load_rows(args.run)
    ceil = ceilings(rows)
    table = markdown(rows, ceil)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.png:
        chart(rows, args.png)
    if args.results:
        tests = {"passed": args.tests_passed, "failed": args.tests_failed, "skipped": args.tests_skipped}
        with open(args.results, "w") as f:
            json.dump(results_file(rows, ceil, machine, tests), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
