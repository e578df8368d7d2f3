"""Tracing what fx can trace, and finding the functional convolutions in it.

Module convolutions are found in the module tree; fx is needed for the ones called as
functions (`F.conv2d(x, self.weight)`), which only a graph shows. A model fx cannot
trace whole is traced piece by piece: a submodule whose forward breaks tracing
becomes a leaf (with every module of its class), and when the root itself breaks,
its children are traced one by one. Each functional conv is rewritten in the
smallest module that calls it, so the rest of the model keeps its own classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from .errors import error_summary
from .layers import _SeparableConvNd

log = logging.getLogger(__name__)

FUNCTIONAL_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}  # F.convNd is torch.convNd
CONV_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_MAX_LEAF_RETRIES = 64


class _LeafTracer(fx.Tracer):
    """fx's tracer, with convolutions, our own layers and the given classes kept as leaves."""

    def __init__(self, leaf_types: set[type]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, (_ConvNd, _SeparableConvNd))
            or type(m) in self.leaf_types
            or super().is_leaf_module(m, module_qualified_name)
        )


def trace(module: nn.Module, leaf_types: set[type], untraceable: dict[str, str]) -> fx.Graph:
    """Trace `module`, turning submodules that break tracing into leaves; raise if its own forward breaks it."""
    for _ in range(_MAX_LEAF_RETRIES):
        tracer = _LeafTracer(leaf_types)
        try:
            return tracer.trace(module)
        except Exception as error:  # fx raises many kinds: TraceError, TypeError, RuntimeError, ...
            # fx leaves the stack of modules it was inside when the error came: the last is the culprit.
            stack = list(tracer.module_stack.values())
            if not stack or not stack[-1][0] or stack[-1][1] in leaf_types:
                raise
            culprit, culprit_type = stack[-1]
            untraceable[culprit] = error_summary(error)
            leaf_types.add(culprit_type)
    raise RuntimeError(f"gave up tracing after {_MAX_LEAF_RETRIES} untraceable submodules")


@dataclass
class FunctionalConv:
    """A call to F.conv1d/2d/3d found in a graph."""

    owner: str  # qualified name of the module whose graph holds the call (rewritten there)
    node: fx.Node
    dims: int
    args: dict  # the call's arguments by name
    weight_target: Optional[str]  # get_attr target of the weight, relative to owner; None if computed
    bias_target: Optional[str]


@dataclass
class Discovery:
    graphs: dict[str, fx.Graph] = field(default_factory=dict)  # owner -> its graph
    functional: list[FunctionalConv] = field(default_factory=list)
    untraceable: dict[str, str] = field(default_factory=dict)
    traced: list[str] = field(default_factory=list)  # modules fx traced ("" is the root)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _conv_args(node: fx.Node) -> dict:
    args = dict(zip(CONV_ARG_NAMES, node.args))
    args.update(node.kwargs)
    return args


def _is_functional_conv(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in FUNCTIONAL_CONV_DIMS


def _innermost_module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _attr_target(value) -> Optional[str]:
    return value.target if isinstance(value, fx.Node) and value.op == "get_attr" else None


def _functional_convs(owner: str, graph: fx.Graph) -> Iterator[FunctionalConv]:
    for node in graph.nodes:
        if _is_functional_conv(node):
            args = _conv_args(node)
            yield FunctionalConv(
                owner, node, FUNCTIONAL_CONV_DIMS[node.target], args,
                _attr_target(args.get("weight")), _attr_target(args.get("bias")),
            )  # fmt: skip


def discover(root: nn.Module) -> Discovery:
    """Trace what can be traced and collect the functional convolutions, each with the graph to rewrite it in."""
    found = Discovery()
    leaf_types: set[type] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        bad: dict[str, str] = {}
        try:
            graph = trace(module, leaf_types, bad)
        except Exception as error:
            found.untraceable[prefix or "<root>"] = error_summary(error)
            log.info("fx cannot trace %s (%s); tracing its children", prefix or "the model", error_summary(error))
            for name, child in module.named_children():
                if not isinstance(child, (_ConvNd, _SeparableConvNd)):
                    visit(_join(prefix, name), child)
            return
        found.traced.append(prefix)
        found.untraceable.update({_join(prefix, k): v for k, v in bad.items()})
        owners = {_innermost_module(n) for n in graph.nodes if _is_functional_conv(n)}
        for owner in sorted(owners):
            # Rewrite in the smallest module that makes the call, if it traces alone; else where it traced.
            owner_graph = graph
            if owner:
                try:
                    owner_graph = trace(module.get_submodule(owner), leaf_types, {})
                except Exception:
                    owner = ""
            full_owner = _join(prefix, owner)
            if full_owner in found.graphs:
                continue
            found.graphs[full_owner] = owner_graph
            found.functional.extend(_functional_convs(full_owner, owner_graph))
        # The submodules that became leaves may hold traceable parts with functional convs of their own.
        for node in graph.nodes:
            if node.op == "call_module":
                sub = module.get_submodule(node.target)
                if type(sub) in leaf_types:
                    for name, child in sub.named_children():
                        if not isinstance(child, (_ConvNd, _SeparableConvNd)):
                            visit(_join(_join(prefix, node.target), name), child)

    if not isinstance(root, (_ConvNd, _SeparableConvNd)):  # a conv's own F.conv call is the conv, not a functional conv
        visit("", root)
    return found


def rewrite(owner: nn.Module, graph: fx.Graph, replacements: dict[fx.Node, tuple[str, nn.Module]]) -> fx.GraphModule:
    """A GraphModule of `owner` in which each given conv call runs the module given for it instead.

    Parameters that no longer feed the graph are dropped, so the state_dict holds
    only what the converted model uses.
    """
    gm = fx.GraphModule(owner, graph, class_name=type(owner).__name__)
    for node, (target, module) in replacements.items():
        gm.add_submodule(target, module)
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(target, (_conv_args(node)["input"],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)):
        if name not in used and not _inside_submodule_used(gm, name):
            parent, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(parent), attr)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _inside_submodule_used(gm: fx.GraphModule, param_name: str) -> bool:
    """Whether a parameter belongs to a module that the graph calls (and so must stay)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    parts = param_name.split(".")
    return any(".".join(parts[:i]) in called for i in range(1, len(parts)))


def parameter(module: nn.Module, target: Optional[str]) -> Optional[torch.nn.Parameter]:
    if target is None:
        return None
    try:
        value = module.get_parameter(target)
    except AttributeError:
        return None
    return value
