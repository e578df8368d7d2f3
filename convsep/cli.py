"""The convsep command line: `convsep demo` (more commands arrive with the CLI issue).

main(argv) returns the exit code: 0 ok, 1 failure, 2 usage. Errors of ours become one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from .convert import convert
from .errors import ConvsepError
from .models import ZOO
from .version import __version__


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    model = ZOO[args.model]().eval()
    x = torch.randn(1, 3, 224, 224) if args.model != "small_cnn" else torch.randn(1, 1, 28, 28)
    converted = convert(model, rank=args.rank)
    with torch.inference_mode():
        before, after = model(x), converted(x)
    error = (after - before).norm() / before.norm()
    params_before = sum(p.numel() for p in model.parameters())
    params_after = sum(p.numel() for p in converted.parameters())
    print(f"{args.model} (random weights), rank={args.rank}")
    print(converted.convsep_plan.summary())
    print(f"params: {params_before:,} -> {params_after:,} ({params_after / params_before:.1%})")
    print(f"relative output error on a random input: {error:.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convsep",
        description="Turn the standard convolutions of a PyTorch model into depthwise-separable ones.",
    )
    parser.add_argument("--version", action="version", version=f"convsep {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="convert a built-in model and print what it saved (no files needed)",
        description="Convert a built-in model with random weights and print a summary.",
        epilog="examples:\n  convsep demo\n  convsep demo --model vgg16 --rank full",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--model", choices=sorted(ZOO), default="resnet18", help="built-in architecture (default: resnet18)")
    demo.add_argument("--rank", default="1", type=_rank_arg, help="int, 'full' or an energy fraction in (0, 1) (default: 1)")
    demo.set_defaults(run=_demo)
    return parser


def _rank_arg(text: str):
    if text == "full":
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rank: use an int, 'full', or a float in (0, 1)") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # argparse exits 2 on usage errors and 0 on --help/--version
        return int(exit.code or 0)
    try:
        return args.run(args)
    except ConvsepError as error:
        print(f"convsep: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
