"""Checkpoints on disk: reading the ones users have, writing converted ones that load back.

A convsep checkpoint is the state_dict plus the conversion plan (as JSON, with the convsep
version) in one file, so that `load(path, model=factory())` can rebuild the converted
architecture from the original one and load the weights without unpickling any code:
- `.safetensors`: the tensors, with the plan in the header's metadata (needs the
  `safetensors` extra);
- anything else (`.pt`, `.pth`, ...): a plain dict saved with `torch.save` that loads with
  `weights_only=True`: {"convsep_format": 1, "convsep_version": ..., "plan": JSON or None,
  "input_shape": [...] (one per input for several) or None, "state_dict": {...}}.

Users' checkpoints come as a state_dict (`.pt`/`.pth`/`.bin`/`.safetensors`), a dict that
wraps one ({"state_dict": ...}, {"model": ...}, {"model_state_dict": ...}), or a whole
pickled `nn.Module`. Pickles run code when loaded, so a file that needs more than
`weights_only=True` is only opened with `trust_pickle=True`. The file's kind is told by its
first bytes, not by its name.

Writes are atomic: a temporary file in the destination's folder, then `os.replace`, so a
failed write leaves nothing behind and never a half-written checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .convert import rebuild
from .eager import require_eager
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConvsepTypeError,
    ConvsepValueError,
    OptionalDependencyError,
    error_summary,
    first_line,
)
from . import shapes
from .files import write_atomically
from .parametrized import deepcopy_model
from .plan import ConversionPlan, plan_of
from .shapes import InputShape
from .version import __version__

PathLike = Union[str, os.PathLike]

FORMAT_VERSION = 1
# Wrapper keys under which training scripts commonly store the weights, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# safetensors metadata keys (the header holds str -> str only).
_META_FORMAT, _META_VERSION, _META_PLAN, _META_SHAPE = (
    "convsep_format", "convsep_version", "convsep_plan", "convsep_input_shape",
)  # fmt: skip


@dataclass
class Checkpoint:
    """What a checkpoint file holds, read without building a model.

    state_dict: the weights (names as in the model that was saved; for a converted checkpoint,
        as in the converted model).
    plan: the conversion plan for a checkpoint written by convsep from a converted model (or a
        pickled converted module); None for a plain state_dict.
    module: the whole model when the file is a pickled nn.Module (read with trust_pickle=True);
        None otherwise.
    input_shape: the example input shape recorded at conversion time, if any: a tuple of ints, or
        one such tuple per input for a model with several inputs.
    kind: "convsep", "state_dict" or "module": what the file turned out to hold.
    version: the convsep version that wrote it ("" when convsep did not).
    """

    path: str
    state_dict: dict[str, torch.Tensor]
    plan: Optional[ConversionPlan] = None
    module: Optional[nn.Module] = None
    input_shape: Optional[InputShape] = None
    kind: str = "state_dict"
    version: str = ""

    @property
    def converted(self) -> bool:
        return self.plan is not None and bool(self.plan.converted)

    def build(self, model: nn.Module) -> nn.Module:
        """A copy of `model` (the original architecture) carrying these weights.

        With a plan, the copy is first rebuilt into the converted architecture the plan
        records. The weights are loaded strictly; `model` itself is not modified.
        """
        require_eager(model, "model (the original architecture)")
        target = rebuild(model, self.plan) if self.plan is not None else deepcopy_model(model)
        load_weights(target, self.state_dict, source=self.path)
        return target


def save(model: nn.Module, path: PathLike, *, input_shape: Optional[InputShape] = None) -> None:
    """Write `model`'s state_dict and its conversion plan (if any) to `path`, atomically.

    `.safetensors` puts the plan in the header's metadata (needs `pip install convsep[safetensors]`);
    any other name is a dict saved with torch.save that loads with weights_only=True.
    input_shape: an example input shape to record, so `convsep report` can use it later: a tuple
        of ints, or one per input for a model with several inputs.
    An existing file at `path` is replaced, as with torch.save.
    """
    if not isinstance(model, nn.Module):
        raise ConvsepTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    check_destination(path, overwrite=True)
    plan = plan_of(model)
    plan_json = plan.to_json() if plan is not None else None
    shape = shapes.normalise(input_shape)
    state_dict = model.state_dict()
    if is_safetensors_name(path):
        safetensors_torch = _safetensors()
        metadata = {_META_FORMAT: str(FORMAT_VERSION), _META_VERSION: __version__}
        if plan_json is not None:
            metadata[_META_PLAN] = plan_json
        if shape is not None:
            metadata[_META_SHAPE] = shapes.to_text(shape)
        tensors = _safetensors_ready(state_dict)
        write_atomically(path, lambda tmp: safetensors_torch.save_file(tensors, tmp, metadata=metadata))
    else:
        payload = {
            _META_FORMAT: FORMAT_VERSION,
            _META_VERSION: __version__,
            "plan": plan_json,
            "input_shape": shapes.to_record(shape),
            "state_dict": dict(state_dict),
        }
        write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load(
    path: PathLike, model: Optional[nn.Module] = None, *, trust_pickle: bool = False, map_location: Any = "cpu"
) -> Union[nn.Module, Checkpoint]:
    """Read a checkpoint; with `model`, return the model it describes, loaded and ready.

    With `model` (an instance of the original architecture, e.g. `factory()`): a copy of it,
    rebuilt into the converted architecture when the checkpoint holds a conversion plan, with
    the checkpoint's weights loaded strictly (a mismatch names the first differing keys).
    `model` itself is not modified. For a converted checkpoint, the result's outputs equal
    those of the model that was saved, bitwise.

    Without `model`: a `Checkpoint` with `.state_dict` (always), `.plan` (a ConversionPlan for
    a converted checkpoint, else None), `.module` (the nn.Module for a pickled whole model,
    else None), `.input_shape`, `.kind` and `.version`; `checkpoint.build(model)` later does
    what passing `model` here does.

    trust_pickle: allow files that need full unpickling (a whole pickled nn.Module, or a dict
        holding Python objects beside the weights). Unpickling runs code from the file: pass
        True only for files from a source you trust. Everything else loads with weights_only=True.
    """
    checkpoint = read(path, trust_pickle=trust_pickle, map_location=map_location)
    return checkpoint if model is None else checkpoint.build(model)


def read(path: PathLike, *, trust_pickle: bool = False, map_location: Any = "cpu") -> Checkpoint:
    """The `Checkpoint` in `path` (what `load(path)` returns)."""
    path = Path(path)
    shown = str(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{shown}: no such file")
    if path.is_dir():
        raise CheckpointNotFoundError(f"{shown} is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = path.stat().st_size
    except OSError as error:
        raise CheckpointError(f"{shown}: cannot read it ({error.strerror or error})") from None
    if size == 0:
        raise CheckpointError(f"{shown} is empty (0 bytes), not a checkpoint")
    kind = _sniff(head, size)
    if kind == "safetensors":
        return _read_safetensors(path, map_location)
    if kind == "torch":
        return _read_torch(path, trust_pickle, map_location)
    raise CheckpointError(
        f"{shown} is not a checkpoint: it is neither a torch.save file (.pt/.pth/.bin) nor a .safetensors file"
    )


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str = "the checkpoint") -> None:
    """Load `state_dict` into `model` strictly, with an error that names the first mismatching keys.

    Keys the model holds twice (a module shared under two names) may appear once in the file,
    as safetensors writes them.
    """
    expected = model.state_dict()
    state_dict = _fill_aliases(dict(state_dict), expected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} is {_shape(state_dict[k])} in the file but {_shape(expected[k])} in the model"
        for k in expected
        if k in state_dict and _is_tensor(state_dict[k]) and _is_tensor(expected[k]) and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if wrong_shape:
        problems.append(_first(wrong_shape, 3, sep="; "))
    if problems:
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " (keys start with 'module.': saved from DataParallel/DistributedDataParallel; save model.module instead)"
        raise CheckpointError(f"{source} does not fit the model ({type(model).__name__}): {'; '.join(problems)}{hint}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(f"{source} does not fit the model ({type(model).__name__}): {first_line(error)}") from None


def check_destination(
    path: PathLike, *, overwrite: bool, sources: Optional[dict[str, PathLike]] = None, what: str = "output"
) -> None:
    """Refuse a destination that is one of `sources` (role -> path: the files the command reads or also
    writes), exists without `overwrite`, or cannot be written; `what` names the destination in errors."""
    path = Path(path)
    shown = str(path)
    for role, source in (sources or {}).items():
        if _same_file(path, Path(source)):
            raise CheckpointError(f"the {what} {shown} is the {role} {source}: write the {what} to another file")
    if path.is_dir():
        raise CheckpointError(f"the output {shown} is a directory: name a file, like {path / 'model.pt'}")
    if path.exists() and not overwrite:
        raise CheckpointError(f"the output {shown} exists: pass --force (overwrite) to replace it, or choose another name")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot write {shown}: {str(folder)!r} is a file, not a folder")
    if not folder.is_dir():
        raise CheckpointError(f"cannot write {shown}: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {shown}: the folder {str(folder)!r} is not writable")
    if is_safetensors_name(path):
        _safetensors()


def is_safetensors_name(path: PathLike) -> bool:
    return Path(path).suffix.lower() == ".safetensors"


# --- reading -------------------------------------------------------------------------------


def _sniff(head: bytes, size: int) -> str:
    """"torch", "safetensors" or "unknown", from the first bytes of a file."""
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format (the default since torch 1.6)
        return "torch"
    # safetensors before pickles: a header of 1408 bytes starts b"\x80\x05", like a protocol-5 pickle.
    if len(head) >= 9:
        header_size = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{" and 8 + header_size <= size:  # safetensors: u64 header length, then JSON
            return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # legacy torch.save: a pickle
        return "torch"
    return "unknown"


def _read_torch(path: Path, trust_pickle: bool, map_location: Any) -> Checkpoint:
    shown = str(path)
    _refuse_compiled_archive(path)
    try:
        with open(path, "rb") as f:  # a file object: torch.load would go by a .safetensors name, not content
            content = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointError(f"{shown} is corrupt or not a checkpoint ({first_line(error)})") from None
        if not trust_pickle:
            found = re.search(r"GLOBAL (\S+)", str(error))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{shown} holds pickled Python objects{what}, and unpickling runs code from the file: "
                "pass --trust-pickle (trust_pickle=True) if you trust its source, or save a state_dict instead"
            ) from None
        content = _unpickle(path, map_location)
    except Exception as error:  # torch reports truncation and corruption with many exception types
        raise CheckpointError(f"{shown} is truncated or corrupt ({error_summary(error)})") from None
    return _interpret(content, shown)


def _refuse_compiled_archive(path: Path) -> None:
    """A TorchScript or torch.export archive is a zip like torch.save's, but holds code or a graph, not
    an nn.Module convsep can rewrite: say so, and how to get a state_dict, before torch.load fails obscurely."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # legacy torch.save pickles are not zips; corrupt zips get torch.load's own verdict
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        what, weights = "a TorchScript archive (torch.jit.save)", "torch.jit.load(path).state_dict()"
    elif any(n.endswith("/archive_format") or "/models/model.json" in n for n in names):
        what, weights = "a torch.export archive (torch.export.save)", "torch.export.load(path).state_dict"
    else:
        return
    raise CheckpointError(
        f"{path} is {what}: convsep needs the eager nn.Module; save its weights from Python "
        f"(torch.save({weights}, 'weights.pt')) and pass that file with --model naming the architecture"
    )


def _unpickle(path: Path, map_location: Any) -> Any:
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=False)
    except (ImportError, AttributeError) as error:
        raise CheckpointError(
            f"{path} holds a pickled object whose class cannot be found ({error_summary(error)}); "
            "make its module importable (run from its project folder), or save a state_dict and pass --model"
        ) from None
    except Exception as error:
        raise CheckpointError(f"{path} could not be unpickled ({error_summary(error)})") from None


def _interpret(content: Any, shown: str) -> Checkpoint:
    """Find the weights (and a plan) in what torch.load returned."""
    if isinstance(content, nn.Module):
        return Checkpoint(shown, content.state_dict(), plan=plan_of(content), module=content, kind="module")
    if not isinstance(content, dict):
        raise CheckpointError(f"{shown} holds a {type(content).__name__}, not a state_dict or a model")
    if _META_FORMAT in content:
        return _convsep_checkpoint(content, shown)
    if _is_state_dict(content):
        return Checkpoint(shown, dict(content))
    for key in WRAPPER_KEYS:
        inner = content.get(key)
        if isinstance(inner, nn.Module) or (isinstance(inner, dict) and _is_state_dict(inner) and inner):
            return _interpret(inner, shown)
    keys = ", ".join(map(repr, list(content)[:6])) + (", ..." if len(content) > 6 else "")
    raise CheckpointError(
        f"{shown} holds a dict ({keys}) that is not a state_dict and has no "
        f"{' / '.join(map(repr, WRAPPER_KEYS))} entry holding one"
    )


def _convsep_checkpoint(content: dict, shown: str) -> Checkpoint:
    state_dict = content.get("state_dict")
    if not isinstance(state_dict, dict) or not _is_state_dict(state_dict):
        raise CheckpointError(f"{shown} is a damaged convsep checkpoint: its 'state_dict' entry is not a state_dict")
    return Checkpoint(
        shown,
        dict(state_dict),
        plan=_parse_plan(content.get("plan"), shown),
        input_shape=_parse_shape(content.get("input_shape") or None, shapes.normalise, shown),
        kind="convsep",
        version=str(content.get(_META_VERSION, "")),
    )


def _read_safetensors(path: Path, map_location: Any) -> Checkpoint:
    shown = str(path)
    safetensors_torch = _safetensors()
    from safetensors import safe_open

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = safetensors_torch.load_file(str(path), device=device)
    except Exception as error:  # SafetensorError: truncated or malformed header
        raise CheckpointError(f"{shown} is a truncated or corrupt safetensors file ({first_line(error)})") from None
    if _META_FORMAT not in metadata:
        return Checkpoint(shown, tensors)
    input_shape = _parse_shape(metadata.get(_META_SHAPE) or None, shapes.from_text, shown)
    return Checkpoint(
        shown,
        tensors,
        plan=_parse_plan(metadata.get(_META_PLAN), shown),
        input_shape=input_shape,
        kind="convsep",
        version=metadata.get(_META_VERSION, ""),
    )


def _parse_shape(recorded: Any, parse, shown: str) -> Optional[InputShape]:
    if recorded is None:
        return None
    try:
        return parse(recorded)
    except ConvsepValueError:
        raise CheckpointError(f"{shown} is a damaged convsep checkpoint: its input shape is {recorded!r}") from None


def _parse_plan(text: Optional[str], shown: str) -> Optional[ConversionPlan]:
    if text is None:
        return None
    try:
        return ConversionPlan.from_json(text)
    except (ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{shown} is a damaged convsep checkpoint: its conversion plan does not parse ({error})") from None


def _is_state_dict(content: dict) -> bool:
    """Tensors under str keys (state_dicts may also hold `_extra_state` objects)."""
    return all(isinstance(k, str) and (_is_tensor(v) or k.endswith("_extra_state")) for k, v in content.items())


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _fill_aliases(state_dict: dict, expected: dict) -> dict:
    """Fill keys the file lacks from keys naming the same tensor in the model (a shared module's second name)."""
    names_of: dict[tuple, list[str]] = {}
    for name, tensor in expected.items():
        if _is_tensor(tensor):
            names_of.setdefault(_identity(tensor), []).append(name)
    for names in names_of.values():
        present = [n for n in names if n in state_dict]
        for name in names if present else ():
            state_dict.setdefault(name, state_dict[present[0]])
    return state_dict


def _identity(tensor: torch.Tensor) -> tuple:
    """Tensors with the same identity are the same values under two names."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


# --- writing -------------------------------------------------------------------------------


def _safetensors():
    """safetensors.torch, or a clear error naming the extra to install."""
    try:
        import safetensors.torch
    except ImportError:
        raise OptionalDependencyError(
            "reading or writing .safetensors needs the safetensors package: pip install convsep[safetensors]"
        ) from None
    return safetensors.torch


def _safetensors_ready(state_dict: dict) -> dict[str, torch.Tensor]:
    """Tensors safetensors accepts: each stored once, contiguous, no two sharing memory."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    storages: set[int] = set()
    for name, value in state_dict.items():
        if not _is_tensor(value):
            raise CheckpointError(f"{name} is a {type(value).__name__}, which .safetensors cannot hold: save as .pt instead")
        identity = _identity(value)
        if identity in seen:  # the same tensor under a second name: load_weights fills it back in
            continue
        seen.add(identity)
        storage = value.untyped_storage().data_ptr()
        shares = storage in storages and value.numel() > 0
        storages.add(storage)
        value = value.detach()
        tensors[name] = value.clone() if shares else value.contiguous()
    return tensors


# --- small helpers -------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _first(items: list[str], n: int = 5, sep: str = ", ") -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return sep.join(items[:n]) + more

