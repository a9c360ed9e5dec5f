"""How fast this machine multiplies DeiT-S's block matrices for fewer token rows (batch 1).

    python benchmarks/gemm_rows.py --rows 197,139,98,69
    python benchmarks/gemm_rows.py --rows 197,139,98,69 --threads 1

A token-reduction method at batch 1 shrinks the row count of every Linear after the reduction. If the
matrix library's throughput (MACs per second) drops for fewer rows, the speed ratio falls short of the
MAC ratio whatever the method's own overhead. This times the four Linears of one DeiT-S block
(qkv, proj, fc1, fc2) for each row count, interleaved, and prints time and throughput relative to the
first row count.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

from fxprune.tools.speed import interleaved, machine

_SHAPES = ((384, 1152), (384, 384), (384, 1536), (1536, 384))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="197,139,98,69")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=100, help="block matrix products per timed sample")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    layers = [torch.nn.Linear(i, o) for i, o in _SHAPES]

    def block(inputs: dict[int, torch.Tensor]) -> None:
        for _ in range(args.calls):
            for layer in layers:
                layer(inputs[layer.in_features])

    fns = {n: functools.partial(block, {i: torch.randn(n, i) for i in (384, 1536)}) for n in rows}
    timing = interleaved(fns, repeats=args.repeats)
    base = rows[0]
    print("Command: `python benchmarks/gemm_rows.py " + " ".join(sys.argv[1:]) + "`  ")
    print(f"Machine: {machine()}  ")
    print(f"Medians of {args.repeats} interleaved samples of {args.calls} block products.\n")
    print(f"| rows | MAC ratio {base} / rows | time ratio {base} / rows | throughput vs {base} rows |")
    print("|---|---|---|---|")
    for n in rows:
        ratio = timing.ratio(base, n)
        print(f"| {n} | {base / n:.2f}× | {ratio:.2f}× | {ratio * n / base:.2f} |")


if __name__ == "__main__":
    main()
