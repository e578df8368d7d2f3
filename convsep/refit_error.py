"""The output error a pair keeps after calibration refits its pointwise weights, predicted in closed form.

Calibration (calibrate.py) keeps each pair's depthwise filters and solves for the pointwise
weights that best reproduce the original layer's outputs. What that least squares leaves is
fixed by the inputs' covariance, not by the weights alone: with x the patches of all input
channels of a group (the conv computes y = W x), Sigma = E[x x^T], and D_r the block-diagonal
matrix of the first r depthwise filters of every channel (z = D_r x their outputs),

    min_P E||W x - P z||^2 = tr(W Sigma W^T) - tr(B_r^T (D_r Sigma D_r^T)^{-1} B_r),  B_r = D_r Sigma W^T.

The refit mixes channels, so the cross-channel terms of Sigma are what make rank 1 good or bad
(a layer whose channels carry the same information loses little at rank 1, whatever its weight
spectrum says). Divided by the output energy E||y||^2 the error compares across layers, which is
what the rank allocation needs (budget.py), and it is the relative error calibration measures.
When the pair has a bias the refit fits it too: Sigma is then centred, and the energy is
tr(W C W^T) + ||W E[x] + bias||^2. When a group's full covariance would be too large, it is taken block-diagonal over
blocks of `block` channels (activations.py chooses the block); the prediction is exact for
block = channels per group and on the original model's inputs (calibration sees the converted
model's, so errors from earlier layers add to what it measures).
"""

from __future__ import annotations

import torch
from torch import Tensor


def refit_errors(weight: Tensor, bias: Tensor | None, groups: int, depthwise: Tensor, second: Tensor, mean: Tensor,
                 ranks: int, ridge: float) -> list[float]:  # fmt: skip
    """Squared relative output error after the pointwise refit, at ranks 1..`ranks`.

    weight: the conv's kernel (N, M/g, *k). depthwise: (M, q, K), row j of channel c its j-th
    depthwise filter (nested: rank r keeps rows < r), q >= ranks. second: (M/b, bK, bK), the
    second moment E[x x^T] of the patches of each block of b channels (channel-major, then tap).
    mean: (M*K,) E[x]. bias: the conv's (N,), or None: then the pair has none and the refit cannot centre.
    ridge: relative to the mean diagonal of each block's system, so that channels the data
    never excites keep it solvable.
    """
    n, m_g = weight.shape[:2]
    k = depthwise.shape[-1]
    blocks, bk = second.shape[:2]
    b, out = bk // k, n // groups
    sigma = second.double()
    # W restricted to each block's channels and its group's outputs: (M/b, N/g, bK).
    w = weight.detach().double().reshape(groups, out, m_g // b, bk).transpose(1, 2).reshape(blocks, out, bk)
    offset = 0.0
    if bias is not None:  # the refit fits the mean: only the covariance is left to explain
        mu = mean.double().reshape(blocks, bk)
        sigma = sigma - mu.unsqueeze(2) * mu.unsqueeze(1)
        mean_output = (w @ mu.unsqueeze(-1)).reshape(groups, -1, out).sum(1).reshape(-1) + bias.detach().double()
        offset = float(mean_output.square().sum())
    sigma_w = sigma @ w.mT  # (M/b, bK, N/g): Sigma W^T
    energy = float((w.mT * sigma_w).sum()) + offset
    if energy <= 0:
        return [0.0] * ranks
    d = depthwise.double().reshape(blocks, b, -1, k)
    # D Sigma D^T (blocks, b, q, b, q) and B = D Sigma W^T (blocks, b, q, N/g), channel-major like z.
    s = sigma.reshape(blocks, b, k, b, k)
    gram = torch.einsum("ncik,nckdl,ndjl->ncidj", d, s, d)
    cross = torch.einsum("ncik,ncko->ncio", d, sigma_w.reshape(blocks, b, k, out))
    errors = []
    for r in range(1, ranks + 1):
        g = gram[:, :, :r, :, :r].reshape(blocks, b * r, b * r)
        scale = g.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-300)
        g = g + (ridge * scale)[:, None, None] * torch.eye(b * r, dtype=g.dtype, device=g.device)
        factor, info = torch.linalg.cholesky_ex(g)
        if bool(info.any()):  # not positive definite even with the ridge: an eigen solve does not care
            explained = (cross[:, :, :r].reshape(blocks, b * r, out).mT @ torch.linalg.pinv(g, hermitian=True)
                         @ cross[:, :, :r].reshape(blocks, b * r, out)).diagonal(dim1=1, dim2=2).sum()  # fmt: skip
        else:
            half = torch.linalg.solve_triangular(factor, cross[:, :, :r].reshape(blocks, b * r, out), upper=False)
            explained = half.square().sum()
        errors.append(min(1.0, max(0.0, 1.0 - (float(explained) + offset) / energy)))  # the bias fits the mean part
    return errors
