"""The output error a pair keeps after calibration refits its pointwise weights, predicted in closed form.

Calibration (calibrate.py, least_squares.py) keeps each pair's depthwise filters and solves for the pointwise
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

Deep layers see few positions: a 512-channel 3x3 conv of ResNet-18 on 64x64 images, a few hundred sampled
rows against 4,096 unknowns at rank 8. Sigma then has rank n at most, and refit_errors_from_samples gives the
same numbers from an n-square system per rank instead of the (rank x channels)-square one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def predicted_refit_errors(weight: Tensor, bias: Tensor | None, groups: int, depthwise: Tensor, moments,
                           ranks: int, ridge: float) -> list[float]:  # fmt: skip
    """refit_errors for a layer whose inputs are `moments` (activations.InputMoments, cross-channel): from its
    sampled rows while they are still apart and that is cheaper (use_samples), else from their moments."""
    rows, kernel = moments.samples(), depthwise.shape[-1]
    if rows is not None and use_samples(rows.shape[0], moments.block, kernel, weight.shape[0] // groups, ranks):
        return refit_errors_from_samples(weight, bias, groups, depthwise, rows, moments.block, ranks, ridge)
    return refit_errors(weight, bias, groups, depthwise, moments.covariance(), moments.mean(), ranks, ridge)


def refit_errors(weight: Tensor, bias: Tensor | None, groups: int, depthwise: Tensor, second: Tensor, mean: Tensor,
                 ranks: int, ridge: float) -> list[float]:  # fmt: skip
    """Squared relative output error after the pointwise refit, at ranks 1..`ranks`.

    weight: the conv's kernel (N, M/g, *k). depthwise: (M, q, K), row j of channel c its j-th
    depthwise filter (nested: rank r keeps rows < r), q >= ranks. second: (M/b, bK, bK), the
    second moment E[x x^T] of the patches of each block of b channels (channel-major, then tap).
    mean: (M*K,) E[x]. bias: the conv's (N,), or None: then the pair has none and the refit cannot centre.
    ridge: relative to the mean diagonal of each block's system at the full rank q (every filter
    of `depthwise`), so that channels the data never excites keep it solvable; the ranks asked
    for do not change it, so asking only for the ranks a budget can use changes nothing else.
    """
    k = depthwise.shape[-1]
    blocks, bk = second.shape[:2]
    b, out = bk // k, weight.shape[0] // groups
    sigma = second.double()
    w = _weight_by_block(weight, groups, blocks, bk)
    offset = 0.0
    if bias is not None:  # the refit fits the mean: only the covariance is left to explain
        mu = mean.double().reshape(blocks, bk)
        sigma = torch.baddbmm(sigma, mu.unsqueeze(2), mu.unsqueeze(1), alpha=-1)  # one pass over the (bK)^2 numbers
        offset = _mean_output_energy(w, mu, bias, groups)
    sigma_w = sigma @ w.mT  # (M/b, bK, N/g): Sigma W^T
    energy = float((w.mT * sigma_w).sum()) + offset
    if energy <= 0:
        return [0.0] * ranks
    every = depthwise.double().reshape(blocks, b, -1, k)  # (M/b, b, q, K)
    d = every[:, :, :ranks]
    # z ordered rank-major, (filter j, channel c): rank r keeps a prefix of z, so one Cholesky factor of the
    # largest system serves every rank (a leading block of L factors the leading block of the system) and
    # the triangular solve's first r*b rows are rank r's. D Sigma D^T: (blocks, R b, R b); B: (blocks, R b, N/g).
    # D is block-diagonal (channel c's filters see only its taps), so both sides are batched products per channel:
    # D Sigma is (blocks, c, i, (d, l)), then (D Sigma) D^T contracts l with channel d's filters j.
    left = (d @ sigma.reshape(blocks, b, k, bk)).reshape(blocks, b * ranks, b, k).transpose(1, 2)  # (n, d, (c, i), l)
    gram = (left @ d.mT).reshape(blocks, b, b, ranks, ranks).permute(0, 3, 2, 4, 1).reshape(blocks, *[ranks * b] * 2)
    cross = (d @ sigma_w.reshape(blocks, b, k, out)).transpose(1, 2).reshape(blocks, ranks * b, out)
    # The system's diagonal at full rank, filter by filter: d_cj Sigma_cc d_cj^T, from the channels' own blocks.
    own = sigma.reshape(blocks, b, k, b, k).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (M/b, b, K, K)
    scale = ((every @ own) * every).sum(-1).mean(dim=(1, 2)).clamp_min(1e-300)
    gram.diagonal(dim1=1, dim2=2).add_((ridge * scale)[:, None])  # gram is a fresh tensor: the ridge in place
    factor, info = torch.linalg.cholesky_ex(gram)
    # Not positive definite, or so nearly singular that the factor amplifies rounding (ridge=0 on degenerate inputs).
    degenerate = bool(info.any()) or bool((factor.diagonal(dim1=1, dim2=2).square() < 1e-10 * scale[:, None]).any())
    if degenerate:  # rank by rank, with a pseudo-inverse
        explained = []
        for r in range(1, ranks + 1):
            g, c = gram[:, : r * b, : r * b], cross[:, : r * b]
            explained.append(float((c * (torch.linalg.pinv(g, hermitian=True) @ c)).sum()))
    else:
        half = torch.linalg.solve_triangular(factor, cross, upper=False)  # (blocks, R b, N/g)
        explained = half.square().reshape(blocks, ranks, b, out).sum(dim=(0, 2, 3)).cumsum(0).tolist()
    return _shares_lost(explained, offset, energy)


def refit_errors_from_samples(weight: Tensor, bias: Tensor | None, groups: int, depthwise: Tensor, rows: Tensor,
                              block: int, ranks: int, ridge: float) -> list[float]:  # fmt: skip
    """refit_errors from the sampled patches themselves, rows (n, M*K), when there are fewer of them than the system
    has unknowns: the same numbers, at a cost in n instead of (rank x channels).

    Sigma = X^T X / n (X centred when the pair has a bias) has rank n at most, so the push-through identity
    X^T (X X^T + lam I)^{-1} = (X^T X + lam I)^{-1} X^T turns the (R b)-square system into an n-square one:
    with A = X D_r^T / sqrt(n) and Y = X W^T / sqrt(n), tr(B^T (A^T A + lam I)^{-1} B), B = A^T Y, is
    ||Y||^2 - lam tr(Y^T (A A^T + lam I)^{-1} Y). A deep 512-channel 3x3 conv sees a few hundred sampled positions
    against 4,096 unknowns at rank 8 (use_samples decides).
    """
    k, count = depthwise.shape[-1], rows.shape[0]
    blocks, bk = rows.shape[1] // (block * k), block * k
    x = rows.double().reshape(count, blocks, bk).transpose(0, 1)  # (M/b, n, bK)
    if ridge <= 0:  # the n-square system may be singular: the moments path has a pseudo-inverse for that
        return _from_moments(weight, bias, groups, depthwise, x, ranks, ridge)
    raw = x
    w = _weight_by_block(weight, groups, blocks, bk)
    offset = 0.0
    if bias is not None:  # as refit_errors: the refit fits the mean, the centred rows are left to explain
        mu = x.mean(dim=1)
        offset = _mean_output_energy(w, mu, bias, groups)
        x = x - mu.unsqueeze(1)
    scaled = x / count**0.5
    y = scaled @ w.mT  # (M/b, n, N/g)
    total = float(y.square().sum())  # tr(W Sigma W^T)
    energy = total + offset
    if energy <= 0:
        return [0.0] * ranks
    every = depthwise.double().reshape(blocks, block, -1, k)  # (M/b, b, q, K)
    # Each filter's outputs, (M/b, b, n, q): column j of channel c is A's column (j, c).
    outputs = scaled.reshape(blocks, count, block, k).transpose(1, 2) @ every.mT
    scale = outputs.square().sum(2).mean(dim=(1, 2)).clamp_min(1e-300)  # refit_errors' mean diagonal at full rank
    lam = (ridge * scale)[:, None, None]
    kernel = lam * torch.eye(count, dtype=torch.float64, device=x.device)  # A_r A_r^T + lam I, built filter by filter
    explained = []
    for j in range(ranks):
        filters = outputs[..., j]  # (M/b, b, n)
        kernel = kernel + filters.mT @ filters
        factor, info = torch.linalg.cholesky_ex(kernel)
        if bool(info.any()):  # rounding made it indefinite: the moments path has a pseudo-inverse
            return _from_moments(weight, bias, groups, depthwise, raw, ranks, ridge)
        half = torch.linalg.solve_triangular(factor, y, upper=False)
        explained.append(total - float((lam * half.square()).sum()))
    return _shares_lost(explained, offset, energy)


def use_samples(count: int, block: int, kernel: int, outputs_per_group: int, ranks: int) -> bool:
    """Whether refit_errors_from_samples, on `count` rows not yet summed, costs fewer multiply-adds per block than
    summing their moments and refit_errors (a Cholesky factor of the largest system and its solve)."""
    unknowns, bk = ranks * block, block * kernel
    moments = count * bk**2 + unknowns**3 / 3 + unknowns**2 * outputs_per_group + bk**2 * outputs_per_group
    samples = count * bk * (ranks + outputs_per_group) + ranks * (count**2 * (block + outputs_per_group) + count**3 / 3)
    return samples < moments


def _from_moments(weight: Tensor, bias: Tensor | None, groups: int, depthwise: Tensor, x: Tensor, ranks: int,
                  ridge: float) -> list[float]:  # fmt: skip
    """refit_errors on the moments of the rows x (M/b, n, bK)."""
    return refit_errors(weight, bias, groups, depthwise, x.mT @ x / x.shape[1], x.mean(dim=1).reshape(-1), ranks, ridge)


def _weight_by_block(weight: Tensor, groups: int, blocks: int, bk: int) -> Tensor:
    """W restricted to each block's channels and its group's outputs: (M/b, N/g, bK)."""
    out = weight.shape[0] // groups
    return weight.detach().double().reshape(groups, out, blocks // groups, bk).transpose(1, 2).reshape(blocks, out, bk)


def _mean_output_energy(w: Tensor, mu: Tensor, bias: Tensor, groups: int) -> float:
    """||W E[x] + bias||^2: the output's mean part, which the refit's bias fits whatever the rank. mu: (M/b, bK)."""
    out = w.shape[1]
    mean_output = (w @ mu.unsqueeze(-1)).reshape(groups, -1, out).sum(1).reshape(-1)
    return float((mean_output + bias.detach().double()).square().sum())


def _shares_lost(explained: list[float], offset: float, energy: float) -> list[float]:
    """The share of the output energy the refit leaves at each rank (the bias explains the offset at every rank)."""
    return [min(1.0, max(0.0, 1.0 - (e + offset) / energy)) for e in explained]
