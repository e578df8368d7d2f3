"""Accuracy right after conversion (no backprop) for several rank policies, with and without calibration.

Trains the built-in `convsep.models.small_cnn` briefly on Fashion-MNIST (the Debian package
`dataset-fashion-mnist`: `apt-get install -y dataset-fashion-mnist`), seeded so that the run is
reproducible without storing weights, then converts it with each policy and measures test
accuracy, MACs and params. Calibration uses training images only (no labels). A second table
measures how far the greedy budget allocation is from the exhaustive optimum on this model.

    python benchmarks/rank_policies.py                 # a few minutes on 2 cores
    python benchmarks/rank_policies.py --quick         # a smoke run on a data subset
    python benchmarks/rank_policies.py --seeds 1 2 3 --threads 1   # the 0.25 row over three trainings
    python benchmarks/rank_policies.py --seeds 1 2 3 --seed-budget 0.15 --threads 1   # another budget's

Writes the tables to benchmarks/results/rank_policies.md (and prints them).
MACs are multiply-accumulates per image (FLOPs = 2 x MACs), counted by torch's FlopCounterMode.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import itertools
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's convsep, not an installed one

import convsep  # noqa: E402
from common import machine_line  # noqa: E402
from convsep.budget import allocate, brute_force, greedy, options_from_spectrum  # noqa: E402
from convsep.count import conv_macs_per_position, separable_macs_per_position  # noqa: E402
from convsep.models import small_cnn  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results" / "rank_policies.md"


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (the MNIST format: big-endian header, then uint8 data), gzipped."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(DATA / f"{prefix}-images-idx3-ubyte.gz").float().div(255).unsqueeze(1)
    labels = read_idx(DATA / f"{prefix}-labels-idx1-ubyte.gz").long()
    return (images - 0.2860) / 0.3530, labels  # the training set's mean and std


def train(x, y, epochs: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = small_cnn()
    steps = int(epochs * len(x) / 128)
    optimiser = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        batch = torch.randint(0, len(x), (128,), generator=generator)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(x), 1000))
    return correct / len(x)


def macs(model, example) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    return counter.get_total_flops() // 2


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_options(model, example):
    """Each conv's name and options (keep, or a rank, with its MACs and squared relative weight error), and the MACs
    of everything else."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    positions = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: positions.__setitem__(n, o.shape[2] * o.shape[3])) for n, m in convs]
    total = macs(model, example)
    for hook in hooks:
        hook.remove()
    layers = []
    for name, conv in convs:
        n, m, k = conv.out_channels, conv.in_channels, 9
        S = convsep.factorize.channel_svd(conv.weight, 1).S
        keep = conv_macs_per_position(n, m, k, 1) * positions[name]
        layers.append(options_from_spectrum(S, keep, separable_macs_per_position(n, m, k, 1, 1) * positions[name]))
    return [name for name, _ in convs], layers, total


def greedy_vs_exhaustive(model, example, budgets) -> list[list]:
    """The budget objective (sum of squared relative weight errors) reached by greedy and by brute force."""
    _, layers, total = layer_options(model, example)
    fixed = total - sum(layer.keep_cost for layer in layers)
    combinations = 1
    for layer in layers:
        combinations *= len(layer.choices())
    rows = []
    for budget in budgets:
        available = budget * total - fixed
        try:
            exact = brute_force(layers, available)
        except ValueError:
            continue
        row = [budget, _ranks(exact.choices), f"{exact.error:.4f}"]
        for found in (greedy(layers, available), allocate(layers, available)):
            gap = (found.error - exact.error) / exact.error if exact.error else 0.0
            row += [_ranks(found.choices), f"{found.error:.4f} ({gap:+.1%})"]
        rows.append(row)
    return rows, combinations


def every_allocation(model, calibration, test_x, test_y, example, budget) -> list[list]:
    """Every allocation that fits `budget` and cannot raise any one layer without breaking it, calibrated: the
    best any rank allocation can do on this model, to measure the allocation policies against."""
    names, layers, total = layer_options(model, example)
    fixed = total - sum(layer.keep_cost for layer in layers)
    available = budget * total - fixed
    rows = []
    for combination in itertools.product(*(layer.choices() for layer in layers)):
        cost = sum(option[0] for option in combination)
        raisable = any(
            cost - now[0] + other[0] <= available
            for layer, now in zip(layers, combination) for other in layer.choices() if other[0] > now[0]
        )  # fmt: skip
        if cost > available or raisable:
            continue
        choices = [option[2] for option in combination]
        converted = convsep.convert(
            model, ranks={n: r for n, r in zip(names, choices) if r is not None},
            exclude=[n for n, r in zip(names, choices) if r is None] or None,
        )  # fmt: skip
        calibrated = convsep.calibrate(copy.deepcopy(converted), model, calibration, **PLAIN)
        rows.append([_ranks(choices), f"{(cost + fixed) / total:.1%}", f"{accuracy(calibrated, test_x, test_y):.2%}"])
        print(f"every allocation at {budget:g}: {rows[-1]}", file=sys.stderr)
    return sorted(rows, key=lambda row: row[-1], reverse=True)


def _ranks(choices) -> str:
    return " ".join("keep" if c is None else str(c) for c in choices)


def publish(text: str, path: Path) -> int:
    """Print a table's text and write it to `path`; main's exit status."""
    print(text)
    atomic_write(path, text)
    return 0


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


ALLOCATIONS = {  # row label: convert's allocate_by, and whether convert's own calibration follows (refit)
    "weights": ("weights", False),
    "outputs as converted": ("activations", False),
    "outputs after refit": ("activations", True),
}


# calibrate as it did by default before refitting the kept layers became its default: the baseline and the
# "calibrated" columns mean this, so that the tables compare with the earlier ones
PLAIN = dict(refit_kept=False)
# Columns after "calibrated": calibrate's accuracy levers, alone and together.
CALIBRATION_LEVERS = {
    "kept layers refitted": dict(refit_kept=True),
    "alternate=8": dict(alternate=8, refit_kept=False),
    "alternate=8, kept layers refitted": dict(alternate=8, refit_kept=True),
}


def activation_aware(model, calibration, test_x, test_y, example, budgets) -> tuple[list[list], dict[str, list]]:
    """Weight-based vs activation-aware allocation and factorisation, each before and after calibration.

    Returns the table rows and (predicted, measured) relative output errors per layer: "converted", of
    every layer factorised with init="activation" (measured: the pair as converted, on the original
    model's inputs); "refit", of every layer allocated by its error after the refit (measured: after
    calibration, on the converted model's inputs).
    """
    rows, pairs = [], {"converted": [], "refit": []}
    for budget in budgets:
        for label, (allocate_by, refit) in ALLOCATIONS.items():
            for init in ("svd", "activation"):
                kwargs = dict(example_inputs=example, calibration_data=calibration, init=init)
                if refit:
                    kwargs["calibration_refit_kept"] = False  # PLAIN
                chosen = convsep.convert(model, budget=budget, allocate_by=allocate_by, refit=refit, **kwargs)
                plan = chosen.convsep_plan
                if refit:  # the same ranks, not calibrated, for the "converted" column
                    calibrated = chosen
                    converted = convsep.convert(
                        model, ranks={d.name: d.rank for d in plan.converted}, refit=False, allocate_by="weights",
                        exclude=[d.name for d in plan.layers if not d.converted] or None, **kwargs,
                    )  # fmt: skip
                    pairs["refit"] += [(d.predicted_refit_error, plan.calibration["layers"][d.name]["after"]) for d in plan.converted]
                else:
                    converted = chosen
                    calibrated = convsep.calibrate(copy.deepcopy(converted), model, calibration, **PLAIN)
                    if init == "activation":
                        layers = calibrated.convsep_plan.calibration["layers"]
                        pairs["converted"] += [(d.predicted_output_error, layers[d.name]["initial"]) for d in plan.converted]
                ranks = " ".join(str(d.rank) if d.converted else "keep" for d in plan.layers)
                levers = [  # calibrate's options, each on the same conversion
                    convsep.calibrate(copy.deepcopy(converted), model, calibration, **options) for options in CALIBRATION_LEVERS.values()
                ]  # fmt: skip
                rows.append([
                    f"{budget:g}", label, init, ranks, f"{plan.budget['reached']:.1%}",
                    f"{accuracy(converted, test_x, test_y):.2%}", f"{accuracy(calibrated, test_x, test_y):.2%}",
                    *(f"{accuracy(lever, test_x, test_y):.2%}" for lever in levers),
                ])  # fmt: skip
                print(f"activation-aware: budget {budget:g}, {label}, {init}: {rows[-1][-6:]}", file=sys.stderr)
    return rows, pairs


def over_seeds(x, y, test_x, test_y, calibration, example, seeds, epochs, budget=0.25) -> tuple[list[list], list]:
    """The budget's row over several trainings: the drop of weight allocation calibrated as by default (the issue's
    baseline), of allocation by the error after the refit with the weight SVD's pairs calibrated (init="svd"), and of
    convert's default with calibration data (that allocation, pairs fitted jointly on the input moments): as converted,
    calibrated as by default, and with each of calibrate's levers."""
    rows, drops = [], []
    for seed in seeds:
        model = train(x, y, epochs, seed)
        original = accuracy(model, test_x, test_y)
        kwargs = dict(budget=budget, example_inputs=example)
        weights = convsep.convert(model, allocate_by="weights", **kwargs)
        svd = convsep.convert(model, calibration_data=calibration, init="svd", calibration_refit_kept=False, **kwargs)
        joint = convsep.convert(model, calibration_data=calibration, refit=False, **kwargs)  # the default's pairs
        accuracies = [
            accuracy(convsep.calibrate(weights, model, calibration, **PLAIN), test_x, test_y),
            accuracy(svd, test_x, test_y),
            accuracy(joint, test_x, test_y),
        ] + [
            accuracy(convsep.calibrate(copy.deepcopy(joint), model, calibration, **options), test_x, test_y)
            for options in (PLAIN, *CALIBRATION_LEVERS.values())
        ]
        drops.append([100 * (a - original) for a in accuracies])
        ranks = " ".join(str(d.rank) if d.converted else "keep" for d in joint.convsep_plan.layers)
        rows.append([seed, f"{original:.2%}", ranks, *(f"{a:.2%} ({d:+.2f})" for a, d in zip(accuracies, drops[-1], strict=True))])
        print(f"seed {seed}: {rows[-1]}", file=sys.stderr)
    mean = [sum(column) / len(drops) for column in zip(*drops)]
    rows.append(["mean drop", "", "", *(f"{d:+.2f}" for d in mean)])
    return rows, mean


def _correlation(pairs: list[tuple[float, float]]) -> float:
    x, y = torch.tensor(pairs, dtype=torch.float64).T
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=1.0, help="training epochs (default 1)")
    parser.add_argument("--calibration-images", type=int, default=1024, help="training images to calibrate on (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 0.1 epoch, 2000 test images")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--activation-aware-only", action="store_true",
                        help="only the weight-based vs activation-aware table (written to rank_policies_activation.md)")
    parser.add_argument("--every-allocation", type=float, metavar="BUDGET",
                        help="calibrate every allocation that fills BUDGET (written to rank_policies_every_allocation_BUDGET.md)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="the 0.25 budget's row trained with each seed (written to rank_policies_seeds.md)")
    parser.add_argument("--seed-budget", type=float, default=0.25,
                        help="the budget --seeds measures (default 0.25; others go to rank_policies_seeds_BUDGET.md)")
    args = parser.parse_args(argv)
    command = f"python benchmarks/rank_policies.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    if args.threads:
        torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        print(f"Fashion-MNIST not found in {DATA}: apt-get install -y dataset-fashion-mnist", file=sys.stderr)
        return 1
    started = time.time()
    x, y = load("train")
    test_x, test_y = load("test")
    if args.quick:
        args.epochs, test_x, test_y = 0.1, test_x[:2000], test_y[:2000]
    model = train(x, y, args.epochs, args.seed)
    trained = time.time() - started
    example = test_x[:1]
    calibration = [x[i : i + 128] for i in range(0, args.calibration_images, 128)]  # images only, no labels
    if args.every_allocation:
        rows = every_allocation(model, calibration, test_x, test_y, example, args.every_allocation)
        text = (
            f"# Every rank allocation of small_cnn at {args.every_allocation:g} of its MACs, calibrated\n\n"
            f"`{command}`: small_cnn "
            f"(width 32) trained {args.epochs:g} epochs (seed {args.seed}), original test accuracy "
            f"{accuracy(model, test_x, test_y):.2%} on {len(test_x):,} test images. Every allocation within the budget "
            f"that no single layer's rank could be raised in, converted with the weight SVD and calibrated on "
            f"{len(calibration) * 128:,} training images (no labels), best first. {machine_line()}; "
            f"{time.time() - started:.0f} s in all.\n\n"
            f"{tabulate(rows, ['ranks (per conv)', 'MACs kept', 'calibrated'], tablefmt='github')}\n"
        )
        return publish(text, args.output.with_name(f"rank_policies_every_allocation_{args.every_allocation:g}.md"))
    if args.seeds:
        rows, mean = over_seeds(x, y, test_x, test_y, calibration, example, args.seeds, args.epochs, args.seed_budget)
        headers = ["seed", "original", "ranks (default)", "weights, calibrated", "init=svd, calibrated",
                   "default, not calibrated", "default, calibrated, kept layers left",
                   *(f"default, calibrated, {lever}" + (" (the default)" if lever == "kept layers refitted" else "")
                     for lever in CALIBRATION_LEVERS)]  # fmt: skip
        text = (
            f"# small_cnn at {args.seed_budget:g} of its MACs over {len(args.seeds)} trainings\n\n"
            f"`{command}`: small_cnn "
            f"(width 32) trained {args.epochs:g} epochs with each seed on Fashion-MNIST; accuracy on the 10,000 test "
            f"images (and its drop from the original, in points), no backprop after conversion; statistics and "
            f"calibration on the same {len(calibration) * 128:,} unlabelled training images. \"weights\": allocation "
            f"by weight error, calibrated by default (the issue's baseline); \"init=svd\": allocation by the error "
            f"after the refit, the weight SVD's pairs, calibrated (the default before init='joint'); \"default\": "
            f"convert's default with calibration data (that allocation, each pair fitted jointly on its input "
            f"moments), as converted, calibrated, and with calibrate's levers on the same conversion. {machine_line()}; {time.time() - started:.0f} s in all.\n\n"
            f"{tabulate(rows, headers, tablefmt='github')}\n\n"
            f"The issue's target, half the baseline's mean drop: {mean[0] / 2:+.2f} points.\n"
        )
        suffix = "" if args.seed_budget == 0.25 else f"_{args.seed_budget:g}"
        return publish(text, args.output.with_name(f"rank_policies_seeds{suffix}.md"))
    if args.activation_aware_only:
        rows, pairs = activation_aware(model, calibration, test_x, test_y, example, (0.15, 0.25, 0.5))
        headers = ["budget (MACs)", "allocated by", "init", "ranks (per conv)", "MACs kept", "converted", "calibrated",
                   *(f"calibrated, {lever}" for lever in CALIBRATION_LEVERS)]  # fmt: skip
        text = (
            f"# Weight-based vs activation-aware conversion on Fashion-MNIST (small_cnn)\n\n"
            f"`{command}`: small_cnn "
            f"(width 32) trained {args.epochs:g} epochs (seed {args.seed}, {trained:.0f} s), original test accuracy "
            f"{accuracy(model, test_x, test_y):.2%} on {len(test_x):,} test images, no backprop after conversion. "
            f"Statistics and calibration: the same {len(calibration) * 128:,} training images, no labels. "
            f"{machine_line()}; {time.time() - started:.0f} s in all.\n\n"
            f"{tabulate(rows, headers, tablefmt='github')}\n\n"
            f"Predicted vs measured relative output error per layer. As converted, the {len(pairs['converted'])} layers "
            f"factorised with init='activation' (measured: the pair before calibration, on the original model's inputs to "
            f"it): Pearson correlation {_correlation(pairs['converted']):.3f}; pairs "
            f"{', '.join(f'{p:.3f}/{m:.3f}' for p, m in pairs['converted'])}.\n\n"
            f"After the refit, the {len(pairs['refit'])} layers allocated by outputs after refit (measured: after "
            f"calibration, on the converted model's inputs, so earlier layers' errors add): Pearson correlation "
            f"{_correlation(pairs['refit']):.3f}; pairs {', '.join(f'{p:.3f}/{m:.3f}' for p, m in pairs['refit'])}.\n"
        )
        return publish(text, args.output.with_name("rank_policies_activation.md"))

    policies = [
        ("original", None),
        ("rank 1", dict(rank=1)),
        ("energy 0.9", dict(rank=0.9)),
        ("budget 0.5 of MACs", dict(budget=0.5, example_inputs=example)),
        ("budget 0.25 of MACs", dict(budget=0.25, example_inputs=example)),
    ]
    base_macs, base_params = macs(model, example), params(model)
    rows = []
    for name, kwargs in policies:
        if kwargs is None:
            acc = accuracy(model, test_x, test_y)
            rows.append([name, "-", f"{base_macs:,}", "100%", f"{base_params:,}", f"{acc:.2%}", "-", "-", "-"])
            continue
        converted = convsep.convert(model, **kwargs)
        ranks = " ".join(str(d.rank) if d.converted else "keep" for d in converted.convsep_plan.layers)
        calibrated = convsep.calibrate(copy.deepcopy(converted), model, calibration, **PLAIN)
        alternated = convsep.calibrate(copy.deepcopy(converted), model, calibration, alternate=2, **PLAIN)
        at_once = convsep.calibrate(copy.deepcopy(converted), model, calibration, sequential=False)
        m = macs(converted, example)
        rows.append([
            name, ranks, f"{m:,}", f"{m / base_macs:.0%}", f"{params(converted):,}",
            f"{accuracy(converted, test_x, test_y):.2%}",
            f"{accuracy(calibrated, test_x, test_y):.2%}",
            f"{accuracy(alternated, test_x, test_y):.2%}",
            f"{accuracy(at_once, test_x, test_y):.2%}",
        ])  # fmt: skip
        print(f"{name}: done at {time.time() - started:.0f} s", file=sys.stderr)
    headers = ["policy", "ranks (per conv)", "MACs / image", "MACs", "params", "SVD init", "calibrated", "calibrated, alternate=2",
               "calibrated at once"]
    table = tabulate(rows, headers, tablefmt="github")

    gap_rows, combinations = greedy_vs_exhaustive(model, example, [0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    gap_headers = ["budget (MACs)", "optimal ranks", "optimal error", "greedy ranks", "greedy error (gap)", "allocate ranks", "allocate error (gap)"]
    gap_table = tabulate(gap_rows, gap_headers, tablefmt="github")

    text = (
        f"# Rank policies on Fashion-MNIST (small_cnn)\n\n"
        f"`{command}`: small_cnn "
        f"(width 32) trained {args.epochs:g} epochs (seed {args.seed}, {trained:.0f} s), test accuracy on "
        f"{len(test_x):,} test images right after conversion, no backprop. Calibration: "
        f"{len(calibration) * 128:,} training images, no labels. MACs per 28x28 image; {machine_line()}; "
        f"{time.time() - started:.0f} s in all.\n\n{table}\n\n"
        f"## Greedy budget allocation vs exhaustive search\n\n"
        f"Objective: sum over convs of squared relative weight error (lower is better); exhaustive search over "
        f"{combinations} combinations of per-layer ranks including 'keep'. `greedy`: convex-hull greedy alone; "
        f"`allocate` (what convert uses): the better of greedy and the rounded dynamic programme.\n\n{gap_table}\n"
    )
    print(text)
    atomic_write(args.output, text)
    print(f"written to {args.output} ({time.time() - started:.0f} s in all)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
