"""Many processes (torchrun): sum what the ranks measured, agree on one answer, fail together.

Users scale out with `torchrun`: every process runs the same code on its own shard of the data.
convsep's data-driven calls follow the usual data-parallel pattern: each rank accumulates its
sufficient statistics, the sums are all-reduced before anything is solved, and rank 0's result
is broadcast so that every rank ends with the same weights, bit for bit. Outside an initialised
process group, or with one process, every function here returns at once and changes nothing.

Two rules keep a job of many processes from hanging:
- every rank reaches the same collectives in the same order, so work that may fail on one rank
  only (user data, user models, files) runs inside `together()`, which tells every rank whether
  any of them failed before the next collective, and raises the same error everywhere;
- before the first collective on data, ranks compare a fingerprint of what they were given
  (`same_everywhere`), so processes handed different models fail with a message, not a deadlock.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import errors
from .errors import ConvsepError, ConvsepValueError, first_line

# Set on an exception that every rank raises together, so that only rank 0 reports it.
SHARED = "_convsep_raised_on_every_rank"


def active() -> bool:
    """Whether this process is one of several in an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that prints and writes files."""
    return rank() == 0


def _device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo (and MPI) move CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over the ranks, in place: one collective for all of them."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).to(_device())
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()


def concatenate(tensor: Tensor) -> Tensor:
    """Every rank's tensor joined along dim 0, in rank order, on every rank (the other dims and the dtype must
    agree; the first may differ)."""
    if not active():
        return tensor
    device = _device()
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    padded = torch.zeros(max(lengths), *tensor.shape[1:], dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return torch.cat([part[:length] for part, length in zip(parts, lengths, strict=True)]).to(tensor.device)


def global_min(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def everywhere(flag: bool) -> bool:
    """Whether `flag` holds on every rank."""
    return global_min(int(flag)) == 1


def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite the tensors of every rank with rank `src`'s (parameters, buffers), bit for bit."""
    if not active():
        return
    tensors = [t for t in tensors if t.numel()]
    with torch.no_grad():
        # One collective per dtype (a flat buffer keeps every bit), in an order every process agrees on.
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(_device())
            dist.broadcast(flat, src)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
                offset += t.numel()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    broadcast_tensors(list(module.parameters()) + list(module.buffers()), src)


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s value (any picklable object) on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src, device=_device())
    return box[0]


def first_given(value: Any) -> Any:
    """The value of the lowest rank whose value is not None (None if no rank has one)."""
    return next((v for v in gather(value) if v is not None), None)


def gather(value: Any) -> list[Any]:
    """Every rank's value (any picklable object), in rank order, on every rank; [value] outside a group."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def same_everywhere(fingerprint: str, what: str) -> None:
    """Raise on every rank unless all ranks hold the same `fingerprint` of `what`."""
    if not active():
        return
    values = [None] * world_size()
    dist.all_gather_object(values, fingerprint)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        error = ConvsepValueError(
            f"the processes were given different {what}: rank(s) {', '.join(map(str, differ))} differ from rank 0. "
            "Every process must load the same model (and conversion plan); only the data is sharded"
        )
        setattr(error, SHARED, True)
        raise error


def fingerprint(*models: Optional[nn.Module], extra: str = "") -> str:
    """A digest of the models' parameter and buffer names, shapes and dtypes (not values), and `extra`."""
    digest = hashlib.sha256(extra.encode())
    for model in models:
        if model is None:
            continue
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Run the block on every rank; if it raised on any rank, raise on every rank.

    The rank that failed raises its own exception; the others raise one of the same convsep
    class (else ConvsepError) whose message names the rank and repeats its message. Costs one
    small all-reduce when nothing failed. Outside a process group it is a plain block.
    """
    if not active():
        yield
        return
    error: Optional[BaseException] = None
    try:
        yield
    except Exception as raised:  # anything: the other ranks must hear of it, or they wait forever
        if getattr(raised, SHARED, False):  # an inner block already told every rank
            raise
        error = raised
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=_device())
    dist.all_reduce(flag)
    if not int(flag.item()):
        return
    reports = [None] * world_size()
    dist.all_gather_object(reports, None if error is None else (type(error).__name__, first_line(error)))
    if error is not None:
        setattr(error, SHARED, True)
        raise error
    failed, (kind, message) = next((r, report) for r, report in enumerate(reports) if report is not None)
    kind = getattr(errors, kind, None)
    if not (isinstance(kind, type) and issubclass(kind, ConvsepError)):
        kind = ConvsepError
    shared = kind(f"rank {failed}: {message}")
    setattr(shared, SHARED, True)
    raise shared


def shard(batches: Iterable[Any], limit: Optional[int] = None) -> Iterable[Any]:
    """This rank's batches among the first `limit` (all if None): batch i goes to rank i mod world size.

    Outside a group, the first `limit` batches. The limit counts batches over all ranks, so that
    `--calibration-batches N` means N batches in all however many processes there are.
    """
    if not active():
        return batches if limit is None else _Shard(batches, 0, 1, limit)
    return _Shard(batches, rank(), world_size(), limit)


class _Shard:
    """Every `step`-th batch of `batches` from `start`, re-iterable, with len() when `batches` has one.

    Sources that can read one batch alone (an image folder, a list) are indexed, so a rank
    never decodes the batches of the others.
    """

    def __init__(self, batches: Iterable[Any], start: int, step: int, limit: Optional[int] = None) -> None:
        self.batches, self.start, self.step, self.limit = batches, start, step, limit

    def _stop(self) -> int:
        count = len(self.batches)  # type: ignore[arg-type]
        return count if self.limit is None else min(count, self.limit)

    def __len__(self) -> int:
        return max(0, -(-(self._stop() - self.start) // self.step))

    def __iter__(self) -> Iterator[Any]:
        if hasattr(self.batches, "__getitem__") and hasattr(self.batches, "__len__"):
            for index in range(self.start, self._stop(), self.step):
                yield self.batches[index]
            return
        for index, batch in enumerate(itertools.islice(self.batches, self.limit)):
            if index % self.step == self.start:
                yield batch


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment() -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join the process group it describes.

    NCCL with this process's LOCAL_RANK GPU when CUDA is available, gloo on CPUs. Returns whether
    this call started a group (the caller then ends it with `shutdown()`).
    """
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def local_device() -> Optional[torch.device]:
    """The GPU of this process under torchrun with CUDA (LOCAL_RANK), else None (the model's device)."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def shutdown() -> None:
    """Leave the process group together: a process that tears it down while another still talks aborts."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
