"""The conversion plan: what convert decided for every convolution it considered, and why.

The plan travels with the converted model (as `model.convsep_plan`) and with its
checkpoints (as JSON), so that a report can show skipped layers with their reasons
and a checkpoint can rebuild the converted architecture from the original one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import fx, nn

PLAN_ATTRIBUTE = "convsep_plan"
_FX_PRESERVED = "_user_preserved_attributes"  # torch.fx.graph_module: what GraphModule.__deepcopy__ sets again


@dataclass
class LayerDecision:
    name: str  # qualified name in the original model (for a functional conv: its weight's name)
    kind: str  # "Conv2d", "F.conv2d", or the class name of a subclass
    converted: bool
    reason: str = ""  # why it was not converted; empty when converted
    module: str = ""  # where the replacement lives in the converted model
    rank: Optional[int] = None
    full_rank: Optional[int] = None
    relative_error: Optional[float] = None  # ||W - W_r||_F / ||W||_F at conversion time
    predicted_output_error: Optional[float] = None  # from the input statistics: share of the output energy lost
    whitening: str = ""  # "activation", or why this layer kept the weight SVD (convert with calibration data)
    predicted_refit_error: Optional[float] = None  # from the input statistics: what calibration's refit should leave
    allocation: str = ""  # with allocate_by="activations": why this layer's ranks were weighed by weight error
    joint_fit: str = ""  # init="joint": "fitted on the input moments", or why this layer kept the weight SVD pair
    in_channels: int = 0
    out_channels: int = 0
    kernel_size: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    folded: str = ""  # what computed the weight (weight_norm, spectral_norm, ...), folded into the pair, not carried over


@dataclass
class ConversionPlan:
    rank: Any = 1
    init: str = "svd"
    path: str = "fx"  # how convs were found: "fx", "fx+module-tree", "module-tree"
    untraceable: dict[str, str] = field(default_factory=dict)  # module -> why fx could not trace it
    layers: list[LayerDecision] = field(default_factory=list)
    version: str = ""
    budget: Optional[dict[str, Any]] = None  # convert(budget=...): the share asked for and reached, the objective
    calibration: Optional[dict[str, Any]] = None  # calibrate(): data used, settings, per-layer output errors
    parametrized: str = "fold"  # convert(parametrized=...): fold computed weights into pairs, or keep such convs
    activations: Optional[dict[str, Any]] = None  # the input statistics pass: ridge, positions seen
    finetune: Optional[dict[str, Any]] = None  # finetune(): its history (per evaluation) and the best step

    @property
    def converted(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [layer for layer in self.layers if not layer.converted]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConversionPlan":
        known = {f.name for f in dataclasses.fields(LayerDecision)}
        layers = [
            LayerDecision(**{k: (tuple(v) if k == "kernel_size" else v) for k, v in layer.items() if k in known})
            for layer in data.get("layers", [])
        ]
        fields = {f.name for f in dataclasses.fields(cls)} - {"layers"}
        return cls(layers=layers, **{k: v for k, v in data.items() if k in fields})

    @classmethod
    def from_json(cls, text: str) -> "ConversionPlan":
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        converted = len(self.converted)
        lines = [f"converted {converted} of {len(self.layers)} convolutions (path: {self.path})"]
        if self.budget:
            what = "MACs" if self.budget["on"] == "macs" else "params"
            lines.append(f"  budget {self.budget['fraction']:g} of {what}: the model keeps {self.budget['reached']:.1%}")
        folded = [f"{layer.name} ({layer.folded})" for layer in self.converted if layer.folded]
        if folded:
            lines.append(f"  folded into their pairs, not carried over: {', '.join(folded)}")
        for layer in self.skipped:
            lines.append(f"  kept {layer.name}: {layer.reason}")
        for name, why in self.untraceable.items():
            lines.append(f"  fx could not trace {name}: {why}")
        return "\n".join(lines)


def attach_plan(model: nn.Module, plan: ConversionPlan) -> None:
    """model.convsep_plan = plan; for an fx GraphModule also in the attributes its deepcopy keeps (it rebuilds the
    module from its graph and would drop the plan: copy.deepcopy(converted) could then not be calibrated or saved)."""
    setattr(model, PLAN_ATTRIBUTE, plan)
    if isinstance(model, fx.GraphModule):
        model.meta.setdefault(_FX_PRESERVED, {})[PLAN_ATTRIBUTE] = plan


def plan_of(model: nn.Module) -> Optional[ConversionPlan]:
    """The plan attached to a converted model, or None for a model convsep has not touched."""
    return getattr(model, PLAN_ATTRIBUTE, None)
