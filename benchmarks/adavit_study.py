"""AdaViT on the embedded benchmark, beside DynamicViT, Top-K, EViT and random usage at matched MACs: accuracy,
executed MACs per image and speed, over several seeds, with an ablation of what it decides.

    python benchmarks/adavit_study.py                              # the full study (about an hour on 2 cores)
    python benchmarks/adavit_study.py --usages 0.5 --seeds 0 --steps 60 --ablation "" --cache quick.json
    python benchmarks/adavit_study.py --ablation "" --weights-only   # only the trained weights adavit_speed.py reads

Every AdaViT run is one ``fxprune.train`` call with the recipe below on the 6000 DigitScenes training scenes of
``benchmarks/learned_baselines.py`` (``--steps`` steps of batch ``--batch``, the budget of its DynamicViT runs):
decision heads at ``--lr``, the backbone at ``--lr`` · ``--backbone-lr-scale``, decision heads starting at the
constant logit ``--init`` (every part used), AdaViT's own loss (no distillation, the official default). Its
fine-tuned state is written to ``--weights-dir``. For each trained model:

* executed MACs per image: the mean over ``--mac-images`` test scenes, each run alone (``per_image_macs``);
* random usage at matched MACs: the same fine-tuned model with its decision heads replaced by a random usage
  (``fxprune.methods.adavit.set_usage``: heads and sub-layers a random subset, rows a random share per image),
  the usage chosen by bisection so that its MACs per image are the most not above the trained model's; and the
  same on the original digits ViT (off the shelf).

Top-K and EViT then run at the keep rate whose MACs per image are the most not above the mean of AdaViT's
at that usage (blocks ``--baseline-layers``; off the shelf, and Top-K fine-tuned with the trainer and recipe of
``learned_baselines.py``: backbone lr ``--baseline-lr``, the one it chose on validation scenes, and the EViT
keep-rate warm-up). DynamicViT's rows are that study's runs (same cache). The ablation trains AdaViT at the usage
``--ablation`` deciding one kind only (heads, sub-layers or patches). Speed: the seed-0 models against the dense
model, interleaved, median of ``--repeats`` rounds, at batch 1 (``--speed-images`` images one by one) and 32.
Accuracy is on the 2000 test scenes ``fxprune bench`` uses. Runs are cached in ``--cache`` (shared with
``learned_baselines.py``), so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

import learned_baselines as baselines

ALL = "heads,sublayers,tokens"
KINDS = {"heads": "heads only", "sublayers": "sub-layers only", "tokens": "patches only", ALL: "all three"}


def _policy(usage: float, decides: str, init: float, weights: str | None = None):
    import fxprune

    return fxprune.AdaViT(usage, init_logit=init, decides=tuple(decides.split(",")), weights=weights)


def weights_name(usage: float, decides: str, seed: int | str) -> str:
    """The file a run's fine-tuned state is written to, in ``--weights-dir`` (``seed`` ``"*"``: a glob of all)."""
    return f"adavit_{usage:g}_{decides.replace(',', '+')}_{seed}.pt"


def test_images(count: int) -> torch.Tensor:
    from fxprune.tools.datasets import DigitScenes

    data = DigitScenes("test", baselines.TEST_SCENES, seed=1)
    return torch.stack([data[i][0] for i in range(count)])


def _random_usage(base: torch.nn.Module, images: torch.Tensor, macs: float, decides: str) -> tuple[float, object]:
    """``base`` (an AdaViT model) with a random usage of the kinds ``decides`` whose MACs per image over ``images``
    are the most not above ``macs``: (that usage, the model)."""
    from fxprune.methods.adavit import set_usage
    from fxprune.tools.bench import per_image_macs

    def at(usage: float):
        model = copy.deepcopy(base)
        set_usage(model, images, usage, tuple(decides.split(",")))
        return model, per_image_macs(model, images)

    low, high = 0.0, 1.0
    best = at(low)[0]
    for _ in range(9):
        middle = (low + high) / 2
        model, spent = at(middle)
        low, high, best = (middle, high, model) if spent <= macs else (low, middle, best)
    return low, best


def _weights_file(job: dict) -> Path:
    """Where ``job``'s fine-tuned state is written: ``--weights-dir`` / :func:`weights_name`."""
    return Path(job["args"]["weights_dir"]) / weights_name(job["keep"], job["decides"], job["seed"])


def _train(job: dict):
    """Train AdaViT at ``job``'s usage, kinds and seed with the study's recipe and write its fine-tuned state to
    ``--weights-dir``: (the training result, the weights file)."""
    torch.set_num_threads(1)
    import fxprune
    from fxprune.tools.datasets import DigitScenes
    from fxprune.tools.models import digits_vit

    args = argparse.Namespace(**job["args"])
    config = fxprune.TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=job["seed"],
                                 backbone_lr_scale=args.backbone_lr_scale, keep_warmup=args.keep_warmup)
    result = fxprune.train(digits_vit(), _policy(job["keep"], job["decides"], args.init),
                           DigitScenes("train", baselines.TRAIN_SCENES, seed=11), config, progress=False)
    weights = _weights_file(job)
    weights.parent.mkdir(parents=True, exist_ok=True)
    fxprune.save_weights(result.model, weights, backbone=True)
    return result, weights


def write_weights(job: dict) -> str:
    """Train AdaViT for ``job`` and write its weights (``--weights-only``): the weights file."""
    return str(_train(job)[1])


def run_adavit(job: dict) -> dict:
    """Train AdaViT at ``job``'s usage, kinds and seed; measure it and its random-usage baselines."""
    import fxprune
    from fxprune.tools.bench import per_image_macs
    from fxprune.tools.datasets import DigitScenes
    from fxprune.tools.models import digits_vit

    args = argparse.Namespace(**job["args"])
    model, test = digits_vit(), DigitScenes("test", baselines.TEST_SCENES, seed=1)
    policy = _policy(job["keep"], job["decides"], args.init)
    result, weights = _train(job)
    images = test_images(args.mac_images)
    correct, _ = baselines._evaluate(result.model, test)
    macs = per_image_macs(result.model, images)
    random = {}
    for name, base in (("tuned", result.model), ("original", fxprune.transform(model, policy))):
        usage, chosen = _random_usage(base, images[:100], macs, job["decides"])
        random[name] = {"usage": usage, "correct": baselines._evaluate(chosen, test)[0],
                        "macs": per_image_macs(chosen, images)}
    return {**job, "correct": correct, "macs": macs, "dense_macs": per_image_macs(model, images[:1]),
            "random": random, "weights": str(weights), "losses": (result.losses[0], result.losses[-1])}


def _adavit_job(usage: float, decides: str, seed: int, args) -> dict:
    return {**baselines._job("adavit", usage, seed, True, args.lr, args), "decides": decides}


def _row(name: str, cells: list[dict], dense: dict) -> str:
    accuracies = [baselines._accuracy(c) for c in cells]
    mean = statistics.mean(accuracies)
    spread = f" ± {statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else ""
    macs = 100 * statistics.mean(c["macs"] for c in cells) / dense["macs"]
    return (f"| {name} | {macs:.1f} | {mean:.2f}{spread} | {' / '.join(f'{a:.2f}' for a in accuracies)} | "
            f"{mean - baselines._accuracy(dense):+.2f} |")


def _macs(weights: str, usage: float, count: int) -> float:
    """MACs per image of the trained model in ``weights`` over the first ``count`` test scenes, each alone."""
    import fxprune
    from fxprune.tools.bench import per_image_macs
    from fxprune.tools.models import digits_vit

    return per_image_macs(fxprune.transform(digits_vit(), fxprune.AdaViT(usage, weights=weights)), test_images(count))


def _speed(weights: str, usage: float, repeats: int, count: int) -> tuple[float, float, float]:
    """(dense MACs / AdaViT's per image, speed-up at batch 1, speed-up at batch 32) of a trained model."""
    import fxprune
    from fxprune.tools.bench import per_image_macs
    from fxprune.tools.models import digits_vit
    from fxprune.tools.speed import interleaved

    model = digits_vit().eval()
    gm = fxprune.transform(model, fxprune.AdaViT(usage, weights=weights)).eval()
    images, batch = test_images(count), test_images(32)
    ratio = per_image_macs(model, images[:1]) / per_image_macs(gm, images)
    one = interleaved({"dense": lambda: [model(x[None]) for x in images], "adavit": lambda: [gm(x[None])
                       for x in images]}, repeats=repeats)
    many = interleaved({"dense": lambda: model(batch), "adavit": lambda: gm(batch)}, repeats=repeats)
    return ratio, one.ratio("dense", "adavit"), many.ratio("dense", "adavit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--usages", default="0.7,0.5,0.35")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ablation", default="0.5", help="the usage of the ablation (empty: none)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="the decision heads' lr")
    parser.add_argument("--backbone-lr-scale", type=float, default=1.0)
    parser.add_argument("--init", type=float, default=3.0, help="the decision heads' starting logit")
    parser.add_argument("--keep-warmup", type=int, default=0, help="steps over which the target usage falls from 1")
    parser.add_argument("--baseline-layers", default="1,3,4")
    parser.add_argument("--baseline-lr", type=float, default=1e-4)
    parser.add_argument("--dynamicvit-keeps", default="0.7,0.5,0.35", help="DynamicViT rows (learned_baselines.py)")
    parser.add_argument("--mac-images", type=int, default=500)
    parser.add_argument("--speed-images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--weights-dir", default="adavit_study")
    parser.add_argument("--recount", action="store_true",
                        help="also count the trained models' MACs again with this version's graph")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cache", default="learned_baselines.json")
    parser.add_argument("--weights-only", action="store_true",
                        help="only train the AdaViT runs and write their weights to --weights-dir (what "
                             "adavit_speed.py --trained reads), skipping those written already")
    args = parser.parse_args()
    import fxprune
    from fxprune.tools.models import digits_vit
    from fxprune.tools.search import keep_rate_for
    from fxprune.tools.speed import machine

    usages = [float(u) for u in args.usages.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = Path(args.cache)
    jobs = [_adavit_job(u, ALL, s, args) for u in usages for s in seeds]
    if args.ablation:
        jobs += [_adavit_job(float(args.ablation), kind, s, args) for kind in ("heads", "sublayers", "tokens")
                 for s in seeds]
    if args.weights_only:
        todo = [job for job in jobs if not _weights_file(job).exists()]
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for written in pool.map(write_weights, todo):
                print(f"wrote {written}", flush=True)
        return
    runs = baselines._run_all(jobs, cache, args.jobs, run_adavit)

    def adavit(usage: float, decides: str = ALL) -> list[dict]:
        return [runs[baselines._key(_adavit_job(usage, decides, s, args))] for s in seeds]

    # Top-K and EViT at AdaViT's MACs, and DynamicViT's runs, through learned_baselines' runner.
    shared = argparse.Namespace(layers=args.baseline_layers, steps=args.steps, batch=args.batch, lr=1e-3,
                                freeze_backbone=100)
    model, blocks = digits_vit(), [int(b) for b in args.baseline_layers.split(",")]
    fractions = {u: statistics.mean(r["macs"] / r["dense_macs"] for r in adavit(u)) for u in usages}
    rates = {u: {"topk": keep_rate_for(model, fxprune.TopK, blocks, f), "evit": keep_rate_for(model, fxprune.EViT,
             blocks, f)} for u, f in fractions.items()}

    def baseline(family: str, usage: float, tuned: bool, seed: int) -> dict:
        lr = 0.0 if not tuned else args.baseline_lr
        return baselines._job(family, rates[usage][family], seed, tuned, lr, shared)

    dynamicvit_keeps = [float(k) for k in args.dynamicvit_keeps.split(",")] if args.dynamicvit_keeps else []
    others = [baselines._job("dense", 1.0, 0, False, 0.0, shared)]
    for usage in usages:
        others += [baseline(family, usage, False, 0) for family in ("topk", "evit")]
        others += [baseline("topk", usage, True, s) for s in seeds]
    others += [baselines._job("dynamicvit", k, s, True, 1e-3, shared) for k in dynamicvit_keeps for s in seeds]
    results = baselines._run_all(others, cache, args.jobs)
    dense = results[baselines._key(others[0])]

    def cells(jobs_: list[dict]) -> list[dict]:
        return [results[baselines._key(job)] for job in jobs_]

    print(f"\nCommand: `python benchmarks/adavit_study.py --usages {args.usages} --seeds {args.seeds} --ablation "
          f"'{args.ablation}' --steps {args.steps} --batch {args.batch} --lr {args.lr:g} --backbone-lr-scale "
          f"{args.backbone_lr_scale:g} --init {args.init:g} --keep-warmup {args.keep_warmup}"
          + (" --recount" if args.recount else "") + "`  ")
    print(f"Machine: {machine()}  ")
    print(f"digits ViT; {baselines.TEST_SCENES} test scenes; MACs per image over {args.mac_images} of them, each "
          f"alone. Dense top-1 {baselines._accuracy(dense):.2f}%, {dense['macs'] / 1e6:.1f} M MACs. Top-K/EViT at "
          f"blocks {args.baseline_layers}, fine-tuned with backbone lr {args.baseline_lr:g}.\n")
    print("| usage γ | method (setting) | % of dense MACs | top-1 (%) mean ± sd | per seed | Δ vs dense |")
    print("|---|---|---|---|---|---|")
    for usage in usages:
        trained = adavit(usage)
        rows = [(f"**AdaViT** (γ {usage:g})", trained)]
        for name, which in (("random usage, AdaViT's fine-tuned backbone", "tuned"),
                            ("random usage off the shelf", "original")):
            randoms = [{**r["random"][which]} for r in trained]
            used = "/".join(f"{r['usage']:.2f}" for r in randoms)
            rows.append((f"{name} (usage {used})", randoms))
        for family, name in (("topk", "Top-K"), ("evit", "EViT")):
            rows.append((f"{name} off the shelf (keep {rates[usage][family]:g})",
                         cells([baseline(family, usage, False, 0)])))
        rows.append((f"Top-K fine-tuned (keep {rates[usage]['topk']:g})",
                     cells([baseline("topk", usage, True, s) for s in seeds])))
        for name, found in rows:
            print(f"| {usage:g} " + _row(name, found, dense))
    for keep in dynamicvit_keeps:
        found = cells([baselines._job("dynamicvit", keep, s, True, 1e-3, shared) for s in seeds])
        print("| – " + _row(f"DynamicViT keep {keep:g} (learned_baselines.py)", found, dense))
    print("\nMcNemar's exact test, AdaViT against Top-K fine-tuned at its MACs (b: only AdaViT right, c: only Top-K "
          "right), pooled over seeds:\n")
    print("| usage γ | b / c | p |")
    print("|---|---|---|")
    for usage in usages:
        first = [x for r in adavit(usage) for x in r["correct"]]
        second = [x for r in cells([baseline("topk", usage, True, s) for s in seeds]) for x in r["correct"]]
        b, c, p = baselines.mcnemar(first, second)
        print(f"| {usage:g} | {b} / {c} | {p:.3g} |")
    if args.ablation:
        usage = float(args.ablation)
        print(f"\nAblation at γ {usage:g}: AdaViT deciding one kind only (the others always used).\n")
        print("| decides | % of dense MACs | top-1 (%) mean ± sd | per seed | Δ vs dense |")
        print("|---|---|---|---|---|")
        for kind in ("heads", "sublayers", "tokens", ALL):
            print(_row(KINDS[kind], adavit(usage, kind), dense))
    if args.recount:
        print("\nMACs per image of the trained models (% of dense), as cached and counted again now:\n")
        print("| usage γ | cached, per seed | now, per seed |")
        print("|---|---|---|")
        for usage in usages:
            cached = [100 * r["macs"] / r["dense_macs"] for r in adavit(usage)]
            now = [100 * _macs(r["weights"], usage, args.mac_images) / r["dense_macs"] for r in adavit(usage)]
            print(f"| {usage:g} | {' / '.join(f'{m:.2f}' for m in cached)} | {' / '.join(f'{m:.2f}' for m in now)} |")
    print(f"\nSpeed of the seed-{seeds[0]} models against the dense digits ViT (eager, skipping; interleaved, median "
          f"of {args.repeats}; batch 1: {args.speed_images} images one by one):\n")
    print("| usage γ | dense / AdaViT MACs | speed-up, batch 1 | speed-up, batch 32 |")
    print("|---|---|---|---|")
    torch.set_num_threads(2)
    for usage in usages:
        ratio, one, many = _speed(adavit(usage)[0]["weights"], usage, args.repeats, args.speed_images)
        print(f"| {usage:g} | {ratio:.2f}× | {one:.2f}× | {many:.2f}× |")


if __name__ == "__main__":
    main()
