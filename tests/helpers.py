import torch
from torch import nn


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert list(before) == list(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


class Killed(Exception):
    """What the data raises to stand for a job killed mid-run."""


class DiesAfter:
    """`data`, re-iterable, except that taking batch number `limit + 1` (counted over every pass) raises Killed."""

    def __init__(self, data, limit: int) -> None:
        self.data, self.left = data, limit

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        for batch in self.data:
            if self.left == 0:
                raise Killed
            self.left -= 1
            yield batch


class Shuffled:
    """Calibration data that comes in another order on every pass, like a DataLoader with shuffle=True."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.passes))
        return iter([self.batches[i] for i in order])


class Alternating(Shuffled):
    """Batches in their order on odd passes, reversed on even ones."""

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes % 2 else self.batches[::-1])
