"""Training throughput of fxprune.train with 1 and with 2 processes (torchrun, gloo on the CPU).

    python benchmarks/train_processes.py                      # DynamicViT keep 0.7 on the digits ViT
    python benchmarks/train_processes.py --policy "evit:keep=0.7,layers=1,3,4" --steps 40

Each run trains the same global batch for ``--steps`` steps; the runs alternate (1, 2, 1, 2, ...) and the
ratio of the median images per second (training loop only, set-up excluded) is reported. On a 2-core machine
two processes share the cores one process already uses: this measures the overhead of data parallelism,
not a gain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

DEFAULT_POLICY = "dynamicvit:keep=0.7,layers=1,3,4"


def worker(policy: str, steps: int, batch: int) -> None:
    """One process of a run: train, and (rank 0) print the loop's seconds as JSON."""
    import fxprune
    from fxprune.tools.datasets import DigitScenes
    from fxprune.tools.distributed import process_group
    from fxprune.tools.models import digits_vit

    config = fxprune.TrainConfig(steps=steps, batch_size=batch, warmup=1)
    result = fxprune.train(digits_vit(), fxprune.parse_policy(policy), DigitScenes("train", 2048, seed=0), config,
                           progress=False)
    if process_group()[0] == 0:
        print(json.dumps({"seconds": result.seconds}))


def run(processes: int, args: argparse.Namespace) -> float:
    """Images per second of one run with ``processes`` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--worker", "--policy", args.policy, "--steps", str(args.steps), "--batch", str(args.batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // processes))}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
    return args.steps * args.batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.policy, args.steps, args.batch)
        return
    from fxprune.tools.speed import machine

    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for processes in rates:
            rates[processes].append(run(processes, args))
    one, two = (statistics.median(rates[p]) for p in (1, 2))
    print(f"Command: `python benchmarks/train_processes.py --policy {args.policy} --steps {args.steps}`  ")
    print(f"Machine: {machine()}  ")
    print(f"{args.steps} steps of global batch {args.batch} on the digits ViT, {args.repeats} runs each, alternating; "
          f"torch threads per process: the machine's divided by the processes.\n")
    print("| processes | images/s relative to 1 process |")
    print("|---|---|")
    print(f"| 1 | 1.00× |\n| 2 | {two / one:.2f}× |")


if __name__ == "__main__":
    main()
