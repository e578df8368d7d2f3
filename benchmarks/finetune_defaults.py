"""Do fine-tuning's defaults damage a model calibration has already brought back? And what does bf16 buy on this CPU?

    python benchmarks/finetune_defaults.py            # the figures in README (about 40 min on a busy 2-core machine)
    python benchmarks/finetune_defaults.py --quick    # a smoke run on a few hundred images

small_cnn(width=32) trained for 2 epochs on the first 10,000 Fashion-MNIST training images; converted
at MAC budgets 0.25 and 0.5 and calibrated on 32 batches; then one epoch of `convsep.finetune` on the
same 10,000 images (labels carried: alpha * T^2 * KL + (1 - alpha) * CE, alpha 0.5) with each setting
below, from the same calibrated model and the same shuffled order. Validation (keep-best) uses
training images 50,000-54,999, never seen in training; accuracy is on the 10,000 test images.
bf16 against fp32: the same run with autocast="bf16", and the median time of 20 steps over 3 runs each.
Prints a table and writes JSON to benchmarks/results/finetune_defaults.json.
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
import fashion_mnist  # noqa: E402
from common import machine_line, median_seconds, save_json  # noqa: E402
from convsep.files import write_atomically  # noqa: E402
from convsep.models import small_cnn  # noqa: E402
from fashion_mnist_end_to_end import calibrate, convert_variants, nhwc, train_original  # noqa: E402

SETTINGS = {  # name -> finetune keywords (everything else at the library's defaults)
    "lr 1e-3, no warmup (the old defaults)": {"lr": 1e-3, "warmup": 0.0},
    "lr 1e-3, warmup 5%": {"lr": 1e-3, "warmup": 0.05},
    "lr 3e-4, warmup 5%": {"lr": 3e-4, "warmup": 0.05},
    "lr 1e-3, warmup 5%, validation (keep-best)": {"lr": 1e-3, "warmup": 0.05, "validate": True},
    "lr 1e-3, warmup 5%, autocast bf16": {"lr": 1e-3, "warmup": 0.05, "autocast": "bf16"},
    "lr 1e-4, warmup 5%": {"lr": 1e-4, "warmup": 0.05},
    "lr 1e-3, warmup 5%, pairs only": {"lr": 1e-3, "warmup": 0.05, "trainable": "separable"},
}
SHORT = list(SETTINGS)[:4]  # at the budgets after the first: the old defaults, the lr, warmup and validation


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25])
    parser.add_argument("--settings", nargs="*", help="names of SETTINGS to run at the first budget (default: the "
                        "first five; the other budgets run the first four)")
    parser.add_argument("--val-every", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="default benchmarks/results/finetune_defaults.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if fashion_mnist.missing():
        return 1
    n = 512 if args.quick else args.train_images
    images, labels = fashion_mnist.load("train")
    train = fashion_mnist.Batches(images[:n], labels[:n], 128, True, args.seed)
    val = fashion_mnist.Batches(images[50000 : 50000 + (256 if args.quick else 5000)], labels[50000:55000], 1000)
    test = fashion_mnist.batches("test", 1000, limit=256 if args.quick else None)
    example = test.images[:1]
    cache = os.path.join(HERE, "results", f"small_cnn_w32_e2_s{args.seed}_first{n}.pt")
    if os.path.exists(cache) and not args.quick:  # trained before by this script: seeded, so the same weights
        original = small_cnn(width=32)
        original.load_state_dict(torch.load(cache, weights_only=True))
        original = nhwc(original).eval()
    else:
        original = train_original(train, width=32, epochs=2, lr=3e-3, seed=args.seed, verbose=False)
        if not args.quick:
            write_atomically(cache, lambda tmp: torch.save(original.state_dict(), tmp))
    rows = [{"budget": None, "setting": "original", "accuracy": fashion_mnist.accuracy(original, test), "seconds": None}]
    print(f"original: {rows[0]['accuracy']:.2f}%", flush=True)

    def tune(start, budget, setting, validate=False, **options):
        if validate:
            options.update(val_data=val, val_every=args.val_every)
        student = copy.deepcopy(start)
        data = fashion_mnist.Batches(train.images, train.labels, 128, True, args.seed)  # the same order every run
        torch.manual_seed(args.seed)
        began = time.perf_counter()
        convsep.finetune(student, data, teacher=original, verbose=False, **options)
        row = {"budget": budget, "setting": setting, "accuracy": fashion_mnist.accuracy(student, test),
               "seconds": time.perf_counter() - began}  # fmt: skip
        plan = student.convsep_plan
        if options.get("val_data") is not None:
            row["best_step"] = plan.finetune["best_step"]
        rows.append(row)
        print(f"budget {budget}: {setting}: {row['accuracy']:.2f}% ({row['seconds']:.0f} s)", flush=True)
        return student

    variants = convert_variants(original, example, ranks=(), budgets=args.budgets)
    for index, budget in enumerate(args.budgets):
        first = args.settings if args.settings is not None else list(SETTINGS)[:5]
        chosen = [s for s in SETTINGS if s in (first if index == 0 else SHORT)]
        converted, _ = variants[f"budget {budget:g}"]
        start, _ = calibrate(converted, original, train.inputs_only(), 8 if args.quick else 32)
        rows.append({"budget": budget, "setting": "calibrated (start)", "accuracy": fashion_mnist.accuracy(start, test), "seconds": None})
        print(f"budget {budget}: calibrated: {rows[-1]['accuracy']:.2f}%", flush=True)
        for setting in chosen:
            tune(start, budget, setting, **SETTINGS[setting])

    # Speed: 20 steps of the last budget's model, fp32 against bf16, median of 3 runs each
    step_batches = list(fashion_mnist.Batches(train.images, train.labels, 128, True, args.seed))[:20]
    speed = {}
    for kind in (None, "bf16"):
        run = lambda kind=kind: convsep.finetune(copy.deepcopy(start), step_batches, teacher=original, autocast=kind, verbose=False)  # noqa: E731
        speed[kind or "fp32"] = median_seconds(run, repeats=3, warmup=1) / len(step_batches)
    table = tabulate(
        [[r["budget"] if r["budget"] is not None else "", r["setting"], f"{r['accuracy']:.2f}",
          f"{r['accuracy'] - rows[0]['accuracy']:+.2f}", "" if r["seconds"] is None else f"{r['seconds']:.0f}"] for r in rows],
        headers=["budget", "fine-tuning (1 epoch)", "test acc (%)", "vs original", "seconds"], disable_numparse=True,
    )  # fmt: skip
    print(f"\n{table}\n\nper step (batch 128), median of 3 x 20 steps: fp32 {1000 * speed['fp32']:.0f} ms, "
          f"bf16 {1000 * speed['bf16']:.0f} ms ({speed['fp32'] / speed['bf16']:.2f}x)\n{machine_line()}")  # fmt: skip
    result = {
        "command": " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_1_5_15": list(os.getloadavg()),
        "settings": vars(args), "train_images": n, "rows": rows, "seconds_per_step": speed,
    }  # fmt: skip
    print(f"wrote {os.path.relpath(save_json('finetune_defaults', result, args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
