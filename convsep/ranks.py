"""Rank policies: how many depthwise filters per input channel each layer keeps.

A rank spec is an int (the depth multiplier, capped at the layer's full rank),
"full" (exact), or a float in (0, 1): the smallest rank that keeps that fraction of
the kernel's spectral energy (sum of squared singular values over all channels).
"""

from __future__ import annotations

import fnmatch
from typing import Optional, Union

import torch

from .errors import ConvsepTypeError, ConvsepValueError
from .warn import warn_user

RankSpec = Union[int, float, str]


def validate_rank(rank: object, where: str = "rank") -> RankSpec:
    """Return `rank` if it is a usable spec; raise a clear error naming it otherwise."""
    if isinstance(rank, str):
        if rank == "full":
            return rank
        raise ConvsepValueError(f"{where}={rank!r} is not a rank: use a positive int, 'full', or a float in (0, 1)")
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ConvsepTypeError(
            f"{where}={rank!r} ({type(rank).__name__}) is not a rank: use a positive int, 'full', or a float in (0, 1)"
        )
    if isinstance(rank, int):
        if rank < 1:
            raise ConvsepValueError(f"{where}={rank} must be >= 1 (the number of depthwise filters per input channel)")
        return rank
    if not 0.0 < rank < 1.0:
        raise ConvsepValueError(
            f"{where}={rank} is a float, so it is an energy fraction and must lie in (0, 1); use an int for a fixed rank"
        )
    return rank


def rank_for_energy(S: torch.Tensor, fraction: float) -> int:
    """Smallest rank r whose top-r singular values hold `fraction` of the energy of all channels."""
    energy = S.square().sum(dim=0)  # energy kept by adding the j-th value of every channel
    total = energy.sum()
    if total == 0:
        return 1
    kept = energy.cumsum(0) / total
    # A tiny tolerance so that fraction=0.9 is met by a kept share of 0.8999999 in float32.
    return int(torch.searchsorted(kept, torch.tensor(fraction - 1e-6, dtype=kept.dtype)).item()) + 1


def resolve_rank(rank: RankSpec, S: torch.Tensor) -> int:
    """The concrete rank for one layer, given the singular values S (M, q) of its channels."""
    cap = S.shape[1]
    if rank == "full":
        return cap
    if isinstance(rank, float):
        return min(rank_for_energy(S, rank), cap)
    return min(int(rank), cap)


class RankOverrides:
    """Per-layer rank specs: {glob or exact name: spec}. An exact name wins, then the first matching glob."""

    def __init__(self, ranks: Optional[dict[str, RankSpec]]) -> None:
        if ranks is not None and not isinstance(ranks, dict):
            raise ConvsepTypeError(f"ranks={ranks!r} must be a dict of name pattern -> rank, like {{'layer3.*': 2}}")
        self.ranks = {}
        for pattern, spec in (ranks or {}).items():
            if not isinstance(pattern, str):
                raise ConvsepTypeError(f"ranks has the key {pattern!r}: keys must be name patterns (str)")
            self.ranks[pattern] = validate_rank(spec, where=f"ranks[{pattern!r}]")
        self._hits: set[str] = set()

    def get(self, name: str, default: RankSpec) -> RankSpec:
        if name in self.ranks:
            self._hits.add(name)
            return self.ranks[name]
        for pattern, spec in self.ranks.items():
            if fnmatch.fnmatchcase(name, pattern):
                self._hits.add(pattern)
                return spec
        return default

    def warn_unmatched(self) -> None:
        for pattern in self.ranks:
            if pattern not in self._hits:
                warn_user(f"ranks pattern {pattern!r} matched no convertible convolution")


BUDGET_ON = ("macs", "params")


def validate_budget(budget: object, budget_on: object, example_inputs: object, rank: RankSpec) -> Optional[float]:
    """Return `budget` if it is usable with the other arguments; raise a clear error naming it otherwise."""
    if budget_on not in BUDGET_ON:
        raise ConvsepValueError(f"budget_on={budget_on!r} is not known: use one of {', '.join(map(repr, BUDGET_ON))}")
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConvsepTypeError(
            f"budget={budget!r} ({type(budget).__name__}) must be a number in (0, 1]: the share of the original cost to keep"
        )
    if not 0.0 < budget <= 1.0:
        raise ConvsepValueError(
            f"budget={budget} must lie in (0, 1]: it is the share of the original {budget_on} the converted model "
            "may keep (0.3 keeps 30%)"
        )
    if budget_on == "macs" and example_inputs is None:
        raise ConvsepValueError(
            f"budget={budget} on MACs needs example_inputs, since MACs depend on the input size: pass e.g. "
            "example_inputs=torch.randn(1, 3, 224, 224), or budget_on='params'"
        )
    if rank != 1:
        raise ConvsepValueError(
            f"rank={rank!r} and budget={budget} both choose the ranks: pass one of them "
            "(per-layer overrides in ranks= still apply under a budget)"
        )
    return float(budget)


def parse_rank(text: str, where: str = "--rank") -> RankSpec:
    """A rank spec from command-line text: "full", an int, or an energy fraction like "0.9"."""
    text = text.strip()
    if text == "full":
        return text
    try:
        value: Union[int, float] = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ConvsepValueError(
                f"{where} {text!r} is not a rank: use a positive int, 'full', or a float in (0, 1)"
            ) from None
    return validate_rank(value, where=where)


def parse_rank_override(text: str) -> tuple[str, RankSpec]:
    """("glob", rank spec) from "GLOB=RANK", the text of one --rank-for (the last "=" splits)."""
    pattern, sep, rank = text.rpartition("=")
    if not sep or not pattern.strip():
        raise ConvsepValueError(f"--rank-for {text!r} must look like GLOB=RANK, e.g. 'layer3.*=2' or 'stem.conv=full'")
    return pattern.strip(), parse_rank(rank, where=f"--rank-for {pattern.strip()}")
