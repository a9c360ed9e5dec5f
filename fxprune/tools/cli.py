"""Command line: ``fxprune inspect | bench | show | train | export | zoo | demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from ..errors import FxPruneError
from ..exporting import FORMATS
from ..methods import methods


def _inspect(args: argparse.Namespace) -> None:
    from ..analysis import analyse
    from ..pipeline import transform
    from ..policies import parse_policy
    from ..reporting import report

    model = _named_model(args.model, img_size=args.img_size)
    print(analyse(model))
    if args.policy:
        print()
        gm = transform(model, parse_policy(args.policy))
        print(report(gm))
        if args.code:
            print(gm.code)


def _named_model(name: str, pretrained: bool = False, img_size: int | None = None, also: str = "") -> torch.nn.Module:
    """The model a command names, in evaluation mode: a shipped digits model, or a timm model (random weights
    unless ``pretrained``; ``img_size`` None: its own). A name neither is an :class:`FxPruneError` that lists what
    the command takes (``also``: what else it takes)."""
    import timm

    from .models import DIGITS_MODELS

    if name in DIGITS_MODELS:
        if img_size:
            raise FxPruneError(f"--img-size is for timm models; {name} takes its 64×64 scenes")
        return DIGITS_MODELS[name]().eval()
    if not timm.is_model(name):
        raise FxPruneError(f"unknown model {name!r}: give {', '.join(map(repr, DIGITS_MODELS))}{also} or a timm model "
                           "name (timm.list_models())")
    kwargs = {"img_size": img_size} if img_size else {}
    return timm.create_model(name, pretrained=pretrained, **kwargs).eval()


def _zoo(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .zoo import ZOO, table, try_all, with_table

    chosen = [entry for entry in ZOO if not args.models or entry.name in args.models]
    print(f"trying every method on {len(chosen)} models in {args.processes} process(es)", file=sys.stderr, flush=True)
    text = table([outcome for outcomes in try_all(chosen, args.processes) for outcome in outcomes])
    if args.write:
        path = Path(args.write)
        path.write_text(with_table(path.read_text(), text))
        print(f"wrote the table into {path}", file=sys.stderr)
    print(text)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run

    run(scenes=args.scenes, picture=args.out, repeats=args.repeats)


def _model_and_data(args: argparse.Namespace):
    """The model and dataset a ``bench``/``show`` command names: the embedded default or timm + ImageFolder."""
    from .bench import imagefolder
    from .datasets import DigitScenes
    from .models import DIGITS_MODELS

    if args.model in DIGITS_MODELS:
        build = DIGITS_MODELS[args.model]
        return build(), DigitScenes("test", args.images, seed=1), build.__name__, "DigitScenes test"
    if args.data is None:
        raise FxPruneError(f"--data DIR is needed for {args.model}: an ImageFolder in ImageNet-val layout")
    model = _named_model(args.model, args.pretrained)
    data = imagefolder(model, args.data)
    if args.images < len(data):
        data = torch.utils.data.Subset(data, range(args.images))
    weights = "pretrained" if args.pretrained else "random weights"
    return model, data, f"{args.model} ({weights})", f"ImageFolder {args.data}"


CALIBRATION_IMAGES = 256  # images the sweep fits ATS's settings on, by their mean MACs each run alone


def _calibration(args: argparse.Namespace, model) -> torch.Tensor:
    """Images to fit adaptive settings on, apart from the evaluated ones: DigitScenes training scenes for the
    embedded model; for an ImageFolder, the images after the evaluated ones (or, if there are none, the first)."""
    from .datasets import DigitScenes
    from .models import DIGITS_MODELS

    if args.model in DIGITS_MODELS:
        data = DigitScenes("train", CALIBRATION_IMAGES, seed=0)
        return torch.stack([data[i][0] for i in range(len(data))])
    from .bench import imagefolder

    data = imagefolder(model, args.data)
    start = args.images if len(data) > args.images else 0
    if start == 0:
        print(f"note: no images beyond the first {args.images} to calibrate on; calibrating on evaluated images")
    return torch.stack([data[i][0] for i in range(start, min(len(data), start + CALIBRATION_IMAGES))])


def _policies(args: argparse.Namespace, model, data) -> list:
    from ..policies import parse_policy
    from .search import sweep_policies

    if args.policy:
        return [parse_policy(p) for p in args.policy]
    example = (torch.stack([data[i][0] for i in range(2)]),)
    return sweep_policies(model, None, example_inputs=example, calibration=_calibration(args, model))


def _bench(args: argparse.Namespace) -> None:
    from .bench import plot, run
    from .distributed import process_group

    model, data, model_name, data_name = _model_and_data(args)
    result = run(model, _policies(args, model, data), data, batch_size=args.batch, speed_batch=args.speed_batch,
                 repeats=args.repeats, model_name=model_name, data_name=data_name)
    if process_group()[0] != 0:  # under torchrun, rank 0 reports
        return
    print(result.markdown())
    if args.plot:
        plot(result, args.plot)
        print(f"\nwrote {args.plot}")


def _show(args: argparse.Namespace) -> None:
    from ..methods import method_of
    from ..pipeline import transform
    from ..policies import parse_policy
    from .search import default_policy
    from .show import draw_clusters, draw_kept_patches, draw_usage, kept_counts, usage

    if args.dense:
        _show_dense(args)
        return
    if args.policy and len(args.policy) > 1:
        raise FxPruneError("show draws one policy's blocks: give --policy once (with --dense it compares the patch "
                           "masks of several)")
    model, data, _, _ = _model_and_data(args)
    images = torch.stack([data[i][0] for i in range(args.scenes)])
    labels = [str(data[i][1]) for i in range(args.scenes)]
    policy = parse_policy(args.policy[0]) if args.policy else default_policy(model, example_inputs=(images[:2],))
    reduced = transform(model, policy, example_inputs=(images[:2],))
    used = usage(reduced, images)
    if used:
        print(f"wrote {draw_usage(reduced, images, args.out, labels=labels)}: {policy}")
        for block in used:
            print(f"  {block.summary()}")
        return
    if not any(method_of(part).reduces_tokens for part in policy.policies()):
        print(f"wrote {draw_clusters(reduced, images, args.out, labels=labels)}: {policy}")
        return
    print(f"wrote {draw_kept_patches(reduced, images, args.out, labels=labels)}: {policy}")
    for block, mean, low, high in kept_counts(reduced, images):
        print(f"  block {block}: {mean:.1f} tokens kept per image (min {low}, max {high})")


def _show_dense(args: argparse.Namespace) -> None:
    """The digits ViT as a backbone (every token out): a linear probe fitted on its dense patch features, applied to
    each policy's restored features; their patch masks drawn beside the truth, their scores printed."""
    from ..analysis import analyse
    from ..counting import flops
    from ..pipeline import transform
    from ..policies import parse_policy
    from .datasets import DigitScenes
    from .models import DIGITS_MODELS
    from .probe import TEST_SEED, TRAIN_SEED, fit_probe, labelled_scenes, mask_scores, patch_features
    from .search import default_policy
    from .show import draw_patch_masks

    if args.model not in DIGITS_MODELS:
        raise FxPruneError("show --dense needs scenes whose patches are labelled: --model "
                           f"{' or '.join(DIGITS_MODELS)} (DigitScenes), not {args.model}")
    backbone = DIGITS_MODELS[args.model]()
    backbone.reset_classifier(0, "")  # its output: every token
    prefix = analyse(backbone).prefix_tokens
    train_images, train_labels = labelled_scenes("train", args.probe_scenes, seed=TRAIN_SEED)
    probe = fit_probe(patch_features(backbone, train_images, prefix), train_labels)
    images, truth = labelled_scenes("test", max(args.images, args.scenes), seed=TEST_SEED)
    example = (images[:2],)
    policies = ([parse_policy(p) for p in args.policy] if args.policy
                else [default_policy(backbone, example_inputs=example)])
    print(f"a linear probe on the dense {args.model} ViT's patch features ({args.probe_scenes} training scenes), on "
          f"{len(images)} test scenes: patch accuracy, mean IoU over background, digit and distractor, MACs")
    dense_macs = flops(backbone, images[:1])
    masks = {"truth": truth}
    for name, model in [("dense", backbone)] + [(p.describe(), transform(backbone, p, example_inputs=example))
                                                  for p in policies]:
        masks[name] = probe.predict(patch_features(model, images, prefix))
        scores = mask_scores(masks[name], truth)
        print(f"  {name}: {scores.accuracy:.1f}% of patches, mIoU {scores.miou:.1f}%, "
              f"{100 * flops(model, images[:1]) / dense_macs:.1f}% of the MACs")
    data = DigitScenes("test", len(images), seed=TEST_SEED)
    path = draw_patch_masks(images[:args.scenes], {name: mask[:args.scenes] for name, mask in masks.items()}, args.out,
                            labels=[str(data[i][1]) for i in range(args.scenes)])
    print(f"wrote {path}: {args.scenes} test scenes, the true patch classes, then each model's predicted ones")


def _train(args: argparse.Namespace) -> None:
    from ..passes.learned import learned_state_dict, save_weights
    from ..policies import parse_policy
    from .datasets import DigitScenes
    from .distributed import process_group
    from .models import DIGITS_MODELS
    from .show import usage
    from .train import TrainConfig, train

    model, data, model_name, _ = _model_and_data(args)
    train_data = DigitScenes("train", args.train_images, seed=11) if args.model in DIGITS_MODELS else data
    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=args.warmup,
                         freeze_backbone=args.freeze_backbone, eval_every=args.eval_every, seed=args.seed,
                         backbone_lr_scale=args.backbone_lr_scale, distill_weight=args.distill_weight,
                         keep_warmup=args.keep_warmup)
    policy = parse_policy(args.policy)
    result = train(model, policy, train_data, config, eval_data=data, checkpoint=args.out, resume=args.resume)
    if process_group()[0] != 0:
        return
    print(f"{policy.describe()} on {model_name}: {config.steps} steps of batch {config.batch_size}; "
          f"loss {result.losses[0]:.3f} → {result.losses[-1]:.3f}")
    for step, accuracy in result.evaluations:
        print(f"  step {step}: top-1 {100 * accuracy:.2f}% on {len(data)} evaluation images")
    images = torch.stack([data[i][0] for i in range(min(len(data), 200))])
    measured = [f"{block.summary()} (on {len(images)} evaluation images)" for block in usage(result.model, images)]
    for line in measured:
        print(f"  {line}")
    if learned_state_dict(result.model) and args.weights_out:
        notes = [f"expected usage, measured after training: {line}" for line in measured]
        path = save_weights(result.model, args.weights_out, backbone=True, notes=notes)
        print(f"wrote {path}: the learned parts and the fine-tuned backbone (load with the policy's weights=)")
    elif args.weights_out:
        own = model.state_dict()  # the original's keys (a trace may add constants it copied, which it has not)
        torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items() if k in own}, args.weights_out)
        print(f"wrote {args.weights_out}: the fine-tuned weights (they load into the original model)")


def _export_model(args: argparse.Namespace):
    """The model ``fxprune export`` names: a digits model, a saved module (a ``torch.save``'d ``nn.Module``) or a
    timm model name; with ``--weights`` a state_dict loaded into it."""
    from pathlib import Path

    from .models import DIGITS_MODELS

    if args.model not in DIGITS_MODELS and Path(args.model).is_file():
        model = torch.load(args.model, weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise FxPruneError(f"{args.model} holds a {type(model).__name__}, not a saved nn.Module")
    else:
        model = _named_model(args.model, args.pretrained, args.img_size, ", a saved nn.Module (a file)")
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu"))
    return model.eval()


def _static(policy):
    """``policy`` with every part that skips per image (AdaViT) in its masked form, which exports."""
    import dataclasses

    from ..policies import Compose

    parts = [dataclasses.replace(part, skip=False) if getattr(part, "skip", False) else part
             for part in policy.policies()]
    return parts[0] if not isinstance(policy, Compose) else Compose(parts)


def _export(args: argparse.Namespace) -> None:
    from ..capture import default_example_inputs
    from ..exporting import export
    from ..pipeline import transform
    from ..policies import parse_policy

    model = _export_model(args)
    gm = model
    if args.policy:
        policy = parse_policy(args.policy)
        static = _static(policy)
        if static != policy:
            print("note: AdaViT exports in its masked form (skip=False): the same outputs, static shapes")
        gm = transform(model, static)
        print(gm.fxprune_plan)
        if any(row.method is not None and row.method.pads_tokens for row in gm.fxprune_plan.rows):
            print("note: the exported graph runs the static padded layout (ATS: its max_tokens rows per image), so "
                  "its cost is the cap's, not each image's")
    inputs = default_example_inputs(gm, batch_size=args.batch)
    dtype = getattr(torch, args.dtype)
    print(f"exported {export(gm, inputs, args.out, args.format, verify=not args.no_verify, dtype=dtype)}")


def _add_model_options(parser: argparse.ArgumentParser, images: int) -> None:
    parser.add_argument("--model", default="digits",
                        help="'digits' (embedded, default), 'digits-relpos' (the same with a relative position bias, "
                             "from the same weights) or a timm model name")
    parser.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights")
    parser.add_argument("--data", help="ImageFolder root in ImageNet-val layout (for a timm model)")
    parser.add_argument("--images", type=int, default=images, help="how many images to use")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxprune", description="Token reduction for ViTs by graph rewriting.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="analyse a model (a digits ViT or timm) and show what a policy does to it")
    inspect.add_argument("model", help="'digits', 'digits-relpos' or a timm model name, e.g. deit_small_patch16_224 "
                                       "(random weights)")
    known = f"methods: {', '.join(method.name for method in methods())}"
    inspect.add_argument("--policy", help=f'e.g. "evit:keep=0.7,layers=3,6,9" or "topk:keep=0.5,layers=4" ({known})')
    inspect.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    inspect.add_argument("--code", action="store_true", help="also print the rewritten forward code")
    inspect.set_defaults(func=_inspect)
    bench = sub.add_parser("bench", help="accuracy, MACs and measured speed of policies against the dense model")
    _add_model_options(bench, images=2000)
    bench.add_argument("--policy", action="append", help=f"repeatable ({known}); default: every method's sweep")
    bench.add_argument("--batch", type=int, default=100, help="evaluation batch size")
    bench.add_argument("--speed-batch", type=int, default=64, help="batch size of the speed measurement")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--plot", help="write an accuracy-vs-MACs PNG here")
    bench.set_defaults(func=_bench)
    show = sub.add_parser("show", help="draw which patches each reduced block keeps (ClusTR: its clusters; AdaViT: "
                                       "what each image uses; --dense: a probe's patch masks on restored features)")
    _add_model_options(show, images=100)
    show.add_argument("--policy", action="append",
                      help=f"{known}; default: EViT leaving 70%% of the dense MACs (repeatable with --dense)")
    show.add_argument("--dense", action="store_true",
                      help="the digits ViT as a backbone: a linear probe fitted on its dense patch features, applied "
                           "to each policy's restored features; draws the patch masks (scores on --images scenes)")
    show.add_argument("--probe-scenes", type=int, default=1000, help="training scenes the --dense probe is fitted on")
    show.add_argument("--scenes", type=int, default=6)
    show.add_argument("--out", default="kept_tokens.png")
    show.set_defaults(func=_show)
    training = sub.add_parser("train", help="fine-tune a transformed model, distilling from the original "
                                             "(torchrun --nproc_per_node=N -m fxprune train … runs DDP)")
    _add_model_options(training, images=1000)
    training.add_argument("--policy", required=True, help=f"{known}, e.g. dynamicvit:keep=0.7,layers=1,3,4")
    training.add_argument("--train-images", type=int, default=6000, help="DigitScenes training scenes (digits)")
    training.add_argument("--steps", type=int, default=300)
    training.add_argument("--batch", type=int, default=64, help="global batch, over every process")
    training.add_argument("--lr", type=float, default=3e-4)
    training.add_argument("--warmup", type=int, default=20)
    training.add_argument("--freeze-backbone", type=int, default=0, help="steps with the backbone frozen")
    training.add_argument("--backbone-lr-scale", type=float, default=None,
                          help="the backbone's lr relative to --lr (default: the method's recipe)")
    training.add_argument("--distill-weight", type=float, default=None,
                          help="weight of the distillation from the original model (default: the method's)")
    training.add_argument("--keep-warmup", type=int, default=0,
                          help="steps over which the keep rate (EViT, Top-K) or target usage (AdaViT) falls from 1")
    training.add_argument("--eval-every", type=int, default=0)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--out", default="fxprune_train.pt", help="checkpoint (model, optimiser, step)")
    training.add_argument("--resume", action="store_true", help="continue from --out")
    training.add_argument("--weights-out", help="also write the learned parts and the fine-tuned backbone, for a "
                                                "policy's weights= (a method with nothing learned: the fine-tuned "
                                                "model's state_dict)")
    training.set_defaults(func=_train)
    exporting = sub.add_parser("export", help="export a model, transformed by a policy, to ONNX, a torch.export "
                                              "program or an AOTInductor package, verified against eager PyTorch")
    exporting.add_argument("model", help="'digits', 'digits-relpos', a saved nn.Module (torch.save) or a timm name")
    exporting.add_argument("--policy", help=f"{known}; none: the model as it is")
    exporting.add_argument("--out", required=True, help="the artefact: .onnx, .pt2 (or any name with --format)")
    exporting.add_argument("--format", choices=FORMATS, help="default: from --out's suffix")
    exporting.add_argument("--no-verify", action="store_true", help="do not run the artefact against eager PyTorch")
    exporting.add_argument("--batch", type=int, default=2, help="example batch (the exported batch is dynamic)")
    exporting.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    exporting.add_argument("--img-size", type=int, default=None, help="input size of a timm model")
    exporting.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights")
    exporting.add_argument("--weights", help="a state_dict to load into the model first")
    exporting.set_defaults(func=_export)
    zoo = sub.add_parser("zoo", help="every method on tiny versions of 30+ timm, torchvision, Hugging Face and "
                                     "hand-written ViTs: rewritten and checked, or refused and why (a table)")
    zoo.add_argument("models", nargs="*", help="zoo model names (default: all)")
    zoo.add_argument("--write", help="put the table between the zoo markers of this file (README.md)")
    zoo.add_argument("--processes", type=int, default=2, help="worker processes, one model each at a time")
    zoo.set_defaults(func=_zoo)
    demo = sub.add_parser("demo", help="the embedded DigitScenes ViT with EViT: plan, accuracy, MACs, speed, picture")
    demo.add_argument("--scenes", type=int, default=1000)
    demo.add_argument("--repeats", type=int, default=5)
    demo.add_argument("--out", default="kept_tokens.png", help="where to write the picture")
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
