"""What the CLI test files share: running `convsep` in-process, and the files its commands read."""

import torch

from convsep.cli import main
from convsep.models import small_cnn


def run(argv, capsys):
    """(exit code, stdout, stderr) of `convsep ARGV`, run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def spec(folder, name="build"):
    """The --model spec of factory `name` in the folder's nets.py."""
    return f"{folder / 'nets.py'}:{name}"


def trained(folder):
    """The small_cnn(width=4) whose state_dict the `work` fixtures save as in.pt."""
    model = small_cnn(width=4).eval()
    model.load_state_dict(torch.load(folder / "in.pt", weights_only=True))
    return model
