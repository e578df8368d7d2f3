"""How much of the accuracy a conversion loses comes back with one epoch of fine-tuning, on Fashion-MNIST.

    python benchmarks/finetune_fashion_mnist.py                  # the figures in README (tens of minutes on 2 cores)
    python benchmarks/finetune_fashion_mnist.py --original benchmarks/results/small_cnn_fashion_mnist.pt
                                                                 # train the original once, reuse it after
    python benchmarks/finetune_fashion_mnist.py --quick          # a smoke run on a few hundred images

For convsep.models.small_cnn trained on the 60,000 training images, it measures on the 10,000 test
images: the original; each conversion (fixed ranks, and MAC budgets);
calibration on 32 batches of training images; one epoch of fine-tuning from there, by distillation alone
(alpha=1, the labels unused) and with the labels (alpha * T^2 * KL + (1 - alpha) * CE); with the MACs,
parameters and wall time of every step. Prints a table and writes JSON to benchmarks/results/.
The issue's goal: within 0.5 points of the original at <= 30% of the conv MACs after one epoch.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from datetime import datetime, timezone

import torch
from tabulate import tabulate

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import convsep  # noqa: E402
from convsep.files import write_atomically  # noqa: E402
from convsep.models import small_cnn  # noqa: E402
import fashion_mnist  # noqa: E402
from common import machine_line, save_json  # noqa: E402
from costs import costs  # noqa: E402
from fashion_mnist_end_to_end import (  # noqa: E402
    QUICK_TEST, QUICK_TRAIN, calibrate, convert_variants, nhwc, timed, train_original,
)  # fmt: skip

GOAL_POINTS, GOAL_MAC_FRACTION = 0.5, 0.30


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TRAIN} training / {QUICK_TEST} test images")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, help="epochs to train the original (default 2; quick 4)")
    parser.add_argument("--train-lr", type=float, default=3e-3)
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2], help="fixed ranks, every conv converted")
    parser.add_argument("--stem-kept-ranks", type=int, nargs="*", default=[2],
                        help="fixed ranks with the first conv left as it is (1 input channel: rank 1 keeps one 3x3 filter)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2, help="fine-tuning peak lr (AdamW, cosine; the library's default is 1e-3)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="teacher weight when labels are used")
    parser.add_argument("--calibration-batches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, help="default 128; quick 32 (enough steps for BatchNorm statistics)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--original", help="state_dict of the trained original: loaded if it exists, else trained and "
                        "saved there (default: a cache in benchmarks/results/ named after width, epochs and seed)")
    parser.add_argument("--retrain", action="store_true", help="train the original even if the cache exists")
    parser.add_argument("--out", help="where the JSON goes (default benchmarks/results/finetune_fashion_mnist.json)")
    parser.add_argument("--progress", action="store_true", help="tqdm bars while training")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    args.epochs = args.epochs or (4 if args.quick else 2)
    args.batch_size = args.batch_size or (32 if args.quick else 128)
    if args.original is None and not args.quick:
        args.original = os.path.join(HERE, "results", f"small_cnn_w{args.width}_e{args.epochs}_s{args.seed}.pt")
    if fashion_mnist.missing():
        return 1
    (train, test), load_seconds = timed(
        lambda: (
            fashion_mnist.batches("train", args.batch_size, limit=QUICK_TRAIN if args.quick else None, seed=args.seed),
            fashion_mnist.batches("test", 1000, limit=QUICK_TEST if args.quick else None),
        )
    )
    example = test.images[:1]
    rows: list[dict] = []

    def measure(variant: str, step: str, model, seconds: float) -> dict:
        cost = costs(model, example)
        row = {"variant": variant, "step": step, "accuracy": fashion_mnist.accuracy(model, test), "seconds": seconds,
               "macs": cost.macs, "conv_macs": cost.conv_macs, "params": cost.params}  # fmt: skip
        rows.append(row)
        print(f"{variant:>17} | {step:<24} {row['accuracy']:6.2f}%  {seconds:7.1f} s", flush=True)
        return row

    if args.original and os.path.exists(args.original) and not args.retrain:
        original = nhwc(small_cnn(width=args.width))
        saved = torch.load(args.original, weights_only=True)
        original.load_state_dict(saved.get("state_dict", saved))  # a bare state_dict is accepted too
        original.eval()
        train_seconds = float(saved.get("train_seconds", 0.0))
        step = f"{args.epochs} epochs (cached)"
    else:
        original, train_seconds = timed(
            lambda: train_original(train, width=args.width, epochs=args.epochs, lr=args.train_lr, seed=args.seed,
                                   verbose=args.progress)  # fmt: skip
        )
        step = f"trained, {args.epochs} epochs"
        if args.original:
            cache = {"state_dict": original.state_dict(), "train_seconds": train_seconds}
            os.makedirs(os.path.dirname(os.path.abspath(args.original)), exist_ok=True)
            write_atomically(args.original, lambda tmp: torch.save(cache, tmp))
    base = measure("original", step, original, train_seconds)

    variants = convert_variants(original, example, args.ranks, args.budgets, args.stem_kept_ranks)
    for variant, (converted, seconds) in variants.items():
        measure(variant, "converted", converted, seconds)
        start, seconds = calibrate(converted, original, train.inputs_only(), args.calibration_batches)
        measure(variant, "calibrated", start, seconds)
        for step, labels, alpha in (("+1 epoch, distillation", False, 1.0), ("+1 epoch, with labels", True, args.alpha)):
            # the same shuffled order for every fine-tuning run, whatever ran before
            data = fashion_mnist.Batches(train.images, train.labels, args.batch_size, True, args.seed, labels)
            student = copy.deepcopy(start)
            torch.manual_seed(args.seed)
            _, seconds = timed(
                lambda: convsep.finetune(student, data, teacher=original, epochs=args.finetune_epochs, lr=args.lr,
                                         temperature=args.temperature, alpha=alpha, verbose=args.progress)  # fmt: skip
            )
            measure(variant, step.replace("1 epoch", f"{args.finetune_epochs} epoch"), student, seconds)

    for row in rows:
        row["delta_points"] = row["accuracy"] - base["accuracy"]
        row["conv_mac_fraction"] = row["conv_macs"] / base["conv_macs"]
    met = [
        r for r in rows
        if r["step"].startswith("+") and r["conv_mac_fraction"] <= GOAL_MAC_FRACTION and r["delta_points"] >= -GOAL_POINTS
    ]  # fmt: skip
    table = tabulate(
        [[r["variant"], r["step"], f"{r['accuracy']:.2f}", f"{r['delta_points']:+.2f}", f"{r['conv_macs']:,}",
          f"{100 * r['conv_mac_fraction']:.1f}%", f"{r['macs']:,}", f"{r['params']:,}", f"{r['seconds']:.2f}"] for r in rows],
        headers=["variant", "step", "test acc (%)", "vs original", "conv MACs", "of original", "MACs", "params", "seconds"],
        colalign=("left", "left") + ("right",) * 7,
        disable_numparse=True,
    )  # fmt: skip
    goal = (
        f"goal (within {GOAL_POINTS} points at <= {GOAL_MAC_FRACTION:.0%} of the conv MACs): "
        + (f"met by {', '.join(r['variant'] + ' ' + r['step'] for r in met)}" if met else "not met")
    )
    print(f"\n{table}\n\nMACs are multiply-accumulates per sample (FLOPs = 2 x MACs, bias adds not counted). {goal}")
    print(f"data loading: {load_seconds:.1f} s; {machine_line()}")

    result = {
        "command": " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_1_5_15": list(os.getloadavg()),
        "settings": vars(args),
        "train_images": len(train.images), "test_images": len(test.images), "data_loading_seconds": load_seconds,
        "rows": rows,
        "goal": {"points": GOAL_POINTS, "conv_mac_fraction": GOAL_MAC_FRACTION, "met_by": [f"{r['variant']} {r['step']}" for r in met]},
    }  # fmt: skip
    print(f"wrote {os.path.relpath(save_json('finetune_fashion_mnist', result, args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
