"""convsep's SVD pair against tensorly-torch's CP factorisation at the same parameter count.

    pip install --no-deps tensorly tensorly-torch   # --no-deps: keep the CPU torch (needs numpy, scipy)
    python benchmarks/vs_tensorly.py [--repeats 3]

For 3x3 layers of ResNet-18 widths 64-256 (random Kaiming weights, as at initialisation, and
the same weights made low-rank-ish by a decaying spectrum, closer to trained kernels), the
init time and the relative weight error ||W - W~|| / ||W|| of `SeparableConv2d.from_conv` at
rank 1 and 2 and of `tltorch.FactorizedConv.from_conv(factorization="cp")` with the CP rank
that gives the same number of parameters. Skips with a message when tensorly-torch is absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import warnings

import torch
from tabulate import tabulate

from convsep import SeparableConv2d
from convsep.factorize import compose

from common import machine_line, median_seconds, save_json


def decaying(conv: torch.nn.Conv2d) -> torch.nn.Conv2d:
    """The same layer with singular values of each channel matrix decaying like 1/j^2."""
    w = conv.weight.detach()
    n, m, kh, kw = w.shape
    a = w.permute(1, 0, 2, 3).reshape(m, n, kh * kw)
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    S = S[:, :1] / torch.arange(1, S.shape[1] + 1).square()
    with torch.no_grad():
        conv.weight.copy_((U * S.unsqueeze(1) @ Vh).reshape(m, n, kh, kw).permute(1, 0, 2, 3))
    return conv


def relative(approx: torch.Tensor, weight: torch.Tensor) -> float:
    return float((approx.detach() - weight).norm() / weight.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256], help="layer widths (CP at 256 takes minutes)")
    args = parser.parse_args()
    if importlib.util.find_spec("tltorch") is None:
        print("tensorly-torch is not installed: pip install --no-deps tensorly tensorly-torch (needs numpy, scipy)")
        return
    import tltorch

    warnings.filterwarnings("ignore", module="tensorly")
    torch.manual_seed(0)
    rows = []
    for width in args.widths:
        for spectrum in ("kaiming", "decaying"):
            conv = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
            if spectrum == "decaying":
                conv = decaying(conv)
            weight = conv.weight.detach()
            for rank in (1, 2):
                pair = SeparableConv2d.from_conv(conv, rank=rank)
                params = sum(p.numel() for p in pair.parameters())
                ours = relative(compose(pair.depthwise.weight, pair.pointwise.weight, 1, rank), weight)
                cp_rank = max(1, round(params / (2 * width + 3 + 3)))
                cp = tltorch.FactorizedConv.from_conv(conv, rank=cp_rank, factorization="cp", decompose_weights=True)
                theirs = relative(cp.weight.to_tensor(), weight)
                rows.append(
                    {
                        "layer": f"{width}x{width}x3x3",
                        "weights": spectrum,
                        "convsep rank": rank,
                        "params": params,
                        "CP rank": cp_rank,
                        "CP params": sum(p.numel() for p in cp.parameters()),
                        "convsep error": ours,
                        "CP error": theirs,
                        "convsep init (ms)": 1e3 * median_seconds(lambda: SeparableConv2d.from_conv(conv, rank=rank), args.repeats),
                        "CP init (ms)": 1e3 * median_seconds(
                            lambda: tltorch.FactorizedConv.from_conv(conv, rank=cp_rank, factorization="cp", decompose_weights=True),
                            args.repeats,
                            warmup=0,
                        ),
                    }
                )
                print(rows[-1]["layer"], spectrum, rank, flush=True)
    print(f"\nInit time (median of {args.repeats}) and relative weight error at equal parameters; {machine_line()}\n")
    print(tabulate(rows, headers="keys", floatfmt=".3f"))
    print("\nwrote", save_json("vs_tensorly", {"repeats": args.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
