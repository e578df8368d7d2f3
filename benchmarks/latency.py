"""Measured inference latency before and after conversion, against the MAC reduction.

    python benchmarks/latency.py [--repeats 7] [--batches 1 8] [--models resnet18 ...]

For each built-in architecture at 224x224: median latency (torch.inference_mode, after
warm-up) of the original and of the converted model at rank 1, rank 2 and a MAC budget
of 0.3, in contiguous and channels_last memory formats, and the ratio of measured
speed-up to MAC reduction (1.0 would mean time fell as much as MACs did). Ends with a
profile of where the converted ResNet-50's time goes, by operator.
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

import convsep
from convsep.models import ZOO

from common import machine_line, median_seconds, save_json


def macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() // 2


def variants(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    out = {"rank 1": convsep.convert(model, rank=1), "rank 2": convsep.convert(model, rank=2)}
    try:
        out["budget 0.3"] = convsep.convert(model, budget=0.3, example_inputs=x)
    except convsep.ConvsepValueError as error:  # MobileNet is separable already: 0.3 is out of reach
        print(f"budget 0.3: {error}", flush=True)
    return out


def latency(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        return median_seconds(lambda: model(x), repeats=repeats, warmup=2)


def profile_by_operator(model: torch.nn.Module, x: torch.Tensor, top: int = 8) -> list[dict]:
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
            model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"operator": e.key, "calls": e.count, "self ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
        for e in events[:top]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vgg16", "mobilenet_v1"])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-operator profile of ResNet-50")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        model = ZOO[name]().eval()
        probe = torch.randn(1, 3, 224, 224)
        converted = variants(model, probe)
        base_macs = macs(model, probe)
        for batch in args.batches:
            x = torch.randn(batch, 3, 224, 224)
            for fmt in (torch.contiguous_format, torch.channels_last):
                fmt_name = "channels_last" if fmt is torch.channels_last else "contiguous"
                xs = x.contiguous(memory_format=fmt)
                base = latency(model.to(memory_format=fmt), xs, args.repeats)
                rows.append(_row(name, batch, fmt_name, "original", base, base, 1.0))
                for label, variant in converted.items():
                    t = latency(variant.to(memory_format=fmt), xs, args.repeats)
                    mac_ratio = macs(variant, probe) / base_macs
                    rows.append(_row(name, batch, fmt_name, label, t, base, mac_ratio))
                print(f"{name} batch {batch} {fmt_name}: done", flush=True)

    print(f"\nLatency at 224x224, median of {args.repeats} runs after warm-up; {machine_line()}\n")
    print(tabulate(rows, headers="keys", floatfmt=".3f"))

    if args.no_profile:
        print("\nwrote", save_json("latency", {"repeats": args.repeats, "rows": rows}))
        return
    resnet = ZOO["resnet50"]().eval()
    x = torch.randn(1, 3, 224, 224)
    profiles = {
        "resnet50 original": profile_by_operator(resnet, x),
        "resnet50 rank 1": profile_by_operator(convsep.convert(resnet, rank=1), x),
    }
    for title, table in profiles.items():
        print(f"\nWhere the time goes, {title}, batch 1 (torch.profiler, self CPU time):\n")
        print(tabulate(table, headers="keys", floatfmt=".3f"))
    print("\nwrote", save_json("latency", {"repeats": args.repeats, "rows": rows, "profiles": profiles}))


def _row(model, batch, fmt, variant, seconds, base, mac_ratio):
    speedup = base / seconds
    return {
        "model": model,
        "batch": batch,
        "format": fmt,
        "variant": variant,
        "ms": seconds * 1e3,
        "speed-up": speedup,
        "MACs after/before": mac_ratio,
        "speed-up / MAC reduction": speedup * mac_ratio,
    }


if __name__ == "__main__":
    main()
