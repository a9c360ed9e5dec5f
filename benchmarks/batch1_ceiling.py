"""The best speed ratio any token reducer can reach at batch 1 on this machine, beside the real ones.

    python benchmarks/batch1_ceiling.py
    python benchmarks/batch1_ceiling.py --threads 1 --repeats 21

A reducer's speed ratio falls short of its MAC ratio for two reasons: its own selection work, and the
machine running the smaller matrix products less efficiently. This separates them. The *ceiling* model
is DeiT-S with the same token counts as the policies but no selection at all: in each chosen block
only the first ``tokens`` queries attend (over all keys) and the rest of the sequence is sliced off,
which is the cheapest way to run those counts. Its speed ratio over dense is the most any method
keeping these counts can reach here; each policy's ratio is printed against it and against its MAC
ratio (the issue-4 target is speed ≥ 0.9 × MAC ratio), with the quartiles of single rounds' ratios to show
how much the machine moves them. Interleaved medians, eager and compiled.
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.tools.speed import interleaved, machine

DEFAULT_POLICIES = ("ats:k=139,98,69,layers=3,6,9", "topk:keep=0.7,layers=3,6,9")


class SlicedDeiT(nn.Module):
    """A timm ViT that keeps the first ``keep[i]`` tokens at block ``i``: queries sliced before attention.

    Input images ``[B, 3, H, W]``, output logits ``[B, classes]``; shares the parameters of ``vit``.
    """

    def __init__(self, vit: nn.Module, keep: dict[int, int]):
        super().__init__()
        self.vit = vit
        self.keep = keep

    def _attention(self, attn: nn.Module, x: torch.Tensor, queries: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(attn.q_norm(q[:, :, :queries]), attn.k_norm(k), v)
        return attn.proj(out.transpose(1, 2).reshape(b, queries, c))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for i, block in enumerate(vit.blocks):
            if i not in self.keep:
                x = block(x)
                continue
            n = self.keep[i]
            x = x[:, :n] + block.ls1(self._attention(block.attn, block.norm1(x), n))
            x = x + block.ls2(block.mlp(block.norm2(x)))
        return vit.forward_head(vit.norm(x))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", help=f"repeatable (default: {', '.join(DEFAULT_POLICIES)})")
    parser.add_argument("--tokens", default="139,98,69", help="tokens the ceiling model keeps (with cls)")
    parser.add_argument("--layers", default="3,6,9", help="blocks where the ceiling model reduces")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--freeze", action="store_true",
                        help="compile with inductor's freezing (weights as constants, prepacked for CPU GEMMs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    keep = dict(zip((int(i) for i in args.layers.split(",")), (int(n) for n in args.tokens.split(","))))
    texts = args.policy or list(DEFAULT_POLICIES)
    models = {"dense": dense, "ceiling": SlicedDeiT(dense, keep).eval()}
    models.update({text: fxprune.transform(dense, fxprune.parse_policy(text)) for text in texts})
    image = torch.randn(1, 3, 224, 224)
    macs = {name: fxprune.flops(m, image) for name, m in models.items()}
    modes = {"eager": models}
    if not args.no_compile:
        options = {"options": {"freezing": True}} if args.freeze else {}
        modes["compiled"] = {name: fxprune.lower(m, **options) for name, m in models.items()}

    names = ["ceiling", *texts]
    rows = []
    x = torch.randn(args.batch, 3, 224, 224)
    for mode, runnable in modes.items():
        timing = interleaved({n: (lambda m=m: m(x)) for n, m in runnable.items()}, repeats=args.repeats)
        for name in names:
            speed, mac = timing.ratio("dense", name), macs["dense"] / macs[name]
            lower, upper = timing.ratio_quartiles("dense", name)
            rows.append(f"| {mode} | `{name}` | {mac:.2f}× | {speed:.2f}× | {speed / mac:.2f} "
                        f"({lower / mac:.2f}–{upper / mac:.2f}) | "
                        f"{speed / timing.ratio('dense', 'ceiling'):.2f} |")
            print(rows[-1], file=sys.stderr, flush=True)

    command = "python benchmarks/batch1_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"### DeiT-S at batch {args.batch}: ceiling (first {args.tokens} tokens at blocks {args.layers}, "
          "no selection) and token reducers\n")
    print(f"Command: `{command.strip()}`  ")
    print(f"Machine: {machine()}  ")
    print(f"Speed ratios over dense are medians of {args.repeats} interleaved runs (in brackets: the quartiles of "
          "the ratio in single rounds); MAC ratios from fxprune.flops.\n")
    print("| mode | model | MAC ratio | speed ratio | speed / MAC ratio (quartiles) | speed / ceiling speed |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
