"""How long convert() takes (trace + SVD + module surgery) on the built-in architectures.

    python benchmarks/conversion_speed.py [--repeats 5]

Target (issue 7): a ResNet-50-sized model (about 25M params) converts with SVD init in
under 0.5 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy

import torch
from tabulate import tabulate

import convsep
from convsep.factorize import channel_svd
from convsep.models import ZOO
from convsep.trace import discover

from common import machine_line, median_seconds, save_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in ("resnet18", "resnet50", "vgg16", "mobilenet_v1"):
        model = ZOO[name]().eval()
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        row = {
            "model": name,
            "params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "convert rank 1, svd (s)": median_seconds(lambda: convsep.convert(model, rank=1), args.repeats),
            "convert rank 1, random (s)": median_seconds(
                lambda: convsep.convert(model, rank=1, init="random"), args.repeats
            ),
            "of which deepcopy (s)": median_seconds(lambda: copy.deepcopy(model), args.repeats),
            "of which fx trace (s)": median_seconds(lambda: discover(model), args.repeats),
            "of which SVDs (s)": median_seconds(lambda: [channel_svd(c.weight, c.groups) for c in convs], args.repeats),
        }
        rows.append(row)
        print(f"{name}: {row['convert rank 1, svd (s)']:.3f} s", flush=True)
    print(f"\nconvert() time, median of {args.repeats} runs after a warm-up; {machine_line()}\n")
    print(tabulate(rows, headers="keys", floatfmt=".3f"))
    print("\nwrote", save_json("conversion_speed", {"repeats": args.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
