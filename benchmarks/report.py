"""Turn a pytest-benchmark JSON run into a markdown table, a PNG chart and
(optionally) the results file format of DESIGN.md.

    python benchmarks/report.py RUN.json [--markdown OUT.md] [--png OUT.png]
        [--results OUT.json --tests-passed N --tests-failed N --tests-skipped N]

Rows are grouped by (op, case, device, pass); each row gives the median time,
the speed-up over the reference and over the best peer, and GB/s or TFLOP/s,
also as a fraction of the ceilings (copy bandwidth, matrix rate) measured in
the same run. The table and chart code is shared with `python -m vae_ext bench`
(vae_ext/_report.py).
"""

from __future__ import annotations

import argparse
import json

from vae_ext._report import ceilings, chart, markdown, results


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


def results_file(rows, ceil, machine, tests) -> dict:
    import torch

    if torch.cuda.is_available():
        return results(rows, ceil, torch.cuda.get_device_name(), "cuda", tests)
    return results(rows, ceil, machine.get("cpu", {}).get("brand_raw", "cpu"), "cpu", tests)


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
