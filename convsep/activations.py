"""What a layer's inputs look like: the second moments the activation-aware factorisation needs.

For each conv, one pass of the model over (some) calibration batches accumulates, per input
channel c, Sigma_c = E[x_c x_c^T] over every output position, x_c the K-vector patch of channel
c that the conv reads there (with its own stride, padding, padding mode and dilation): a
(M, K, K) tensor per layer. Extracting the patches and summing their products costs about
2 M K^2 multiply-adds per position against the conv's N M K / g, so for long kernels with few
outputs per group (a 64-tap 1-d conv with 64 outputs per group) it would cost more than the
conv: positions are then sampled, every s-th along the last dimension with s = ceil(4 K g / N),
which keeps the pass near half the conv's cost; a K x K covariance needs far fewer positions
than such layers have. Under torchrun the sums are added over the processes. See factorize.py for how
the factorisation uses them, and why cross-channel terms are left out.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import distributed
from .batches import as_args, split_batch
from .devices import device_of, to_device
from .probe import cannot_run, eval_mode
from .standin import STANDARD_CONVS

# Patch elements handled at once, to bound memory on large activations (K times the input).
_CHUNK_ELEMENTS = 1 << 22


def patches(x: Tensor, conv: _ConvNd, every: int = 1) -> Tensor:
    """(batch, M*K, positions, possibly flattened): each input channel's receptive-field patch at each output position of `conv`
    (with `every` > 1, at every `every`-th position along the last dimension).

    A depthwise conv with one-hot filters and conv's stride, padding, padding mode and dilation
    extracts them in any number of dims (unfold exists for 2-d only).
    """
    channels, kernel = x.shape[1], math.prod(conv.kernel_size)
    stride = (*conv.stride[:-1], conv.stride[-1] * every)
    if len(conv.kernel_size) == 2 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        # im2col: the same patches in the same (channel, tap) order, faster than the one-hot conv
        return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, stride)
    if len(conv.kernel_size) == 1 and not isinstance(conv.padding, str):
        # 1-d: sliding windows are a view of the padded input; one copy puts taps before positions
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        (k,), (d,) = conv.kernel_size, conv.dilation
        windows = padded.unfold(2, (k - 1) * d + 1, stride[0])[..., ::d]  # (batch, M, positions, K)
        return windows.transpose(2, 3).reshape(x.shape[0], channels * kernel, -1)
    extractor = STANDARD_CONVS[len(conv.kernel_size) - 1](  # the user's subclass may take other arguments
        channels, channels * kernel, conv.kernel_size, stride, conv.padding, conv.dilation,
        groups=channels, bias=False, padding_mode=conv.padding_mode, device="meta",
    )  # fmt: skip  (meta: only its settings are used, the filters are passed in)
    one_hot = torch.eye(kernel, dtype=x.dtype, device=x.device).repeat(channels, 1)
    return extractor._conv_forward(x, one_hot.reshape(channels * kernel, 1, *conv.kernel_size), None)


def sampling_step(conv: _ConvNd) -> int:
    """Every how many positions (along the last dim) the statistics look: 1 unless the kernel is long
    against the outputs per group (see the module docstring). String paddings ('same') need stride 1."""
    if isinstance(conv.padding, str):
        return 1
    return max(1, math.ceil(4 * math.prod(conv.kernel_size) * conv.groups / conv.out_channels))


@dataclass
class InputMoments:
    """Sums over a conv's input patches: sum x_c x_c^T per channel, and how many positions."""

    second: Tensor  # (M, K, K), float64
    count: int = 0

    def covariance(self) -> Optional[Tensor]:
        """E[x_c x_c^T], or None when the data never reached the layer."""
        return self.second / self.count if self.count else None

    def add(self, x: Tensor, conv: _ConvNd) -> None:
        if x.dim() == len(conv.kernel_size) + 1:  # an unbatched call
            x = x.unsqueeze(0)
        per_sample = x[:1].numel() * math.prod(conv.kernel_size)
        step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
        every = sampling_step(conv)
        for start in range(0, x.shape[0], step):
            chunk = x[start : start + step].detach()
            # Products in float32 at least: half-precision sums round off more than the ridge adds.
            p = patches(chunk if chunk.dtype == torch.float64 else chunk.float(), conv, every)
            batch, (m, k), positions = p.shape[0], self.second.shape[:2], p[0, 0].numel()
            # float32 products over one chunk, accumulated over chunks and batches in float64 (as calibrate).
            if k > positions:  # long kernels: one K x K product per sample would outweigh the patches
                p = p.reshape(batch, m, k, -1).permute(1, 2, 0, 3).reshape(m, k, -1)
                self.second += torch.bmm(p, p.transpose(1, 2)).double()
            else:  # a view, (sample, channel) pairs: no copy of the patches
                p = p.reshape(batch * m, k, -1)
                self.second += torch.bmm(p, p.transpose(1, 2)).reshape(batch, m, k, k).sum(0).double()
            self.count += batch * positions


def input_moments(model: nn.Module, convs: dict[str, _ConvNd], data: Iterable[Any], batches: Optional[int]) -> dict[str, InputMoments]:
    """One pass of `model` (eval mode, no grad) over at most `batches` batches of `data`: each conv's input moments.

    Collective under a process group: the sums are added over the processes.
    """
    device = device_of(model)
    moments = {
        name: InputMoments(torch.zeros(conv.in_channels, math.prod(conv.kernel_size), math.prod(conv.kernel_size),
                                       dtype=torch.float64, device=device))
        for name, conv in convs.items()
    }  # fmt: skip
    hooks = []
    for name, conv in convs.items():
        def keep(module, args, name=name):
            moments[name].add(args[0], module)

        hooks.append(conv.register_forward_pre_hook(keep))
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
        counts = torch.tensor([m.count for m in moments.values()], dtype=torch.float64)
        distributed.all_sum([m.second for m in moments.values()] + [counts])
        for m, count in zip(moments.values(), counts.tolist()):
            m.count = int(count)
    return moments
