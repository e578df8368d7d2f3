"""The before-and-after report: parameters, MACs, FLOPs (and optionally latency), per layer and in total.

One row per convolution the conversion plan considered (converted, or kept with its
reason), measured on one forward pass of each model (see probe.py): shapes from hooks,
per-layer MACs from the closed forms in count.py times the positions actually computed,
whole-model FLOPs from torch's FlopCounterMode on that same pass, so the totals are
FlopCounterMode's figures exactly (MACs = FLOPs / 2). The weight error of a converted
layer is measured on the pair's current weights, so it stays true after calibration or
fine-tuning. A model without a plan (not converted) reports its convolutions as they are.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tabulate import tabulate
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from . import latency as latency_timer
from .count import conv_macs, conv_params, kernel_elements, positions, separable_macs, separable_params
from .errors import ConvsepValueError
from .factorize import compose, compute_dtype
from .eager import require_eager
from .layers import _SeparableConvNd, conv_layers
from .parametrized import effective
from .plan import ConversionPlan, plan_of
from .probe import Call, Probe, describe_inputs, example_args, functional_weights, probe

FORMATS = ("table", "markdown", "json", "csv")
CONVENTIONS = (
    "MACs = multiply-accumulates; FLOPs = 2 x MACs; bias adds are not counted (torch's FlopCounterMode convention). "
    "Totals cover the whole model (every layer, not only convolutions) and are FlopCounterMode's own count of one "
    "forward pass in eval mode. Weight error = ||W - W'||_F / ||W||_F between the original kernel and the one the "
    "pair computes now. Rank r of R: r depthwise filters per input channel, out of the R at which the pair is exact."
)


@dataclass
class _Site:
    """Where one convolution lives in one model: a conv module, a depthwise + pointwise pair, or the
    parameter a functional conv (`F.conv2d(x, self.weight)`) uses."""

    module: Optional[nn.Module] = None
    weight: Optional[Tensor] = None

    @property
    def key(self) -> int:
        return id(self.module if self.module is not None else self.weight)

    @property
    def is_pair(self) -> bool:
        return isinstance(self.module, _SeparableConvNd)

    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.module.kernel_size) if self.module is not None else tuple(self.weight.shape[2:])

    def groups(self, calls: list[Call], fallback: int) -> int:
        if self.module is not None:
            return self.module.groups
        return calls[0].groups if calls else fallback

    def params(self, calls: list[Call], bias: bool) -> int:
        m, k = self.module, kernel_elements(self.kernel_size())
        if self.is_pair:
            has_bias = m.pointwise.bias is not None
            return separable_params(m.out_channels, m.in_channels, k, m.groups, m.rank, has_bias)
        if m is not None:
            return conv_params(m.out_channels, m.in_channels, k, m.groups, m.bias is not None)
        # A functional conv: N * M/g * K weights whatever g is, plus a bias if the call passed one.
        n, m_g = self.weight.shape[:2]
        return conv_params(n, m_g, k, 1, calls[0].has_bias if calls else bias)

    def macs(self, calls: list[Call]) -> int:
        m, k, dims = self.module, kernel_elements(self.kernel_size()), len(self.kernel_size())
        total = 0
        for call in calls:
            if self.is_pair:
                where = positions(call.output_shape, dims)
                total += separable_macs(m.out_channels, m.in_channels, k, m.groups, m.rank, where)
            elif m is not None:
                # A transposed conv meets every *input* position with the whole kernel (FlopCounterMode agrees).
                shape = call.input_shape if isinstance(m, _ConvTransposeNd) else call.output_shape
                total += conv_macs(m.out_channels, m.in_channels, k, m.groups, positions(shape, dims))
            else:
                n, m_g = self.weight.shape[:2]
                total += conv_macs(n, m_g * call.groups, k, call.groups, positions(call.output_shape, dims))
        return total

    def dense_kernel(self) -> Tensor:
        """The (N, M/g, *k) kernel this site computes with (half precisions widened to float32)."""
        if self.is_pair:
            m = self.module
            dtype = compute_dtype(m.depthwise.weight.dtype)
            depthwise, pointwise = m.depthwise.weight.detach().to(dtype), m.pointwise.weight.detach().to(dtype)
            return compose(depthwise, pointwise, m.groups, m.rank)
        # effective: a weight-normed conv's weight as its forward uses it, read without moving spectral norm's state
        weight = effective(self.module, "weight") if self.module is not None else self.weight
        return weight.detach().to(compute_dtype(weight.dtype))


@dataclass
class _Layer:
    name: str
    kind: str
    converted: bool
    before: Optional[_Site]
    after: Optional[_Site]
    reason: str = ""
    rank: Optional[int] = None
    full_rank: Optional[int] = None
    plan_error: Optional[float] = None
    predicted_output_error: Optional[float] = None  # from the input statistics at conversion
    measured_output_error: Optional[float] = None  # calibration's measure of the same, when calibrated
    predicted_refit_error: Optional[float] = None  # what calibration's refit should leave, from the input statistics
    measured_refit_error: Optional[float] = None  # what it left (on the converted model's inputs)
    module: str = ""  # where the layer lives in the converted model
    groups: int = 1
    bias: bool = False


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (_ConvNd, _SeparableConvNd))


def _find(model: nn.Module, name: str, functional: bool) -> Optional[_Site]:
    """The site called `name` in `model`: a parameter for a functional conv, else a conv or pair module."""
    try:
        if functional:
            return _Site(weight=model.get_parameter(name))
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return _Site(module=module) if _is_layer(module) else None


def _layers_from_plan(plan: ConversionPlan, before: nn.Module, after: nn.Module) -> list[_Layer]:
    layers = []
    calibrated = (plan.calibration or {}).get("layers", {})
    measured = {name: errors["initial"] for name, errors in calibrated.items() if "initial" in errors}
    refitted = {name: errors["after"] for name, errors in calibrated.items() if "after" in errors}
    for d in plan.layers:
        functional = d.kind.startswith("F.")
        # `before` is normally the model the plan was made from; if it is itself converted, look where the pair is.
        before_site = _find(before, d.name, functional) or _find(before, d.module, False)
        after_site = _find(after, d.module, False) if d.converted else _find(after, d.name, functional)
        layers.append(
            _Layer(
                name=d.name, kind=d.kind, converted=d.converted, before=before_site, after=after_site,
                reason=d.reason, rank=d.rank, full_rank=d.full_rank, plan_error=d.relative_error,
                predicted_output_error=d.predicted_output_error, measured_output_error=measured.get(d.name),
                predicted_refit_error=d.predicted_refit_error, measured_refit_error=refitted.get(d.name),
                module=d.module, groups=d.groups, bias=d.bias,
            )  # fmt: skip
        )
    return layers


def _layers_without_plan(before: nn.Module, after: nn.Module) -> list[_Layer]:
    """Every conv of either model, matched by name: a model nobody converted reports its convs as they are."""
    names = dict.fromkeys(name for model in (after, before) for name, _ in conv_layers(model))
    layers = []
    for name in names:
        b, a = _find(before, name, False), _find(after, name, False)
        site = b or a
        converted = a is not None and a.is_pair and not (b is not None and b.is_pair)
        layers.append(
            _Layer(
                name=name, kind=type(site.module).__name__, converted=converted, before=b, after=a,
                rank=a.module.rank if a is not None and a.is_pair else None, module=name, groups=site.module.groups,
            )  # fmt: skip
        )
    return layers


def _functional_layers_seen(layers, before_weights, after_weights, probes, planned: bool) -> list[_Layer]:
    """Functional convs that ran but are not listed (no plan, or inside code fx could not trace)."""
    listed = {site.key for layer in layers for site in (layer.before, layer.after) if site is not None}
    extra = []
    for name in dict.fromkeys([*before_weights, *after_weights]):
        b = _Site(weight=before_weights[name]) if name in before_weights else None
        a = _Site(weight=after_weights[name]) if name in after_weights else None
        ran = [s for s, p in ((b, probes[0]), (a, probes[1])) if s is not None and s.key in p.calls]
        if not ran or any(s.key in listed for s in ran):
            continue
        reason = "not in the conversion plan (fx could not trace the code that calls it)" if planned else ""
        kind = f"F.conv{ran[0].weight.dim() - 2}d"
        extra.append(_Layer(name=name, kind=kind, converted=False, before=b, after=a, reason=reason, module=name))
    return extra


def report(
    before: nn.Module,
    after: nn.Module,
    example_inputs: Any,
    *,
    latency: bool = False,
    latency_runs: int = 5,
    latency_warmup: int = 1,
    original_weights: bool = True,
) -> "Report":
    """Compare `before` (the original model) with `after` (its conversion) on one forward pass each.

    example_inputs: a tensor, or a tuple of tensors passed as positional arguments. Counts are for
        these inputs: a batch of B counts B samples (the header says which).
    latency: also time both models, in total and per listed layer (median of `latency_runs` runs
        after `latency_warmup`; costs about 2 x latency_runs + latency_warmup passes per model).
    original_weights: False when `before` has the original architecture but not its trained weights
        (a converted checkpoint read back with a freshly built model): weight errors then come from
        the conversion plan instead of comparing kernels.

    Neither model is modified (both run in eval mode without autograd; training flags are restored).
    Raises InputShapeError, naming the layer where it failed, when the inputs do not fit a model.
    """
    for label, model in (("before", before), ("after", after)):
        require_eager(model, label)
    args = example_args(example_inputs)
    if isinstance(latency_runs, bool) or not isinstance(latency_runs, int) or latency_runs < 1:
        raise ConvsepValueError(f"latency_runs must be a positive int, got {latency_runs!r}")
    plan = plan_of(after)
    layers = _layers_from_plan(plan, before, after) if plan is not None else _layers_without_plan(before, after)

    weights = (functional_weights(before), functional_weights(after))
    probes: list[Probe] = []
    for side, model, label in ((0, before, "the original model"), (1, after, "the converted model")):
        sites = [getattr(layer, ("before", "after")[side]) for layer in layers]
        modules = [s.module for s in sites if s is not None and s.module is not None]
        probes.append(probe(model, args, modules, list(weights[side].values()), label=label))
    layers += _functional_layers_seen(layers, *weights, probes, planned=plan is not None)

    timings = None
    if latency:
        timings = []
        for side, model in ((0, before), (1, after)):
            sites = [getattr(layer, ("before", "after")[side]) for layer in layers]
            modules = [s.module for s in sites if s is not None and s.module is not None]
            timings.append(latency_timer.measure_once(model, args, modules, runs=latency_runs, warmup=latency_warmup))

    rows = [_row(layer, probes, timings, original_weights) for layer in _in_execution_order(layers, probes)]
    totals = _totals(before, after, probes, timings)
    header = _header(plan, layers, args, timings, latency_runs, latency_warmup)
    return Report(rows, totals, header)


def _in_execution_order(layers: list[_Layer], probes: list[Probe]) -> list[_Layer]:
    def first_call(index_layer):
        index, layer = index_layer
        for side, site in enumerate((layer.before, layer.after)):
            calls = probes[side].calls.get(site.key) if site is not None else None
            if calls:
                return (side, calls[0].order, index)
        return (2, 0, index)  # never ran on these inputs: last, in plan order

    return [layer for _, layer in sorted(enumerate(layers), key=first_call)]


def _row(layer: _Layer, probes: list[Probe], timings, original_weights: bool) -> dict[str, Any]:
    sides = []
    for side, site in enumerate((layer.before, layer.after)):
        calls = probes[side].calls.get(site.key, []) if site is not None else []
        sides.append((site, calls))
    (b, b_calls), (a, a_calls) = sides
    shape_calls = b_calls or a_calls
    site = b or a
    macs_before = b.macs(b_calls) if b is not None else None
    macs_after = a.macs(a_calls) if a is not None else None
    row = {
        "name": layer.name,
        "kind": layer.kind,
        "converted": layer.converted,
        "rank": layer.rank,
        "full_rank": layer.full_rank,
        "reason": layer.reason,
        "module": layer.module,
        "calls": len(shape_calls),
        "shape_in": list(shape_calls[0].input_shape) if shape_calls else None,
        "shape_out": list(shape_calls[0].output_shape) if shape_calls else None,
        "kernel": list(site.kernel_size()) if site is not None else None,
        "groups": site.groups(shape_calls, layer.groups) if site is not None else layer.groups,
        "params_before": b.params(b_calls, layer.bias) if b is not None else None,
        "params_after": a.params(a_calls, layer.bias) if a is not None else None,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "flops_before": None if macs_before is None else 2 * macs_before,
        "flops_after": None if macs_after is None else 2 * macs_after,
    }
    row["weight_error"], row["weight_error_source"] = _weight_error(layer, original_weights)
    row["predicted_output_error"] = layer.predicted_output_error
    row["measured_output_error"] = layer.measured_output_error
    row["predicted_refit_error"] = layer.predicted_refit_error
    row["measured_refit_error"] = layer.measured_refit_error
    if timings is not None:
        for side, (s, _) in enumerate(sides):
            seconds = timings[side].layers.get(s.key) if s is not None and s.module is not None else None
            row[("latency_before_ms", "latency_after_ms")[side]] = None if seconds is None else seconds * 1e3
    return row


def _weight_error(layer: _Layer, original_weights: bool) -> tuple[Optional[float], Optional[str]]:
    """||W - W'|| / ||W|| from the weights as they are now; the plan's figure when the original is not at hand."""
    if not layer.converted:
        return None, None
    if original_weights and layer.before is not None and layer.after is not None and layer.after.is_pair:
        with torch.no_grad():
            original, now = layer.before.dense_kernel(), layer.after.dense_kernel()
            if original.shape == now.shape:
                # In the weights' own precision: float32 sums are good to ~1e-6 here, and twice as fast.
                norm, gap = original.norm(), torch.dist(now.to(original.dtype), original)
                return (float(gap / norm) if norm > 0 else float(gap > 0)), "weights"
    return (layer.plan_error, "plan") if layer.plan_error is not None else (None, None)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ratio(after: Optional[float], before: Optional[float]) -> Optional[float]:
    return None if after is None or not before else after / before


def _totals(before, after, probes, timings) -> dict[str, Any]:
    totals: dict[str, Any] = {
        "params_before": _params(before),
        "params_after": _params(after),
        "flops_before": probes[0].flops,
        "flops_after": probes[1].flops,
    }
    # Every formula FlopCounterMode applies counts 2 per multiply-accumulate, so halving is exact.
    totals["macs_before"] = totals["flops_before"] // 2
    totals["macs_after"] = totals["flops_after"] // 2
    for quantity in ("params", "macs", "flops"):
        totals[f"{quantity}_ratio"] = _ratio(totals[f"{quantity}_after"], totals[f"{quantity}_before"])
    if timings is not None:
        totals["latency_before_ms"] = timings[0].total * 1e3
        totals["latency_after_ms"] = timings[1].total * 1e3
        totals["latency_ratio"] = _ratio(totals["latency_after_ms"], totals["latency_before_ms"])
    return totals


def _header(plan, layers, args, timings, runs, warmup) -> dict[str, Any]:
    first = args[0]
    batch = first.shape[0] if first.dim() >= 1 else None
    header: dict[str, Any] = {
        "inputs": [{"shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")} for a in args],
        "inputs_text": describe_inputs(args),
        "batch_size": batch,
        "counts_per": "sample" if batch == 1 else (f"batch of {batch}" if batch is not None else "forward pass"),
        "considered": len(layers),
        "converted": sum(layer.converted for layer in layers),
        "plan": None if plan is None else {"rank": plan.rank, "init": plan.init, "path": plan.path},
        "latency": None,
    }
    if timings is not None:
        header["latency"] = {
            "device": str(args[0].device),
            "threads": torch.get_num_threads(),
            "runs": runs,
            "warmup": warmup,
            "statistic": "median",
        }
    return header


def _si(value: Optional[float]) -> str:
    """Compact number for the per-layer table: 36.9K, 1.85G."""
    if value is None:
        return "-"
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:g}"


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape is not None else "-"


def _number(value, digits: str = ".3g") -> str:
    return "-" if value is None else format(value, digits)


class Report:
    """What conversion changed: `str(report)` is the table; `.rows`, `.totals`, `.header` hold the figures.

    rows: one dict per convolution (name, kind, converted, rank, reason, shapes, kernel, groups,
        params/MACs/FLOPs before and after, weight_error, and latency_*_ms when measured).
    totals: whole-model params_*, macs_*, flops_* (ints), their *_ratio (after / before), and latency_*.
    """

    def __init__(self, rows: list[dict[str, Any]], totals: dict[str, Any], header: dict[str, Any]) -> None:
        self.rows = rows
        self.totals = totals
        self.header = header

    @property
    def has_latency(self) -> bool:
        return self.header.get("latency") is not None

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header, "rows": self.rows, "totals": self.totals, "conventions": CONVENTIONS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def header_lines(self) -> list[str]:
        h = self.header
        plan = h["plan"]
        lines = [
            f"convsep report: {h['converted']} of {h['considered']} convolutions converted"
            + (f" (rank={plan['rank']}, init={plan['init']}, path={plan['path']})" if plan else " (no conversion plan)")
        ]
        lines.append(f"Counts per {h['counts_per']}: one forward pass on inputs {h['inputs_text']}, in eval mode.")
        if self.has_latency:
            lat = h["latency"]
            lines.append(
                f"Latency on {lat['device']}, {lat['threads']} thread{'s' if lat['threads'] != 1 else ''}: "
                f"median of {lat['runs']} run{'s' if lat['runs'] != 1 else ''} after "
                f"{lat['warmup']} warm-up; per layer from forward pre/post hooks."
            )
        return lines

    def _layer_table(self, wrap: bool) -> tuple[list[str], list[list[str]]]:
        headers = ["layer", "kind", "shape in -> out", "kernel", "groups", "rank", "params before", "params after",
                   "MACs before", "MACs after", "weight error"]  # fmt: skip
        predicted = any(r["predicted_output_error"] is not None for r in self.rows)
        if predicted:
            headers += ["output error predicted", "measured"]
        refit = any(r["predicted_refit_error"] is not None for r in self.rows)
        if refit:
            headers += ["after refit predicted", "measured"]
        if self.has_latency:
            headers += ["ms before", "ms after"]
        table = []
        for r in self.rows:
            if r["converted"]:
                rank = f"{r['rank']} of {r['full_rank']}" if r["full_rank"] else str(r["rank"])
            else:
                rank = f"kept: {r['reason']}" if r["reason"] else "-"
                rank = textwrap.fill(rank, 40) if wrap else rank
            shape = f"{_shape(r['shape_in'])} -> {_shape(r['shape_out'])}" if r["shape_in"] else "not run"
            if r["calls"] > 1:
                shape += f" (x{r['calls']} calls)"
            line = [
                r["name"], r["kind"], shape, _shape(r["kernel"]), r["groups"], rank,
                _si(r["params_before"]), _si(r["params_after"]), _si(r["macs_before"]), _si(r["macs_after"]),
                _number(r["weight_error"]),
            ]  # fmt: skip
            if predicted:
                line += [_number(r["predicted_output_error"]), _number(r["measured_output_error"])]
            if refit:
                line += [_number(r["predicted_refit_error"]), _number(r["measured_refit_error"])]
            if self.has_latency:
                line += [_number(r["latency_before_ms"], ".3f"), _number(r["latency_after_ms"], ".3f")]
            table.append(line)
        return headers, table

    def _totals_table(self) -> tuple[list[str], list[list[str]]]:
        t = self.totals
        table = [
            [label, f"{t[f'{key}_before']:,}", f"{t[f'{key}_after']:,}", _number(t[f"{key}_ratio"], ".3f") + "x"]
            for label, key in (("params", "params"), ("MACs", "macs"), ("FLOPs", "flops"))
        ]
        if self.has_latency:
            table.append(["latency (ms)", f"{t['latency_before_ms']:.2f}", f"{t['latency_after_ms']:.2f}",
                          _number(t["latency_ratio"], ".3f") + "x"])  # fmt: skip
        return ["whole model", "before", "after", "after / before"], table

    def _render(self, tablefmt: str, wrap: bool, line_break: str = "\n") -> str:
        layer_headers, layer_rows = self._layer_table(wrap)
        total_headers, total_rows = self._totals_table()
        layers = tabulate(layer_rows, layer_headers, tablefmt=tablefmt, disable_numparse=True)
        totals = tabulate(total_rows, total_headers, tablefmt=tablefmt, disable_numparse=True, colalign=_TOTALS_ALIGN)
        header = line_break.join(self.header_lines())
        footer = textwrap.fill(CONVENTIONS, 110) if wrap else CONVENTIONS
        return "\n\n".join([header, layers if layer_rows else "(no convolutions)", totals, footer])

    def __str__(self) -> str:
        return self._render("simple", wrap=True)

    def __repr__(self) -> str:
        t = self.totals
        return f"<Report {len(self.rows)} convolutions, MACs {t['macs_before']:,} -> {t['macs_after']:,}>"

    def to_markdown(self) -> str:
        """GitHub-flavoured markdown: the header as text, the two tables, the conventions."""
        return self._render("github", wrap=False, line_break="  \n")  # two spaces: a markdown line break

    def to_csv(self) -> str:
        """One line per convolution, then one for the whole model (name "(whole model)", kind "total")."""
        totals = [k for k in _CSV_TOTAL_FIELDS if k in self.totals]
        fields = list(self.rows[0]) if self.rows else ["name", "kind", *totals]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _shape(v) if isinstance(v, list) else ("" if v is None else v) for k, v in row.items()})
        total = {"name": "(whole model)", "kind": "total"}
        total.update({k: self.totals[k] for k in totals if k in fields})
        writer.writerow(total)
        return out.getvalue()

    def render(self, fmt: str = "table") -> str:
        """The report as "table" (plain text), "markdown", "json" or "csv"."""
        renderers = {"table": self.__str__, "markdown": self.to_markdown, "json": self.to_json, "csv": self.to_csv}
        if fmt not in renderers:
            raise ConvsepValueError(f"format {fmt!r} is not known: use one of {', '.join(map(repr, FORMATS))}")
        return renderers[fmt]()


_TOTALS_ALIGN = ("left", "right", "right", "right")
_CSV_TOTAL_FIELDS = (
    "params_before", "params_after", "macs_before", "macs_after", "flops_before", "flops_after",
    "latency_before_ms", "latency_after_ms",
)  # fmt: skip
