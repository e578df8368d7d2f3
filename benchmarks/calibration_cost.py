"""What data-aware conversion costs, in forward passes: the statistics pass, and calibration.

    python benchmarks/calibration_cost.py            # README figures (a few minutes on 2 cores)
    python benchmarks/calibration_cost.py --quick
    python benchmarks/calibration_cost.py --models resnet18 --calibrate-only   # calibrate in order and at once only
    python benchmarks/calibration_cost.py --models resnet18 --size 224 --images 64 --alternates  # statistics only
    python benchmarks/calibration_cost.py --models small_cnn resnet18 --calibrate-only --alternates 0 8 --refit-kept --tag levers
    python benchmarks/calibration_cost.py --calibrate-only --alternates --joint --threads 1   # what init='joint' adds

For each model, on the same calibration batches: one forward pass of the original and of the
converted model over all of them (the unit), convert's input-statistics pass (activation-aware
factorisation: per channel; refit-aware allocation: cross-channel, then the predicted errors
after the refit at every rank), and calibrate with alternate=0 and alternate=1, each layer after
the other (the default) and all at once (sequential=False). Median of
`--repeats` runs, one process. Models: small_cnn on 28x28 images; resnet18 on 64x64 images; a
1-d audio stack whose middle conv has 1,024 channels and 64-tap kernels in 16 groups (wav2vec2's
positional conv is 768 channels, 128 taps, 16 groups). `--size` and `--images` change the images
(side, and how many in the models' usual batches: 128, 16, 4) to see the fixed costs (moments held
per layer, one factorisation per layer) amortise; `--threads` pins torch's threads (on a shared
machine one thread is the steadier unit). Writes benchmarks/results/calibration_cost.json, or a name
that says what differs.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path
from statistics import median as statistics_median

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from common import machine_line, median_seconds, save_json  # noqa: E402

import convsep  # noqa: E402
from convsep.activations import input_moments  # noqa: E402
from convsep.convert import Candidate  # noqa: E402
from convsep.count import kernel_elements, largest_saving_rank  # noqa: E402
from convsep.factorize import channel_svd  # noqa: E402
from convsep.models import resnet18, small_cnn  # noqa: E402
from convsep.refit_error import predicted_refit_errors  # noqa: E402


def audio_stack() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(80, 1024, 3, padding=1), nn.GELU(),
        nn.Conv1d(1024, 1024, 64, padding=32, groups=16), nn.GELU(),
        nn.Conv1d(1024, 256, 3, padding=1),
    )  # fmt: skip


MODELS = ("small_cnn", "resnet18", "audio_1024x64")


BATCH = {"small_cnn": 128, "resnet18": 16, "audio_1024x64": 4}


def workloads(quick: bool, models=MODELS, size=None, images=None):
    """(name, model, batches): 8 batches (2 with `quick`), or `images` inputs in batches of the model's usual size;
    `size` replaces the image side (28 for small_cnn, 64 for resnet18)."""
    torch.manual_seed(0)

    def batches(name, *shape):
        count = 2 if quick else 8
        step = BATCH[name]
        sizes = [step] * count if images is None else [min(step, images - s) for s in range(0, images, step)]
        return [torch.randn(n, *shape) for n in sizes]

    built = {
        "small_cnn": lambda: (small_cnn().eval(), batches("small_cnn", 1, size or 28, size or 28)),
        "resnet18": lambda: (resnet18(num_classes=10).eval(), batches("resnet18", 3, size or 64, size or 64)),
        "audio_1024x64": lambda: (audio_stack().eval(), batches("audio_1024x64", 80, 200)),
    }
    for name in models:
        yield (name, *built[name]())


def forward_all(model, data):
    with torch.no_grad():
        for x in data:
            model(x)


def refit_prediction(model, convs, data):
    """What a budget with calibration data adds to conversion: the cross-channel moments, then each layer's
    predicted error after the refit at every rank that saves MACs (what convert predicts)."""
    moments = input_moments(model, convs, data, None, cross_channel=True)
    for name, conv in convs.items():
        basis = channel_svd(conv.weight, conv.groups).Vh
        m, k = moments[name], kernel_elements(conv.kernel_size)
        ranks = min(basis.shape[1], max(1, largest_saving_rank(conv.out_channels, conv.in_channels, k, conv.groups)))
        predicted_refit_errors(conv.weight, conv.bias, conv.groups, basis, m, ranks, 1e-3)


def joint_fit_seconds(model, data) -> tuple[float, float]:
    """convert's default with a budget and calibration data (statistics, allocation, joint fit, calibration): its
    seconds, and those of the joint fits in it (Candidate.fit_on_moments, timed from outside)."""
    spent, fit_on_moments = [], Candidate.fit_on_moments

    def timed(self):
        started = time.perf_counter()
        fit_on_moments(self)
        spent.append(time.perf_counter() - started)

    Candidate.fit_on_moments = timed
    try:
        started = time.perf_counter()
        convsep.convert(model, budget=0.25, example_inputs=data[0][:1], calibration_data=data)
        return time.perf_counter() - started, sum(spent)
    finally:
        Candidate.fit_on_moments = fit_on_moments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--calibrate-only", action="store_true", help="skip the statistics passes of convert")
    parser.add_argument("--alternates", nargs="*", type=int, default=[0, 1],
                        help="calibrate's alternate= values to time (none: the statistics passes only)")
    parser.add_argument("--size", type=int, help="image side for small_cnn and resnet18 (default 28 and 64)")
    parser.add_argument("--images", type=int, help="inputs per model, in its usual batches (default 8 batches)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--refit-kept", action="store_true",
                        help="also time calibrate(refit_kept=True), in order, at each of --alternates")
    parser.add_argument("--joint", action="store_true",
                        help="also time convert's default with budget=0.25 and calibration data, and the joint fits "
                        "in it (init='joint'), in forwards of the original")
    parser.add_argument("--tag", help="a word added to the results' file name (e.g. before a change)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    rows = []
    for name, model, data in workloads(args.quick, args.models, args.size, args.images):
        converted = convsep.convert(model, rank=args.rank, init="svd")
        convs = {d.name: model.get_submodule(d.name) for d in converted.convsep_plan.converted}
        unit = median_seconds(lambda: (forward_all(model, data), forward_all(converted, data)), args.repeats)
        original_only = median_seconds(lambda: forward_all(model, data), args.repeats)
        row = {"model": name, "batches": len(data), "inputs": sum(map(len, data)),
               "input_shape": list(data[0].shape[1:]),
               "both_forwards_s": round(unit, 3), "original_forward_s": round(original_only, 3)}
        if not args.calibrate_only:
            statistics = median_seconds(lambda: input_moments(model, convs, data, None), args.repeats)
            crossed = median_seconds(lambda: input_moments(model, convs, data, None, cross_channel=True), args.repeats)
            predicted = median_seconds(lambda: refit_prediction(model, convs, data), args.repeats)
            row.update(statistics_s=round(statistics, 3), statistics_over_original_forward=round(statistics / original_only, 2),
                       cross_channel_statistics_s=round(crossed, 3), cross_channel_over_original_forward=round(crossed / original_only, 2),
                       refit_prediction_s=round(predicted, 3), refit_prediction_over_original_forward=round(predicted / original_only, 2))  # fmt: skip
        if args.joint:
            runs = [joint_fit_seconds(model, data) for _ in range(args.repeats)]
            whole, fits = (statistics_median([run[i] for run in runs]) for i in (0, 1))
            row.update(convert_default_s=round(whole, 3), convert_default_over_original_forward=round(whole / original_only, 2),
                       joint_fit_s=round(fits, 3), joint_fit_over_original_forward=round(fits / original_only, 2))  # fmt: skip
        for alternate, sequential in itertools.product(args.alternates, (True, False)):
            seconds = median_seconds(
                lambda: convsep.calibrate(copy.deepcopy(converted), model, data, alternate=alternate, sequential=sequential),
                args.repeats,
                warmup=0,
            )
            key = f"calibrate{'' if sequential else '_at_once'}_alternate{alternate}"
            row[f"{key}_s"] = round(seconds, 3)
            row[f"{key}_over_both_forwards"] = round(seconds / unit, 2)
        for alternate in args.alternates if args.refit_kept else ():
            seconds = median_seconds(
                lambda: convsep.calibrate(copy.deepcopy(converted), model, data, alternate=alternate, refit_kept=True),
                args.repeats,
                warmup=0,
            )
            row[f"calibrate_alternate{alternate}_refit_kept_s"] = round(seconds, 3)
            row[f"calibrate_alternate{alternate}_refit_kept_over_both_forwards"] = round(seconds / unit, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.quick:
        whole = args.models == list(MODELS) and not args.calibrate_only and args.alternates == [0, 1] and not (
            args.size or args.images or args.threads or args.tag or args.refit_kept or args.joint)
        command = "python benchmarks/calibration_cost.py" + ("" if argv is None and whole else " " + " ".join(argv or sys.argv[1:]))
        name = "calibration_cost" + ("" if args.models == list(MODELS) else "_" + "_".join(args.models))
        name += "" if whole or not args.calibrate_only else "_calibrate"
        name += "".join(f"_{label}{value}" for label, value in (("size", args.size), ("images", args.images),
                                                                 ("threads", args.threads)) if value)
        name += ("_statistics" if not args.alternates else "") + ("_joint" if args.joint else "")
        name += f"_{args.tag}" if args.tag else ""
        save_json(name, {"command": command, "rank": args.rank, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
