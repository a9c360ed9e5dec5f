"""DynamicViT against Top-K, EViT and random keep — off the shelf and fine-tuned with the same trainer and budget —
on the embedded benchmark, over several seeds, with McNemar's test against fine-tuned Top-K.

    python benchmarks/learned_baselines.py                     # the full study (about an hour on 2 cores)
    python benchmarks/learned_baselines.py --seeds 0 --keeps 0.5 --steps 60    # a quick look

Every fine-tuning run is one ``fxprune.train`` call on 6000 DigitScenes training scenes: ``--steps`` steps of batch
``--batch``, distilling from the digits ViT. DynamicViT uses its recipe (predictors at ``--lr``, backbone at 1/100
of it and frozen for its first ``--freeze-backbone`` steps); the baselines train the backbone at ``--baseline-lr``
(chosen first on held-out validation scenes among ``--lr-grid``, with Top-K at the middle keep rate and seed 0),
Top-K and EViT with the EViT paper's keep-rate warm-up over the first quarter of the steps. Random keep keeps a
seeded random subset of the patch tokens (``fxprune.RandomKeep``; the run's seed is the subset's seed). Each
baseline runs at the keep rate that leaves the most MACs per image not above DynamicViT's at ``--keeps``
(``fxprune.tools.search.keep_rate_for``; random keep at Top-K's token counts). Accuracy
is on the 2000 test scenes ``fxprune bench`` uses (``DigitScenes("test", 2000, seed=1)``); MACs per image are
counted by ``fxprune.flops`` (DynamicViT's predictors included).

Finished runs are kept in ``--cache`` (JSON, with each run's per-image correctness), so an interrupted study
resumes; ``--jobs`` runs that many trainings at once, one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

FAMILIES = ("dynamicvit", "topk", "evit", "random")
TRAIN_SCENES, VALIDATION_SCENES, TEST_SCENES = 6000, 1000, 2000


def _policy(family: str, keep: float, layers: str, seed: int):
    import fxprune

    extra = f",seed={seed}" if family == "random" else ""
    return fxprune.parse_policy(f"{family}:keep={keep:g},layers={layers}{extra}")


def _config(family: str, seed: int, lr: float, args: argparse.Namespace):
    import fxprune

    if family == "dynamicvit":
        return fxprune.TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr,
                                   freeze_backbone=args.freeze_backbone, seed=seed)
    warmup = args.steps // 4 if family in ("topk", "evit") else 0
    return fxprune.TrainConfig(steps=args.steps, batch_size=args.batch, lr=lr, keep_warmup=warmup, seed=seed)


def _evaluate(model: torch.nn.Module, data) -> tuple[list[int], float]:
    """Per-image correctness (0/1) of ``model`` on ``data`` and its MACs per image."""
    import fxprune
    from fxprune.tools.bench import predict

    loader = torch.utils.data.DataLoader(data, batch_size=250)
    logits, labels, _ = predict(model.eval(), loader)
    macs = fxprune.flops(model, torch.stack([data[i][0] for i in range(8)]))
    return (logits.argmax(-1) == labels).int().tolist(), macs


def run_one(job: dict) -> dict:
    """One cell of the study: ``job`` names the family, keep rate, seed, lr and whether to fine-tune."""
    torch.set_num_threads(1)
    import fxprune
    from fxprune.tools.datasets import DigitScenes
    from fxprune.tools.models import digits_vit

    args = argparse.Namespace(**job["args"])
    model = digits_vit()
    evaluation = DigitScenes("train", VALIDATION_SCENES, seed=12) if job["validation"] else \
        DigitScenes("test", TEST_SCENES, seed=1)
    if job["family"] == "dense":
        correct, macs = _evaluate(model, evaluation)
        return {**job, "correct": correct, "macs": macs}
    policy = _policy(job["family"], job["keep"], args.layers, job["seed"])
    if job["tuned"]:
        config = _config(job["family"], job["seed"], job["lr"], args)
        result = fxprune.train(model, policy, DigitScenes("train", TRAIN_SCENES, seed=11), config, progress=False)
        reduced, losses = result.model, (result.losses[0], result.losses[-1])
    else:
        reduced, losses = fxprune.transform(model, policy), None
    correct, macs = _evaluate(reduced, evaluation)
    return {**job, "correct": correct, "macs": macs, "losses": losses}


def matched_keep_rates(keep: float, layers: str) -> dict[str, float]:
    """Each family's keep rate at DynamicViT's MACs per image for ``keep`` (the most MACs not above them)."""
    import fxprune
    from fxprune.tools.datasets import DigitScenes
    from fxprune.tools.models import digits_vit
    from fxprune.tools.search import keep_rate_for, mac_fraction

    model, blocks = digits_vit(), [int(b) for b in layers.split(",")]
    images = torch.stack([DigitScenes("test", 2, seed=1)[i][0] for i in range(2)])
    fraction = mac_fraction(model, _policy("dynamicvit", keep, layers, 0), images)
    topk = keep_rate_for(model, fxprune.TopK, blocks, fraction)
    evit = keep_rate_for(model, fxprune.EViT, blocks, fraction)
    return {"dynamicvit": keep, "topk": topk, "random": topk, "evit": evit}


def _key(job: dict) -> str:
    key = "|".join(str(job[k]) for k in ("family", "keep", "seed", "tuned", "lr", "validation"))
    return key + (f"|{job['decides']}" if "decides" in job else "")  # AdaViT's (adavit_study.py): the kinds decided


def _run_all(jobs: list[dict], cache: Path, workers: int, fn: Callable[[dict], dict] = run_one) -> dict[str, dict]:
    """Results of ``jobs``, from ``cache`` where done, the rest run by ``fn`` ``workers`` at a time and added to
    it."""
    done = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [job for job in jobs if _key(job) not in done]
    if todo:
        print(f"{len(todo)} runs to do ({len(jobs) - len(todo)} cached)", flush=True)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for result in pool.map(fn, todo):
                done = json.loads(cache.read_text()) if cache.exists() else {}  # another study may have added runs
                done[_key(result)] = result
                cache.write_text(json.dumps(done))
                print(f"  done: {_key(result)}: top-1 {100 * statistics.mean(result['correct']):.2f}%", flush=True)
    return {_key(job): done[_key(job)] for job in jobs}


def mcnemar(first: list[int], second: list[int]) -> tuple[int, int, float]:
    """McNemar's exact test on paired correctness: (images only ``first`` gets right, images only ``second``
    gets right, two-sided p-value)."""
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    n, low = b + c, min(b, c)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2**n)
    return b, c, p


def _job(family: str, keep: float, seed: int, tuned: bool, lr: float, args, validation: bool = False) -> dict:
    return {"family": family, "keep": keep, "seed": seed, "tuned": tuned, "lr": lr, "validation": validation,
            "args": vars(args)}


def _accuracy(result: dict) -> float:
    return 100 * statistics.mean(result["correct"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", default="0.7,0.5,0.35")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--layers", default="1,3,4")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="DynamicViT's predictors (backbone: 1/100)")
    parser.add_argument("--freeze-backbone", type=int, default=100, help="DynamicViT: steps with the backbone frozen")
    parser.add_argument("--lr-grid", default="3e-5,1e-4,3e-4", help="the baselines' backbone lr, chosen on validation")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cache", default="learned_baselines.json")
    args = parser.parse_args()
    from fxprune.tools.speed import machine

    keeps = [float(k) for k in args.keeps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = [float(lr) for lr in args.lr_grid.split(",")]
    cache = Path(args.cache)
    rates = {keep: matched_keep_rates(keep, args.layers) for keep in keeps}
    middle = rates[keeps[len(keeps) // 2]]["topk"]
    pilot = _run_all([_job("topk", middle, 0, True, lr, args, validation=True) for lr in grid], cache, args.jobs)
    scores = {lr: _accuracy(pilot[_key(_job("topk", middle, 0, True, lr, args, True))]) for lr in grid}
    baseline_lr = max(grid, key=lambda lr: scores[lr])

    def job(family: str, keep: float, tuned: bool, seed: int) -> dict:
        lr = 0.0 if not tuned else (args.lr if family == "dynamicvit" else baseline_lr)
        return _job(family, rates[keep][family], seed, tuned, lr, args)

    jobs = [_job("dense", 1.0, 0, False, 0.0, args)]
    for keep in keeps:
        jobs += [job(family, keep, False, 0) for family in ("topk", "evit")]
        jobs += [job("random", keep, False, seed) for seed in seeds]
        jobs += [job(family, keep, True, seed) for family in FAMILIES for seed in seeds]
    results = _run_all(jobs, cache, args.jobs)

    def cell(family: str, keep: float, tuned: bool, seed: int) -> dict:
        return results[_key(job(family, keep, tuned, seed))]

    dense = results[_key(jobs[0])]
    command = "python benchmarks/learned_baselines.py"
    options = (f" --keeps {args.keeps} --seeds {args.seeds} --layers {args.layers} --steps {args.steps} "
               f"--batch {args.batch}")
    print(f"\nCommand: `{command}{options}`  ")
    print(f"Machine: {machine()}  ")
    print(f"digits ViT, blocks {args.layers}; {TEST_SCENES} test scenes; fine-tuning: {args.steps} steps of batch "
          f"{args.batch} per run, seeds {args.seeds}. Baselines' backbone lr {baseline_lr:g}, chosen on "
          f"{VALIDATION_SCENES} validation scenes (Top-K keep {middle:g}, seed 0: "
          + ", ".join(f"lr {lr:g} {scores[lr]:.2f}%" for lr in grid) + f"). Dense top-1 {_accuracy(dense):.2f}%, "
          f"{dense['macs'] / 1e6:.1f} M MACs.\n")
    print("| DynamicViT keep | method (keep rate) | % of dense MACs | top-1 (%) mean ± sd | per seed | Δ vs dense |")
    print("|---|---|---|---|---|---|")
    for keep in keeps:
        rows = [("Top-K off the shelf", "topk", False, [0]), ("EViT off the shelf", "evit", False, [0]),
                ("random keep off the shelf", "random", False, seeds),
                ("random keep fine-tuned", "random", True, seeds),
                ("Top-K fine-tuned", "topk", True, seeds), ("EViT fine-tuned", "evit", True, seeds),
                ("**DynamicViT**", "dynamicvit", True, seeds)]
        for name, family, tuned, runs in rows:
            cells = [cell(family, keep, tuned, seed) for seed in runs]
            accuracies = [_accuracy(c) for c in cells]
            mean = statistics.mean(accuracies)
            spread = f" ± {statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else ""
            per_seed = " / ".join(f"{a:.2f}" for a in accuracies)
            macs = 100 * cells[0]["macs"] / dense["macs"]
            print(f"| {keep:g} | {name} ({rates[keep][family]:g}) | {macs:.1f} | {mean:.2f}{spread} | {per_seed} | "
                  f"{mean - _accuracy(dense):+.2f} |")
    print("\nMcNemar's exact test, DynamicViT against fine-tuned Top-K on the same test images (b: only DynamicViT "
          "right, c: only Top-K right), per seed and pooled over seeds:\n")
    print("| keep | " + " | ".join(f"seed {s}: b / c, p" for s in seeds) + " | pooled b / c, p |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for keep in keeps:
        tests, pooled = [], ([], [])
        for seed in seeds:
            learned, topk = cell("dynamicvit", keep, True, seed)["correct"], cell("topk", keep, True, seed)["correct"]
            b, c, p = mcnemar(learned, topk)
            tests.append(f"{b} / {c}, {p:.3g}")
            pooled[0].extend(learned)
            pooled[1].extend(topk)
        b, c, p = mcnemar(*pooled)
        print(f"| {keep:g} | " + " | ".join(tests) + f" | {b} / {c}, {p:.3g} |")


if __name__ == "__main__":
    main()
