"""Where the time goes: the top operators of dense and token-reduced DeiT-S under torch.profiler.

    python benchmarks/op_profile.py --device cuda --dtype bfloat16 --batch 256
    python benchmarks/op_profile.py --batch 1 --policy "ats:k=139,98,69,layers=3,6,9"
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import fxprune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--policy", default="evit:keep=0.7,layers=3,6,9")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.backends.cudnn.benchmark = True  # as in benchmarks/speed.py
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    reduced = fxprune.transform(dense, fxprune.parse_policy(args.policy))
    x = torch.randn(args.batch, 3, 224, 224, device=args.device, dtype=dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    for name, model in (("dense", dense), (args.policy, reduced)):
        model = model.to(args.device, dtype)
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    model(x)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
        print(f"== {name}, batch {args.batch}, {args.dtype}, {args.steps} steps")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
