"""convsep rewrites a model's Python module tree, so it needs the eager nn.Module.

A TorchScript module (`torch.jit.script` / `torch.jit.trace`) is an nn.Module whose code
is compiled: fx cannot trace it and its submodules cannot be swapped, so without this
check it came back unchanged with "converted 0 of 0 convolutions". A `torch.export`
ExportedProgram is not a module at all, and its `.module()` is a graph of aten ops that
holds no conv modules to replace. Each gets one error saying how to get the eager model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .errors import ConvsepTypeError

_EAGER = "convsep needs the eager nn.Module: build the model in Python and load these weights into it"


def require_eager(model: Any, what: str = "model") -> nn.Module:
    """`model` itself if it is an eager nn.Module; else a ConvsepTypeError naming what it is and what to do."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ConvsepTypeError(
            f"{what} is a TorchScript module ({type(model).__name__}, from torch.jit.script / torch.jit.trace / "
            f"torch.jit.load): {_EAGER} (model.load_state_dict(scripted.state_dict()))"
        )
    if isinstance(model, torch.export.ExportedProgram):
        raise ConvsepTypeError(
            f"{what} is a torch.export ExportedProgram: {_EAGER} (model.load_state_dict(exported.state_dict)), "
            "convert it, then export the result; exported.module() will not do, it holds aten ops, not conv modules"
        )
    if isinstance(model, fx.GraphModule) and any(_is_aten_conv(node) for node in model.graph.nodes):
        raise ConvsepTypeError(
            f"{what} is a graph of aten ops (ExportedProgram.module() or an aot graph), with no conv modules to "
            f"replace: {_EAGER} (model.load_state_dict(graph.state_dict())), convert it, then export the result"
        )
    if not isinstance(model, nn.Module):
        raise ConvsepTypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _is_aten_conv(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith("aten.conv")
