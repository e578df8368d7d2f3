"""End to end on real data: train a small CNN on Fashion-MNIST, convert it, report, calibrate, fine-tune, evaluate.

    python examples/fashion_mnist_end_to_end.py           # 60,000 training images: a few minutes on 2 cores
    python examples/fashion_mnist_end_to_end.py --quick   # a few hundred images, seconds (what the tests run)

Needs the Debian package dataset-fashion-mnist (see fashion_mnist.py). The benchmark
(benchmarks/finetune_fashion_mnist.py) reuses these steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Callable

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the reader and the counter next to this file

import convsep  # noqa: E402
import fashion_mnist  # noqa: E402
from convsep.models import small_cnn  # noqa: E402
from costs import costs  # noqa: E402

QUICK_TRAIN, QUICK_TEST = 512, 256


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def nhwc(model: nn.Module) -> nn.Module:
    """Channels-last weights: on CPU, oneDNN's depthwise convolutions run about twice as fast in NHWC."""
    return model.to(memory_format=torch.channels_last)


def train_original(train, *, width: int, epochs: int, lr: float, seed: int, verbose: bool) -> nn.Module:
    """A small CNN trained on labels alone: fine-tuning with no teacher is plain supervised training."""
    torch.manual_seed(seed)
    return convsep.finetune(nhwc(small_cnn(width=width)), train, epochs=epochs, lr=lr, verbose=verbose)


def first_conv(model: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if isinstance(module, nn.Conv2d))


def convert_variants(
    model: nn.Module, example: torch.Tensor, ranks=(1,), budgets=(), stem_kept_ranks=()
) -> dict[str, tuple[nn.Module, float]]:
    """name -> (converted model, seconds): per fixed rank, per rank with the first conv kept, per MAC budget.

    Keeping the first conv: with one input channel its kernels form a single 32 x 9 matrix, so rank 1
    keeps one 3x3 filter for all 32 outputs (relative weight error 0.88 here), for a layer that costs
    about 1% of the model's MACs.
    """
    variants = {f"rank {r}": timed(lambda r=r: nhwc(convsep.convert(model, rank=r))) for r in ranks}
    stem = first_conv(model)
    for r in stem_kept_ranks:
        variants[f"rank {r}, stem kept"] = timed(lambda r=r: nhwc(convsep.convert(model, rank=r, exclude=stem)))
    for budget in budgets:
        variants[f"budget {budget:g}"] = timed(
            lambda b=budget: nhwc(convsep.convert(model, budget=b, example_inputs=example))
        )
    return variants


def calibrate(converted: nn.Module, original: nn.Module, inputs, batches: int) -> tuple[nn.Module, float]:
    """(calibrated copy, seconds): the converted model is left as it is, so each step can be measured."""
    work = copy.deepcopy(converted)
    return timed(lambda: nhwc(convsep.calibrate(work, original, inputs, batches=batches)))


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TRAIN} training / {QUICK_TEST} test images")
    parser.add_argument("--epochs", type=int, help="epochs to train the original (default 2; quick 4)")
    parser.add_argument("--finetune-epochs", type=int, help="default 1; quick 3 (a few hundred images are few steps)")
    parser.add_argument("--rank", type=int, default=2, help="depth multiplier of the pairs (the first conv is kept)")
    parser.add_argument("--lr", type=float, default=1e-2, help="fine-tuning peak lr (AdamW, cosine)")
    parser.add_argument("--budget", type=float, default=0.3, help="the share of the model's MACs to keep")
    parser.add_argument("--width", type=int, help="channels of the first conv of small_cnn (default 16; the benchmark's 32)")
    parser.add_argument("--batch-size", type=int, help="default 128; quick 32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if fashion_mnist.missing():
        return 1
    verbose = not args.quiet
    quick = {"epochs": 4, "finetune_epochs": 3, "width": 16, "batch_size": 32}
    full = {"epochs": 2, "finetune_epochs": 1, "width": 16, "batch_size": 128}
    for key, default in (quick if args.quick else full).items():
        setattr(args, key, getattr(args, key) or default)
    epochs = args.epochs
    train = fashion_mnist.batches("train", args.batch_size, limit=QUICK_TRAIN if args.quick else None, seed=args.seed)
    test = fashion_mnist.batches("test", 1000, limit=QUICK_TEST if args.quick else None)
    example = test.images[:1]
    rows = []

    def record(step: str, model: nn.Module, seconds: float) -> float:
        accuracy, cost = fashion_mnist.accuracy(model, test), costs(model, example)
        rows.append([step, f"{accuracy:.2f}", f"{cost.conv_macs:,}", f"{cost.params:,}", f"{seconds:.2f}"])
        print(f"{step}: test accuracy {accuracy:.2f}% ({seconds:.1f} s)", flush=True)
        return accuracy

    print(f"training small_cnn(width={args.width}) for {epochs} epoch(s) on {len(train.images):,} images")
    original, seconds = timed(
        lambda: train_original(train, width=args.width, epochs=epochs, lr=3e-3, seed=args.seed, verbose=verbose)
    )
    record("original", original, seconds)

    variants = convert_variants(original, example, ranks=(), stem_kept_ranks=(args.rank,), budgets=(args.budget,))
    for name, (converted, seconds) in variants.items():
        record(f"converted, {name}", converted, seconds)
    name, (chosen, _) = list(variants.items())[-1]  # the budget
    print(convsep.report(original, chosen, example))

    chosen, seconds = calibrate(chosen, original, train.inputs_only(), batches=8 if args.quick else 32)
    name = f"{name} + calibration"
    record(f"converted, {name}", chosen, seconds)

    # Distillation from the original plus the labels the batches carry: alpha * T^2 * KL + (1 - alpha) * CE.
    _, seconds = timed(
        lambda: convsep.finetune(
            chosen, train, teacher=original, epochs=args.finetune_epochs, lr=args.lr, verbose=verbose
        )
    )
    plural = "s" if args.finetune_epochs != 1 else ""
    record(f"fine-tuned ({args.finetune_epochs} epoch{plural}), {name}", chosen, seconds)

    headers = ["step", "test accuracy (%)", "conv MACs / sample", "params", "seconds"]
    print(tabulate(rows, headers=headers, colalign=("left",) + ("right",) * 4, disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
