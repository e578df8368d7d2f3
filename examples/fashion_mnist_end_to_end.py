"""End to end on real data: train a small CNN on Fashion-MNIST, convert it, report, calibrate, fine-tune, evaluate.

    python examples/fashion_mnist_end_to_end.py           # 60,000 training images: a few minutes on 2 cores
    python examples/fashion_mnist_end_to_end.py --quick   # a few hundred images, seconds (what the tests run)

Needs the Debian package dataset-fashion-mnist (see fashion_mnist.py). Steps that use parts of convsep
this version may lack (`convert(..., budget=)`, `convsep.report`, `convsep.calibrate`) are skipped
with a message saying so. The benchmark (benchmarks/finetune_fashion_mnist.py) reuses these steps.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import time
from typing import Any, Callable, Optional

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


def has_budget() -> bool:
    return "budget" in inspect.signature(convsep.convert).parameters


def missing(feature: str) -> str:
    return f"skipped: this convsep has no {feature} (it lands with another issue; rerun after updating)"


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
    if budgets and not has_budget():
        print(f"MAC budgets {', '.join(map(str, budgets))}: {missing('convert(..., budget=)')}")
        return variants
    for budget in budgets:
        variants[f"budget {budget:g}"] = timed(
            lambda b=budget: nhwc(convsep.convert(model, budget=b, example_inputs=example))
        )
    return variants


def calibrate(converted: nn.Module, original: nn.Module, inputs, batches: int) -> Optional[tuple[nn.Module, float]]:
    """(calibrated copy, seconds), or None when this convsep has no calibrate. The converted model is untouched."""
    if not hasattr(convsep, "calibrate"):
        return None
    work = copy.deepcopy(converted)
    keywords = {"batches": batches} if "batches" in inspect.signature(convsep.calibrate).parameters else {}
    result, seconds = timed(lambda: convsep.calibrate(work, original, inputs, **keywords))
    return nhwc(result if isinstance(result, nn.Module) else work), seconds


def show_report(original: nn.Module, converted: nn.Module, example: torch.Tensor) -> None:
    if not hasattr(convsep, "report"):
        print(f"report: {missing('convsep.report')}")
        return
    print(convsep.report(original, converted, example[:1]))


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TRAIN} training / {QUICK_TEST} test images")
    parser.add_argument("--epochs", type=int, help="epochs to train the original (default 2; quick 4)")
    parser.add_argument("--finetune-epochs", type=int, help="default 1; quick 3 (a few hundred images are few steps)")
    parser.add_argument("--rank", type=int, default=2, help="depth multiplier of the pairs (the first conv is kept)")
    parser.add_argument("--lr", type=float, default=1e-2, help="fine-tuning peak lr (AdamW, cosine)")
    parser.add_argument("--budget", type=float, default=0.3, help="fraction of MACs, if convert supports budget=")
    parser.add_argument("--width", type=int, help="channels of the first conv of small_cnn (default 16; the benchmark's 32)")
    parser.add_argument("--batch-size", type=int, help="default 128; quick 32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if not fashion_mnist.available():
        print(f"Fashion-MNIST not found in {fashion_mnist.data_dir()}: {fashion_mnist.INSTALL_HINT}", file=sys.stderr)
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
        rows.append([step, f"{accuracy:.2f}", f"{cost.conv_macs:,}", f"{cost.params:,}", f"{seconds:.1f}"])
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
    name, (chosen, _) = list(variants.items())[-1]  # the budget when there is one, else the rank
    show_report(original, chosen, example)

    calibrated = calibrate(chosen, original, train.inputs_only(), batches=8 if args.quick else 32)
    if calibrated is None:
        print(f"calibration: {missing('convsep.calibrate')}")
    else:
        chosen, seconds = calibrated
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
    print(tabulate(rows, headers=headers, colalign=("left", "right", "right", "right", "right")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
