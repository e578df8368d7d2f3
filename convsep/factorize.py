"""Closed-form factorisation of a convolution kernel into depthwise + pointwise weights.

Pure tensor maths, no nn.Module. A kernel W of shape (N, M/g, *k) is cut into one
(N/g, K) matrix per input channel c: the weights with which c reaches the outputs
of its group. The truncated SVD of that matrix, A_c = U S V^T, gives the depthwise
filters sqrt(s_j) v_j and the pointwise weights sqrt(s_j) u_j for j < rank, which is
exact at rank min(N/g, K) and optimal (Eckart-Young) below it. All channels of a
layer go through one batched SVD.

With data, the error that matters is the output's, not the weights': channel c adds
A_c x_c to the output, x_c its K-vector input patch. Dropping the cross-channel terms,
a rank-r B_c adds E||(A_c - B_c) x_c||^2 = ||(A_c - B_c) L_c||_F^2 with
Sigma_c = E[x_c x_c^T] = L_c L_c^T, which the truncated SVD of A_c L_c minimises; mapping
its right factors back with L_c^{-1} gives the pair (SVD-LLM / ASVD, per channel). Still
exact at full rank; the discarded whitened energy over the total is the predicted relative
output error squared. Weight-only SVD is the case Sigma_c = I.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class ChannelSVD(NamedTuple):
    """Thin SVD of every channel matrix of a kernel, in the compute dtype."""

    U: Tensor  # (M, N/g, q)
    S: Tensor  # (M, q), descending
    Vh: Tensor  # (M, q, K)


class SeparableFactors(NamedTuple):
    depthwise: Tensor  # (M*r, 1, *k): depthwise conv weight, groups=M
    pointwise: Tensor  # (N, M*r/g, 1, ...): pointwise conv weight, groups=g
    rank: int
    relative_error: float  # ||W - W_r||_F / ||W||_F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision SVDs are neither supported nor accurate; float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def full_rank(weight_shape: tuple[int, ...] | torch.Size, groups: int) -> int:
    """The rank at which the factorisation is exact: min(N/g, K)."""
    out_per_group = weight_shape[0] // groups
    return min(out_per_group, math.prod(weight_shape[2:]))


def channel_matrices(weight: Tensor, groups: int) -> Tensor:
    """(N, M/g, *k) -> (M, N/g, K): row c holds how input channel c reaches its group's outputs."""
    n, m_g = weight.shape[:2]
    k = math.prod(weight.shape[2:])
    per_group = weight.reshape(groups, n // groups, m_g, k)
    return per_group.transpose(1, 2).reshape(groups * m_g, n // groups, k)


def channel_svd(weight: Tensor, groups: int) -> ChannelSVD:
    """Thin SVD of every channel matrix, through the eigendecomposition of its small Gram matrix.

    Channel matrices are (N/g, K) with K tiny (9 for 3x3), and batched LAPACK SVDs of such
    tall-thin matrices are slow (seconds for a 512x512x3x3 layer); the K x K Gram matrix
    A^T A gives V and S^2 in milliseconds. It is formed in float64, so singular values stay
    accurate down to ~1e-8 of the largest, and U S Vh reproduces A to float64 rounding
    because V is orthonormal: U S = A V.
    """
    U, S, Vh = _batched_svd(channel_matrices(weight.detach(), groups).to(torch.float64))
    dtype = compute_dtype(weight.dtype)
    return ChannelSVD(U.to(dtype), S.to(dtype), Vh.to(dtype))


def whitened_channel_svd(weight: Tensor, groups: int, covariance: Tensor, ridge: float = 1e-3) -> ChannelSVD:
    """The factors minimising each channel's expected output error on inputs of second moment `covariance`.

    covariance: (M, K, K), E[x_c x_c^T] of every input channel's patches. `ridge` times the mean
    diagonal over the layer is added to every channel's, so channels the data never excites stay
    well-posed (they then follow the weight SVD, at an error that hardly counts). S holds the
    whitened singular values (their discarded share of energy is the predicted relative output
    error squared); Vh maps back to kernel space, so it is not orthonormal.
    """
    A = channel_matrices(weight.detach(), groups).to(torch.float64)
    sigma = covariance.to(device=A.device, dtype=torch.float64)
    k = sigma.shape[-1]
    scale = sigma.diagonal(dim1=1, dim2=2).mean()
    eye = torch.eye(k, dtype=torch.float64, device=A.device)
    L = torch.linalg.cholesky(sigma + ridge * scale * eye)
    U, S, Vh_white = _batched_svd(A @ L)
    Vh = torch.linalg.solve_triangular(L, Vh_white, upper=False, left=False)  # Vh_white L^{-1}
    dtype = compute_dtype(weight.dtype)
    return ChannelSVD(U.to(dtype), S.to(dtype), Vh.to(dtype))


def truncation_error(weight: Tensor, groups: int, svd: ChannelSVD, rank: int) -> float:
    """||W - W_r||_F / ||W||_F for the rank-`rank` truncation of `svd` (any factorisation, whitened too)."""
    A = channel_matrices(weight.detach(), groups).to(torch.float64)
    r = min(rank, svd.S.shape[1])
    approx = (svd.U[:, :, :r].double() * svd.S[:, None, :r].double()) @ svd.Vh[:, :r].double()
    total = A.norm()
    return float((A - approx).norm() / total) if total > 0 else 0.0


def _batched_svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) of a batch of small matrices (float64), from the Gram matrix of the smaller side."""
    rows, cols = A.shape[1:]
    tall = rows >= cols
    gram = A.mT @ A if tall else A @ A.mT
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    S = eigenvalues.flip(-1).clamp_min(0).sqrt()
    vectors = vectors.flip(-1)
    inverse_S = torch.where(S > 0, 1 / S, torch.zeros_like(S))
    if tall:
        return (A @ vectors) * inverse_S.unsqueeze(1), S, vectors.mT
    return vectors, S, (vectors.mT @ A) * inverse_S.unsqueeze(-1)


def discarded_energy_fraction(S: Tensor, rank: int) -> float:
    """Share of the kernel's squared Frobenius norm lost by keeping `rank` values per channel."""
    energy = S.square()
    total = energy.sum()
    if total == 0:
        return 0.0
    return float(energy[:, rank:].sum() / total)


def factors_from_svd(
    svd: ChannelSVD, rank: int, weight_shape: tuple[int, ...] | torch.Size, groups: int, dtype: torch.dtype
) -> SeparableFactors:
    """Keep the top `rank` singular triplets of every channel and split sqrt(s) between the two sides."""
    n, m_g, *kernel = weight_shape
    m = m_g * groups
    rank = min(rank, svd.S.shape[1])
    root_s = svd.S[:, :rank].sqrt()
    depthwise = (root_s.unsqueeze(-1) * svd.Vh[:, :rank]).reshape(m * rank, 1, *kernel)
    # Pointwise column c*r + j feeds output n of c's group: regroup (M, N/g, r) as (N, M/g * r).
    pointwise = (svd.U[:, :, :rank] * root_s.unsqueeze(1)).reshape(groups, m_g, n // groups, rank)
    pointwise = pointwise.transpose(1, 2).reshape(n, m_g * rank, *([1] * len(kernel)))
    error = math.sqrt(discarded_energy_fraction(svd.S, rank))
    return SeparableFactors(depthwise.to(dtype), pointwise.to(dtype), rank, error)


def factorize(weight: Tensor, groups: int, rank: int) -> SeparableFactors:
    """Rank-`rank` depthwise + pointwise factors of a conv kernel (exact at `full_rank`)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return factors_from_svd(channel_svd(weight, groups), rank, weight.shape, groups, weight.dtype)


def compose(depthwise: Tensor, pointwise: Tensor, groups: int, rank: int) -> Tensor:
    """The dense kernel a depthwise + pointwise pair computes: the inverse of `factorize`.

    Used to measure how far a pair is from the original kernel, whatever set its weights
    (SVD, calibration or training). `rank` is the depth multiplier: the shapes alone
    cannot tell M from r, since both weights only know their product M*r.
    """
    # No Python ints from tensor shapes, so that fx can trace it (a converted model's forward may read pair.weight).
    d = depthwise.squeeze(1).unflatten(0, (groups, -1, rank))  # (g, M/g, r, *k)
    p = pointwise.flatten(1).unflatten(0, (groups, -1)).unflatten(-1, (-1, rank))  # (g, N/g, M/g, r)
    return torch.einsum("gnmr,gmr...->gnm...", p, d).flatten(0, 1)
