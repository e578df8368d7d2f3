import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import zoo`

from zoo import ARCHITECTURES  # noqa: E402


@pytest.fixture(params=sorted(ARCHITECTURES))
def architecture(request):
    """(name, model in eval mode, example input), seeded so every run sees the same weights."""
    torch.manual_seed(0)
    factory, shape = ARCHITECTURES[request.param]
    return request.param, factory().eval(), torch.randn(shape)
