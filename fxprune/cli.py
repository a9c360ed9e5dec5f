"""Command line: ``fxprune inspect MODEL --policy ...`` and ``fxprune demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import FxPruneError


def _inspect(args: argparse.Namespace) -> None:
    import timm

    from .analysis import analyse
    from .policies import parse_policy
    from .report import report
    from .transform import transform

    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    print(analyse(model))
    if args.policy:
        print()
        gm = transform(model, parse_policy(args.policy))
        print(report(gm))
        if args.code:
            print(gm.code)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run

    run(batch=args.batch, repeats=args.repeats)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxprune", description="Token reduction for ViTs by graph rewriting.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="analyse a timm model and show what a policy does to it")
    inspect.add_argument("model", help="timm model name, e.g. deit_small_patch16_224 (random weights)")
    inspect.add_argument("--policy", help='e.g. "evit:keep=0.7,layers=3,6,9" or "topk:keep=0.5,layers=4"')
    inspect.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    inspect.add_argument("--code", action="store_true", help="also print the rewritten forward code")
    inspect.set_defaults(func=_inspect)
    demo = sub.add_parser("demo", help="DeiT-S + EViT 0.7: plan, MACs and measured speed on this machine")
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--repeats", type=int, default=5)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except FxPruneError as err:
        print(f"fxprune: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
