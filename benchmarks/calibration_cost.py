"""What data-aware conversion costs, in forward passes: the statistics pass, and calibration.

    python benchmarks/calibration_cost.py            # README figures (a few minutes on 2 cores)
    python benchmarks/calibration_cost.py --quick
    python benchmarks/calibration_cost.py --models resnet18 --calibrate-only   # calibrate in order and at once only

For each model, on the same calibration batches: one forward pass of the original and of the
converted model over all of them (the unit), convert's input-statistics pass (activation-aware
factorisation: per channel; refit-aware allocation: cross-channel, then the predicted errors
after the refit at every rank), and calibrate with alternate=0 and alternate=1, each layer after
the other (the default) and all at once (sequential=False). Median of
`--repeats` runs, one process. Models: small_cnn on 28x28 images; resnet18 on 64x64 images; a
1-d audio stack whose middle conv has 1,024 channels and 64-tap kernels in 16 groups (wav2vec2's
positional conv is 768 channels, 128 taps, 16 groups). Writes benchmarks/results/calibration_cost.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import convsep  # noqa: E402
from common import machine_line, median_seconds, save_json  # noqa: E402
from convsep.activations import input_moments  # noqa: E402
from convsep.factorize import channel_svd  # noqa: E402
from convsep.refit_error import refit_errors  # noqa: E402
from convsep.models import resnet18, small_cnn  # noqa: E402



def audio_stack() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(80, 1024, 3, padding=1), nn.GELU(),
        nn.Conv1d(1024, 1024, 64, padding=32, groups=16), nn.GELU(),
        nn.Conv1d(1024, 256, 3, padding=1),
    )  # fmt: skip


MODELS = ("small_cnn", "resnet18", "audio_1024x64")


def workloads(quick: bool, models=MODELS):
    torch.manual_seed(0)
    count = 2 if quick else 8
    built = {
        "small_cnn": lambda: (small_cnn().eval(), [torch.randn(128, 1, 28, 28) for _ in range(count)]),
        "resnet18": lambda: (resnet18(num_classes=10).eval(), [torch.randn(16, 3, 64, 64) for _ in range(count)]),
        "audio_1024x64": lambda: (audio_stack().eval(), [torch.randn(4, 80, 200) for _ in range(count)]),
    }
    for name in models:
        yield (name, *built[name]())


def forward_all(model, data):
    with torch.no_grad():
        for x in data:
            model(x)


def refit_prediction(model, convs, data):
    """What a budget with calibration data adds to conversion: the cross-channel moments, then each layer's
    predicted error after the refit at every rank."""
    moments = input_moments(model, convs, data, None, cross_channel=True)
    for name, conv in convs.items():
        basis = channel_svd(conv.weight, conv.groups).Vh
        m = moments[name]
        refit_errors(conv.weight, conv.bias, conv.groups, basis, m.covariance(), m.mean(), basis.shape[1], 1e-3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--calibrate-only", action="store_true", help="skip the statistics passes of convert")
    parser.add_argument("--alternates", nargs="+", type=int, default=[0, 1], help="calibrate's alternate= values to time")
    args = parser.parse_args(argv)
    print(machine_line())
    rows = []
    for name, model, data in workloads(args.quick, args.models):
        converted = convsep.convert(model, rank=args.rank, init="svd")
        convs = {d.name: model.get_submodule(d.name) for d in converted.convsep_plan.converted}
        unit = median_seconds(lambda: (forward_all(model, data), forward_all(converted, data)), args.repeats)
        original_only = median_seconds(lambda: forward_all(model, data), args.repeats)
        row = {"model": name, "batches": len(data), "both_forwards_s": round(unit, 3), "original_forward_s": round(original_only, 3)}
        if not args.calibrate_only:
            statistics = median_seconds(lambda: input_moments(model, convs, data, None), args.repeats)
            crossed = median_seconds(lambda: input_moments(model, convs, data, None, cross_channel=True), args.repeats)
            predicted = median_seconds(lambda: refit_prediction(model, convs, data), args.repeats)
            row.update(statistics_s=round(statistics, 3), statistics_over_original_forward=round(statistics / original_only, 2),
                       cross_channel_statistics_s=round(crossed, 3), cross_channel_over_original_forward=round(crossed / original_only, 2),
                       refit_prediction_s=round(predicted, 3), refit_prediction_over_original_forward=round(predicted / original_only, 2))  # fmt: skip
        for alternate, sequential in itertools.product(args.alternates, (True, False)):
            seconds = median_seconds(
                lambda: convsep.calibrate(copy.deepcopy(converted), model, data, alternate=alternate, sequential=sequential),
                args.repeats,
                warmup=0,
            )
            key = f"calibrate{'' if sequential else '_at_once'}_alternate{alternate}"
            row[f"{key}_s"] = round(seconds, 3)
            row[f"{key}_over_both_forwards"] = round(seconds / unit, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.quick:
        whole = args.models == list(MODELS) and not args.calibrate_only and args.alternates == [0, 1]
        command = "python benchmarks/calibration_cost.py" + ("" if argv is None and whole else " " + " ".join(argv or sys.argv[1:]))
        name = "calibration_cost" + ("" if args.models == list(MODELS) else "_" + "_".join(args.models))
        name += "" if whole or not args.calibrate_only else "_calibrate"
        save_json(name, {"command": command, "rank": args.rank, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
