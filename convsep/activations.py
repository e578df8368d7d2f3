"""What a layer's inputs look like: the second moments the activation-aware conversion needs.

For each conv, one pass of the model over (some) calibration batches accumulates sums over x,
the patches the conv reads at each output position (with its own stride, padding, padding
mode and dilation), taken `block` input channels at a time: E[x_B x_B^T] for every block B of
channels, a (M/b, bK, bK) tensor per layer, and E[x]. With b = 1 these are the per-channel
K x K moments the whitened factorisation needs (factorize.py); the refit-aware allocation
(refit_error.py) needs the cross-channel terms, b = the channels of a group, or the largest
block that keeps the moments under _BLOCK_ELEMENTS numbers.

Cost. The sums cost M b K^2 multiply-adds per position against the conv's N M K / g, so only
every s-th position is used, s = ceil(c b K g / N): c = 4 for b = 1 keeps the pass near half
the conv's cost (a K x K moment needs few positions), c = 1 for blocks, about the conv's cost,
since a bK x bK moment needs many more. Each call starts one position further on, so that the
samples cover every position in turn. Under torchrun the sums are added over the processes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import distributed
from .batches import as_args, input_of, split_batch
from .devices import device_of, to_device
from .probe import cannot_run, eval_mode
from .standin import STANDARD_CONVS

# Patch elements handled at once, to bound memory on large activations (K times the input).
_CHUNK_ELEMENTS = 1 << 22
# Numbers converted to float64 at once when a chunk's sums are added: a fresh float64 copy of the whole sums (up to
# 170 MB) would be new memory each time, and touching new pages costs several times the addition itself.
_ADD_SLICE = 1 << 18
# Numbers kept per layer for the cross-channel moments (float64: 256 MiB): 4,608 x 4,608 for a
# 512-channel 3x3 conv fits whole, 1,024 channels of 64 taps go in blocks of 8 channels.
_BLOCK_ELEMENTS = 1 << 25


def patches(x: Tensor, conv: _ConvNd, every: int = 1, phase: int = 0) -> Tensor:
    """(batch, M*K, positions, possibly flattened): each input channel's receptive-field patch at each output position of `conv`
    (with `every` > 1, at every `every`-th position along the last dimension, from position `phase` on, modulo the row).

    A depthwise conv with one-hot filters and conv's stride, padding, padding mode and dilation
    extracts them in any number of dims (unfold exists for 2-d only).
    """
    channels, kernel = x.shape[1], math.prod(conv.kernel_size)
    if every > 1 and phase:
        phase %= _last_output_length(x, conv)
    if len(conv.kernel_size) == 2 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        # im2col's patches in its (channel, tap) order, but as a view of the padded input and one copy: 4-6x
        # faster than F.unfold on one thread here (which was chosen over the one-hot conv as the faster). From
        # output column `phase` on: the input columns before it are dropped after padding.
        (top, side), (kh, kw), (dh, dw) = conv.padding, conv.kernel_size, conv.dilation
        padded = (F.pad(x, (side, side, top, top)) if top or side else x)[..., phase * conv.stride[-1] :]
        rows = padded.unfold(2, (kh - 1) * dh + 1, conv.stride[0])
        windows = rows.unfold(3, (kw - 1) * dw + 1, conv.stride[1] * every)[..., ::dh, ::dw]  # (N, M, oh, ow, kh, kw)
        return windows.permute(0, 1, 4, 5, 2, 3).reshape(x.shape[0], channels * kernel, -1)
    if len(conv.kernel_size) == 1 and not isinstance(conv.padding, str):
        # 1-d: sliding windows are a view of the padded input; one copy puts taps before positions
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)[..., phase * conv.stride[0] :]
        (k,), (d,) = conv.kernel_size, conv.dilation
        windows = padded.unfold(2, (k - 1) * d + 1, conv.stride[0] * every)[..., ::d]  # (batch, M, positions, K)
        return windows.transpose(2, 3).reshape(x.shape[0], channels * kernel, -1)
    strided = not phase and not isinstance(conv.padding, str)  # the extractor can sample by its stride ('same' needs 1)
    stride = (*conv.stride[:-1], conv.stride[-1] * (every if strided else 1))
    extractor = STANDARD_CONVS[len(conv.kernel_size) - 1](  # the user's subclass may take other arguments
        channels, channels * kernel, conv.kernel_size, stride, conv.padding, conv.dilation,
        groups=channels, bias=False, padding_mode=conv.padding_mode, device="meta",
    )  # fmt: skip  (meta: only its settings are used, the filters are passed in)
    one_hot = torch.eye(kernel, dtype=x.dtype, device=x.device).repeat(channels, 1)
    extracted = extractor._conv_forward(x, one_hot.reshape(channels * kernel, 1, *conv.kernel_size), None)
    return extracted if strided or every == 1 else extracted[..., phase::every]


def _last_output_length(x: Tensor, conv: _ConvNd) -> int:
    """How many output positions `conv` has along the last dimension of input `x`."""
    if isinstance(conv.padding, str):  # "same" (stride 1) keeps the length; "valid" pads nothing
        length = x.shape[-1] if conv.padding == "same" else x.shape[-1] - conv.dilation[-1] * (conv.kernel_size[-1] - 1)
        return max(1, length)
    span = conv.dilation[-1] * (conv.kernel_size[-1] - 1) + 1
    return max(1, (x.shape[-1] + 2 * conv.padding[-1] - span) // conv.stride[-1] + 1)


def sampling_step(conv: _ConvNd, block: int = 1) -> int:
    """Every how many positions the statistics look: 1 unless the moments cost more than about the conv
    (see the module docstring). String paddings ('same') need stride 1 for the per-channel moments."""
    if block == 1 and isinstance(conv.padding, str):
        return 1
    per_position = (4 if block == 1 else 1) * block * math.prod(conv.kernel_size) * conv.groups
    return max(1, math.ceil(per_position / conv.out_channels))


def cross_channel_block(conv: _ConvNd) -> int:
    """Channels per block of the cross-channel moments: all of a group's, or the largest divisor that fits."""
    per_group, k = conv.in_channels // conv.groups, math.prod(conv.kernel_size)
    fits = max(1, _BLOCK_ELEMENTS // (conv.in_channels * k * k))
    return max(b for b in range(1, min(per_group, fits) + 1) if per_group % b == 0)


@dataclass
class InputMoments:
    """Sums over a conv's input patches, b channels at a time: x_B x_B^T per block, x, and how many positions.

    The sums are allocated with the first patches that reach them, not zero-filled up front: a layer's
    can be large (4,608^2 numbers for a 512-channel 3x3 conv) and a layer may never see data.
    """

    channels: int  # M
    kernel: int  # K, taps per channel
    block: int  # b, channels per block of the second moments
    device: Any = None
    second: Optional[Tensor] = None  # (M/b, bK, bK), float64, once patches arrived
    first: Optional[Tensor] = None  # (M*K,), float64
    count: int = 0
    calls: int = 0  # where the sampling phase is: the next sampled position is `calls` modulo the sampling step
    calls_step: int = 1  # how far `calls` moves per call: the number of processes, each starting at its rank
    pending: list = field(default_factory=list)  # sampled rows not yet in `second` (see _add_blocks)

    @classmethod
    def empty(cls, conv: _ConvNd, block: int, device) -> InputMoments:
        return cls(conv.in_channels, math.prod(conv.kernel_size), block, device)

    def sums(self) -> tuple[Tensor, Tensor]:
        """The float64 sums, zeros if no patch arrived (a process whose batches never reached the layer still adds
        its share under torchrun)."""
        if self.second is None:
            bk = self.block * self.kernel
            self.second = torch.zeros(self.channels // self.block, bk, bk, dtype=torch.float64, device=self.device)
            self.first = torch.zeros(self.channels * self.kernel, dtype=torch.float64, device=self.device)
        return self.second, self.first

    def _accumulate(self, second: Tensor, first: Tensor) -> None:
        """Add one chunk's sums (float32 products, or float64) to the float64 totals."""
        if self.second is None:  # the chunk's sums are a fresh tensor: they become the totals
            self.second, self.first = second.double(), first.double()
        else:
            for total, part in ((self.second.view(-1), second.reshape(-1)), (self.first, first)):
                for start in range(0, total.numel(), _ADD_SLICE):  # slices small enough to reuse freed memory
                    total[start : start + _ADD_SLICE] += part[start : start + _ADD_SLICE].double()

    def covariance(self) -> Optional[Tensor]:
        """E[x_B x_B^T] (M/b, bK, bK), or None when the data never reached the layer."""
        self.flush()
        return self.second / self.count if self.count else None

    def channel_covariance(self) -> Optional[Tensor]:
        """E[x_c x_c^T] per channel (M, K, K): the diagonal blocks; None when the data never reached the layer."""
        if self.block == 1:
            return self.covariance()
        rows = self.samples()
        if rows is not None:  # cheaper than summing the cross-channel products only to take their diagonal
            per_channel = rows.reshape(rows.shape[0], self.channels, self.kernel).transpose(0, 1).double()
            return per_channel.mT @ per_channel / self.count
        self.flush()
        if not self.count:
            return None
        blocks, b, k = self.second.shape[0], self.block, self.kernel
        diagonal = self.second.reshape(blocks, b, k, b, k).diagonal(dim1=1, dim2=3)  # (blocks, K, K, b)
        return diagonal.permute(0, 3, 1, 2).reshape(blocks * b, k, k) / self.count  # only the diagonal is divided

    def mean(self) -> Optional[Tensor]:
        rows = self.samples()
        if rows is not None:
            return rows.double().mean(dim=0)
        self.flush()
        return self.first / self.count if self.count else None

    def add(self, x: Tensor, conv: _ConvNd) -> None:
        if x.dim() == len(conv.kernel_size) + 1:  # an unbatched call
            x = x.unsqueeze(0)
        per_sample = x[:1].numel() * self.kernel
        step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
        every = sampling_step(conv, self.block)
        for start in range(0, x.shape[0], step):
            chunk = x[start : start + step].detach()
            # Products in float32 at least: half-precision sums round off more than the ridge adds.
            chunk = chunk if chunk.dtype == torch.float64 else chunk.float()
            # Each call starts one position further on, so sampled positions cover every column in turn.
            p = patches(chunk, conv, every, self.calls % every)
            self.calls += self.calls_step
            # float32 products over one chunk, accumulated over chunks and batches in float64 (as calibrate).
            if self.block == 1:
                self._add_channels(p)
            else:
                self._add_blocks(p)

    def _add_channels(self, p: Tensor) -> None:
        batch, m, k, positions = p.shape[0], self.channels, self.kernel, p[0, 0].numel()
        first = p.reshape(batch, m * k, -1).sum(dim=(0, 2))
        if k > positions:  # long kernels: one K x K product per sample would outweigh the patches
            p = p.reshape(batch, m, k, -1).permute(1, 2, 0, 3).reshape(m, k, -1)
            self._accumulate(torch.bmm(p, p.transpose(1, 2)), first)
        else:  # a view, (sample, channel) pairs: no copy of the patches
            p = p.reshape(batch * m, k, -1)
            self._accumulate(torch.bmm(p, p.transpose(1, 2)).reshape(batch, m, k, k).sum(0), first)
        self.count += batch * positions

    def _add_blocks(self, p: Tensor) -> None:
        rows = p.reshape(p.shape[0], p.shape[1], -1).transpose(1, 2).reshape(-1, p.shape[1])  # (positions, M*K)
        self.pending.append(rows)
        self.count += rows.shape[0]
        # A call may bring fewer rows than a block has columns (long kernels, few positions sampled): the
        # products would then cost less than adding their (bK)^2 sums, so rows wait until there are enough.
        if sum(r.shape[0] for r in self.pending) >= self.block * self.kernel:
            self.flush()

    def samples(self) -> Optional[Tensor]:
        """The sampled rows (n, M*K) when they were never summed (fewer than bK reached the layer), else None:
        refit_error.refit_errors_from_samples can then work from them, at a cost in n rather than (bK)^2."""
        if self.second is not None or not self.pending:
            return None
        if len(self.pending) > 1:
            self.pending[:] = [torch.cat(self.pending)]
        return self.pending[0]

    def flush(self) -> None:
        """Add the rows waiting in `pending` to the sums."""
        if not self.pending:
            return
        rows = torch.cat(self.pending)
        self.pending.clear()
        blocks = rows.reshape(rows.shape[0], self.channels // self.block, -1).transpose(0, 1)  # (M/b, n, bK)
        self._accumulate(torch.bmm(blocks.mT, blocks), rows.sum(dim=0))


def input_moments(model: nn.Module, convs: dict[str, _ConvNd], data: Iterable[Any], batches: Optional[int],
                  cross_channel: bool = False) -> dict[str, InputMoments]:  # fmt: skip
    """One pass of `model` (eval mode, no grad) over at most `batches` batches of `data`: each conv's input moments,
    per channel, or with `cross_channel` over blocks of channels (cross_channel_block).

    Collective under a process group: the sums are added over the processes.
    """
    device = device_of(model)
    moments = {
        name: InputMoments.empty(conv, cross_channel_block(conv) if cross_channel else 1, device)
        for name, conv in convs.items()
    }
    for m in moments.values():
        # Process r's k-th batch is batch r + k N of the whole data when batches are dealt round robin (the CLI
        # does): it then samples where one process would have, and the sums are the same.
        m.calls, m.calls_step = distributed.rank(), distributed.world_size()
    hooks = []
    for name, conv in convs.items():
        def keep(module, args, kwargs, name=name):
            moments[name].add(input_of(args, kwargs), module)

        hooks.append(conv.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with distributed.together(), eval_mode(model), torch.no_grad():
            for index, batch in enumerate(itertools.islice(data, batches), 1):
                inputs, _ = split_batch(batch, f"calibration batch {index}")
                args = as_args(to_device(inputs, device))
                try:
                    model(*args)
                except Exception as error:  # the user's model can reject inputs in any way
                    raise cannot_run(f"calibration batch {index}", "original model", args, error) from error
    finally:
        for handle in hooks:
            handle.remove()
    if distributed.active():
        _add_over_processes(list(moments.values()))
    return moments


def _add_over_processes(moments: list[InputMoments]) -> None:
    """Every process's sums added together; rows still apart everywhere (fewer than bK in all) are joined instead,
    so that refit_errors_from_samples sees them as one process would have (in another order)."""
    counts = torch.tensor([m.count for m in moments], dtype=torch.float64)
    summed = torch.tensor([m.second is not None for m in moments], dtype=torch.float64)
    distributed.all_sum([counts, summed])
    to_sum = []
    for m, count, anywhere in zip(moments, counts.tolist(), summed.tolist(), strict=True):
        if m.block > 1 and not anywhere and count < m.block * m.kernel:
            mine = m.samples()
            mine = torch.zeros(0, m.channels * m.kernel) if mine is None else mine
            m.pending[:] = [distributed.concatenate(mine.double().to(m.device))] if count else []
        else:
            m.flush()
            to_sum.append(m.sums())
        m.count = int(count)
    distributed.all_sum([second for second, _ in to_sum] + [first for _, first in to_sum])
