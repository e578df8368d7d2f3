"""The convsep command line: `convsep convert | report | finetune | demo`, and `python -m convsep` the same.

main(argv) returns the exit code: 0 ok, 1 failure, 2 usage (what argparse rejects). Errors of
ours become one line on stderr, never a traceback; warnings become `convsep: warning:` lines.
One function per subcommand; the helpers below them (reading a checkpoint with a model
factory, parsing input shapes, printing the report) are shared, so new subcommands and
flags reuse them.

Under torchrun (`torchrun --nproc_per_node N -m convsep convert|finetune ...`) every process
runs the same command on its shard of the batches (batch i goes to rank i mod N); rank 0 alone
prints and writes, once every process has finished without error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import distributed
from .aware import CONVERT_INITS
from .checkpoint import Checkpoint, check_destination, read, save
from .convert import convert
from .errors import ConvsepError, ConvsepTypeError, ConvsepValueError, InputShapeError, error_summary
from .data import load_batches
from .devices import device_of
from .finetune import finetune
from .imports import resolve_callable
from .ranks import parse_rank_override
from .models import ZOO
from .parametrized import PARAMETRIZED
from .plan import plan_of
from .report import report
from .shapes import InputShape, Shape, from_text, several, shapes_of, to_text
from .version import __version__

FORMATS = ("table", "markdown", "json", "csv")


# --- subcommands ---------------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
    with distributed.together():  # every process converted (and calibrated) without error before rank 0 writes
        if distributed.is_main():
            check_destination(args.output, overwrite=args.force, sources={"input": args.input})
        loaded = _load(args.input, args.model, trust_pickle=args.trust_pickle)
        if distributed.local_device() is not None:  # torchrun with CUDA: calibrate on this process's GPU
            loaded.model.to(distributed.local_device())
        shape = _input_shape(args, loaded.checkpoint)
        x = _example_input(loaded.model, shape) if shape else None
        previous = plan_of(loaded.model)
        if x is None and (args.objective == "latency" or (args.budget is not None and args.budget_on == "macs")):
            needs = "--objective latency" if args.objective == "latency" else "--budget on MACs"
            raise ConvsepValueError(f"{needs} needs --input-shape (like 1,3,224,224): MACs and timings depend on it")
        calibration = None
        if args.calibration_batches is not None and args.calibration_batches < 1:
            raise ConvsepValueError(f"--calibration-batches {args.calibration_batches} must be a positive number of batches")
        if args.calibration_batches is not None and not args.calibrate_with:
            raise ConvsepValueError("--calibration-batches needs --calibrate-with DATA: the batches to calibrate on")
        if args.calibration_alternate < 0:
            raise ConvsepValueError(f"--calibration-alternate {args.calibration_alternate} must be 0 or more rounds")
        for option, value in (("--calibration-alternate", args.calibration_alternate), ("--refit-kept", args.refit_kept)):
            if value and (not args.calibrate_with or not args.refit):
                raise ConvsepValueError(f"{option} needs --calibrate-with DATA and no --no-refit: it shapes the refit")
        if args.refit_kept and not args.calibration_sequential:
            raise ConvsepValueError("--refit-kept and --calibrate-at-once cannot be combined: at once, kept layers see the original's inputs")
        if args.calibrate_with:
            image_shape = {"channels": shape[1], "size": tuple(shape[2:4])} if shape and not several(shape) and len(shape) == 4 else {}
            # --calibration-batches counts batches in all: the first N are shared out among the processes.
            calibration = distributed.shard(load_batches(args.calibrate_with, **image_shape), args.calibration_batches)
        converted = convert(
            loaded.model,
            rank=args.rank,
            init=args.init,
            include=args.include,
            exclude=args.exclude,
            ranks=dict(args.rank_for or []) or None,
            example_inputs=x,
            budget=args.budget,
            budget_on=args.budget_on,
            objective=args.objective,
            calibration_data=calibration,
            calibration_batches=None,  # applied above, over all processes
            calibration_sequential=args.calibration_sequential,
            calibration_alternate=args.calibration_alternate,
            calibration_refit_kept=args.refit_kept,
            parametrized=args.parametrized,
            allocate_by=args.allocate_by,
            refit=args.refit,
        )
    plan = converted.convsep_plan
    considered = len(plan.layers) - (len(previous.converted) if previous else 0)
    newly_converted = len(plan.converted) - (len(previous.converted) if previous else 0)
    if considered == 0:
        _warn(f"{args.input} has no convolution convsep can convert; {args.output} holds the same weights")
    elif newly_converted == 0:
        _warn(f"no convolution of {args.input} was converted (reasons below); {args.output} holds the same weights")
    if distributed.is_main():
        save(converted, args.output, input_shape=shape)
    before = loaded.original if loaded.original is not None else loaded.model
    if x is None:
        _print_summary(before, converted, args.format)
        _note("pass --input-shape (like 1,3,224,224) for MACs and FLOPs in the report")
    else:
        _print_report(before, converted, x, args.format, args.latency, original_weights=loaded.original_weights)
    _note(f"wrote {args.output} ({len(plan.converted)} of {len(plan.layers)} convolutions converted)")
    return 0


def _report(args: argparse.Namespace) -> int:
    loaded = _load(args.input, args.model, trust_pickle=args.trust_pickle)
    after = loaded.model
    before = loaded.original
    if before is None:
        before = after
        if loaded.checkpoint.converted:
            _note(f"{args.input} is converted and no --model names its original architecture: 'before' is the model as loaded")
    shape = _input_shape(args, loaded.checkpoint)
    if shape is None:
        _print_summary(before, after, args.format)
        _note("pass --input-shape (like 1,3,224,224) for MACs and FLOPs in the report")
        return 0
    x = _example_input(after, shape)
    _print_report(before, after, x, args.format, args.latency, original_weights=loaded.original_weights)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    # The training checkpoint: continued from --resume, else beside OUT; never overwritten by a new run unasked.
    state = args.training_state or args.resume or f"{args.output}.training.pt"
    with distributed.together():  # every process trained without error before rank 0 writes
        if distributed.is_main():
            check_destination(args.output, overwrite=args.force, sources={"input": args.input, "teacher": args.teacher})
            if not _same_path(state, args.resume):
                check_destination(
                    state,
                    overwrite=args.force,
                    sources={"input": args.input, "teacher": args.teacher, "output": args.output},
                    what="training state",
                )
        student = _load(args.input, args.model, trust_pickle=args.trust_pickle)
        teacher = _load(args.teacher, args.model, trust_pickle=args.trust_pickle).model
        data = distributed.shard(load_batches(args.data, option="--data"))
        val = distributed.shard(load_batches(args.val_data, option="--val-data")) if args.val_data else None
        tuned = finetune(
            student.model, data, teacher=teacher, epochs=args.epochs, steps=args.steps, lr=args.lr, warmup=args.warmup,
            temperature=args.temperature, alpha=args.alpha, optimizer=args.optimizer,
            device=args.device or distributed.local_device(), trainable=args.trainable, val_data=val,
            val_every=args.val_every, autocast=args.autocast, save_state=state, save_every=args.save_every,
            resume=args.resume, verbose=sys.stderr.isatty(),
        )  # fmt: skip
    # Written only after training finished with finite losses: a failed run leaves no checkpoint.
    if distributed.is_main():
        save(tuned, args.output, input_shape=student.checkpoint.input_shape)
    record = getattr(plan_of(tuned), "finetune", None)
    if record and record.get("history"):
        last = record["history"][-1]
        _note(f"validation loss {record['history'][0]['val_loss']:.4f} -> {last['val_loss']:.4f}; "
              f"kept step {record['best_step']} (validation loss {record['best_val_loss']:.4f})")  # fmt: skip
    _note(f"wrote {args.output} (training state: {state})")
    return 0


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    model = ZOO[args.model]().eval()
    shape = (1, 1, 28, 28) if args.model == "small_cnn" else (1, 3, 224, 224)
    x = torch.randn(shape)
    converted = convert(model, rank=args.rank)
    with torch.inference_mode():
        before, after = model(x), converted(x)
    error = (after - before).norm() / before.norm()
    print(f"{args.model} (random weights), rank={args.rank}, input {_shape_text(shape)}")
    _print_report(model, converted, x, "table", args.latency)
    print(f"relative output error on a random input: {error:.2e}")
    return 0


# --- the parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convsep",
        description="Turn the standard convolutions of a PyTorch model into depthwise-separable ones.",
        epilog=(
            "examples:\n"
            "  convsep demo\n"
            "  convsep convert model.pt -o model_sep.pt --model mypkg.models:resnet18 --input-shape 1,3,224,224\n"
            "  convsep report model_sep.pt --model mypkg.models:resnet18\n\n"
            "exit codes: 0 ok, 1 failure, 2 usage error"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"convsep {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert_parser = _subcommand(
        commands,
        "convert",
        help="convert a checkpoint and write the converted one",
        description=(
            "Convert the convolutions of a saved model and write a converted checkpoint (state_dict plus the "
            "conversion plan; .safetensors or torch.save format by OUT's extension). It loads back with "
            "convsep.load(OUT, model=factory()). Prints the report when an input shape is known."
        ),
        examples=[
            "convsep convert model.pt -o model_sep.pt --model mypkg.models:resnet18 --input-shape 1,3,224,224",
            "convsep convert weights.safetensors -o sep.safetensors --model path/to/net.py:Net --rank 2",
            "convsep convert model.pt -o sep.pt --model mypkg:build --include 'layer3.*' --exclude '*.downsample.*'",
            "convsep convert whole_model.pt -o sep.pt --trust-pickle --rank 0.9 --format json",
        ],
        run=_convert,
    )
    convert_parser.add_argument("input", metavar="IN", help="checkpoint to convert (.pt/.pth/.bin/.safetensors)")
    convert_parser.add_argument("-o", "--output", metavar="OUT", required=True, help="where to write the converted checkpoint")
    _add_model_options(convert_parser)
    convert_parser.add_argument(
        "--rank", default=1, type=_rank_arg, help="int, 'full', or an energy fraction in (0, 1) (default: 1)"
    )
    convert_parser.add_argument(
        "--rank-for", action="append", type=_cli_type(parse_rank_override), metavar="GLOB=R",
        help="rank for the layers matching GLOB, e.g. 'layer3.*=2' or 'stem.conv=full' (repeatable; overrides --rank)",
    )  # fmt: skip
    convert_parser.add_argument(
        "--budget", type=float, metavar="FRACTION",
        help="choose ranks so the whole model keeps at most this fraction of its MACs (or params), e.g. 0.3",
    )  # fmt: skip
    convert_parser.add_argument("--budget-on", choices=("macs", "params"), default="macs", help="what --budget limits")
    convert_parser.add_argument(
        "--objective", choices=("macs", "latency"), default="macs",
        help="'latency': convert only layers measured faster on this machine at --input-shape (default: macs)",
    )  # fmt: skip
    convert_parser.add_argument(
        "--calibrate-with", metavar="DATA",
        help="refit the pairs on real inputs: a folder of images, or package.module:callable returning batches",
    )  # fmt: skip
    convert_parser.add_argument(
        "--calibration-batches", type=int, metavar="N", help="use at most N batches of --calibrate-with"
    )
    convert_parser.add_argument(
        "--calibrate-at-once", dest="calibration_sequential", action="store_false",
        help="fit every pair at once on its inputs in the original model: one forward pass per batch instead of a "
        "partial pass of the converted model per layer (faster on deep models; later pairs no longer make up for earlier "
        "ones)",
    )  # fmt: skip
    convert_parser.add_argument(
        "--calibration-alternate", type=int, default=0, metavar="N",
        help="after refitting the pointwise weights, N rounds of refitting the depthwise filters, then the pointwise "
        "again (default 0; 2 recovers more accuracy at aggressive budgets, at a higher cost on wide, long kernels)",
    )  # fmt: skip
    convert_parser.add_argument(
        "--refit-kept", action=argparse.BooleanOptionalAction, default=None,
        help="refit the linear layers and convs left as they were that run after a converted one (a classifier "
        "head, an --exclude'd conv) on their inputs in the converted model (the default when calibrating in order; "
        "--no-refit-kept leaves them as they were)",
    )  # fmt: skip
    convert_parser.add_argument(
        "--init", choices=CONVERT_INITS, default="auto",
        help="factorisation: 'svd' (least weight error), 'activation' (per channel, least output error on "
        "--calibrate-with data), 'joint' (filters and pointwise weights fitted together on the layer's outputs on "
        "--calibrate-with data), 'auto' (the default: joint with --calibrate-with and --budget, activation with "
        "--calibrate-with --no-refit, else svd), or 'random'",
    )  # fmt: skip
    convert_parser.add_argument(
        "--allocate-by", choices=("auto", "weights", "activations"), default="auto",
        help="what --budget minimises: weight error, or output error predicted from --calibrate-with data "
        "(after the refit, unless --no-refit; 'auto', the default: activations with --calibrate-with, else weights)",
    )  # fmt: skip
    convert_parser.add_argument(
        "--no-refit", dest="refit", action="store_false",
        help="use --calibrate-with only for the conversion (statistics for --init/--allocate-by), without refitting",
    )  # fmt: skip
    convert_parser.add_argument(
        "--parametrized", choices=PARAMETRIZED, default="fold",
        help="convs whose weight is computed (weight_norm, spectral_norm): 'fold' converts them from the weight "
        "they compute, without the parametrization; 'keep' leaves them as they are (default: fold)",
    )  # fmt: skip
    convert_parser.add_argument(
        "--include", action="append", metavar="GLOB", help="convert only layers whose name matches (repeatable)"
    )
    convert_parser.add_argument(
        "--exclude", action="append", metavar="GLOB", help="leave layers whose name matches as they are (repeatable)"
    )
    _add_report_options(convert_parser)
    convert_parser.add_argument("--force", action="store_true", help="replace OUT if it exists")

    report_parser = _subcommand(
        commands,
        "report",
        help="print the report for a checkpoint, converted or not",
        description=(
            "Print params, MACs and FLOPs of a checkpoint. For a converted checkpoint, 'before' is the original "
            "architecture built by --model. The input shape recorded at conversion is used when --input-shape is not given."
        ),
        examples=[
            "convsep report model_sep.pt --model mypkg.models:resnet18",
            "convsep report model.pt --model path/to/net.py:Net --input-shape 1,3,32,32 --format markdown",
        ],
        run=_report,
    )
    report_parser.add_argument("input", metavar="IN", help="checkpoint (.pt/.pth/.bin/.safetensors)")
    _add_model_options(report_parser)
    _add_report_options(report_parser)

    finetune_parser = _subcommand(
        commands,
        "finetune",
        help="fine-tune a converted checkpoint by distillation from the original",
        description=(
            "Train a converted checkpoint to match the original model's outputs (and the labels, when the "
            "batches carry them), then write it as a convsep checkpoint. Nothing is written if training fails."
        ),
        examples=[
            "convsep finetune model_sep.pt -o model_ft.pt --teacher model.pt --model mypkg.models:resnet18 "
            "--data mypkg.data:train_batches",
            "convsep finetune sep.pt -o ft.pt --teacher orig.pt --model net.py:Net --data data.py:batches --epochs 2 --lr 3e-4",
            "convsep finetune sep.pt -o ft.pt --teacher orig.pt --model net.py:Net --data data.py:train --val-data data.py:val "
            "--save-every 500   # then, if killed: the same command with --resume ft.pt.training.pt",
        ],
        run=_finetune,
    )
    finetune_parser.add_argument("input", metavar="CONVERTED", help="converted checkpoint to train")
    finetune_parser.add_argument("-o", "--output", metavar="OUT", required=True, help="where to write the trained checkpoint")
    finetune_parser.add_argument("--teacher", metavar="ORIGINAL", required=True, help="checkpoint of the original model")
    finetune_parser.add_argument(
        "--data", metavar="DATA", required=True,
        help="package.module:callable (or path/to/file.py:callable) returning an iterable of batches, "
        "each a tensor of inputs or a tuple (inputs, targets)",
    )  # fmt: skip
    _add_model_options(finetune_parser)
    finetune_parser.add_argument("--epochs", type=int, default=1, help="passes over DATA (default: 1)")
    finetune_parser.add_argument("--steps", type=int, help="train exactly this many steps instead of --epochs")
    finetune_parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    finetune_parser.add_argument(
        "--alpha", type=float, default=0.5,
        help="weight of the teacher when batches carry labels: alpha * T^2 * KL + (1 - alpha) * CE (default: 0.5)",
    )  # fmt: skip
    finetune_parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T (default: 2)")
    finetune_parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="(default: adamw)")
    finetune_parser.add_argument("--device", help="where to train, like cpu or cuda:0 (default: where the model is)")
    finetune_parser.add_argument(
        "--trainable", choices=("all", "separable"), default="all", help="train every parameter or only the pairs"
    )
    finetune_parser.add_argument(
        "--warmup", type=float, default=0.05, help="fraction of the steps spent warming the lr up linearly (default: 0.05)"
    )
    finetune_parser.add_argument(
        "--val-data", metavar="DATA",
        help="validation batches (like --data): evaluated before training and after every epoch; the best state is kept",
    )  # fmt: skip
    finetune_parser.add_argument("--val-every", type=int, metavar="N", help="also validate every N steps")
    finetune_parser.add_argument(
        "--autocast", choices=("bf16", "fp16"), help="mixed precision for the forward passes (fp16: CUDA only)"
    )
    finetune_parser.add_argument(
        "--training-state", metavar="PATH",
        help="where the training checkpoint goes, every epoch and every --save-every steps (default: OUT.training.pt)",
    )  # fmt: skip
    finetune_parser.add_argument("--save-every", type=int, metavar="N", help="also save the training state every N steps")
    finetune_parser.add_argument(
        "--resume", metavar="PATH", help="continue an interrupted run from its training state (same command otherwise)"
    )
    finetune_parser.add_argument("--force", action="store_true", help="replace OUT (and its training state) if they exist")

    demo = _subcommand(
        commands,
        "demo",
        help="convert a built-in model and print the report (no files needed)",
        description="Convert a built-in model with random weights and print the report.",
        examples=["convsep demo", "convsep demo --model vgg16 --rank full", "convsep demo --model small_cnn --latency"],
        run=_demo,
    )
    demo.add_argument("--model", choices=sorted(ZOO), default="resnet18", help="built-in architecture (default: resnet18)")
    demo.add_argument("--rank", default="1", type=_rank_arg, help="int, 'full' or an energy fraction in (0, 1) (default: 1)")
    demo.add_argument("--latency", action="store_true", help="also measure the time of a forward pass before and after")
    return parser


def _subcommand(commands, name: str, *, help: str, description: str, examples: list[str], run) -> argparse.ArgumentParser:
    sub = commands.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, 100),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(run=run)
    return sub


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="MODULE:CALLABLE",
        help="callable that builds the (original) architecture, like mypkg.models:resnet18 or path/to/file.py:Net; "
        "needed for a state_dict",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a whole pickled model (torch.save(model)); unpickling runs code from the file",
    )


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape", type=_cli_type(_one_input_shape), action="append", metavar="N,C,H,W",
        help="example input shape, like 1,3,224,224; repeat it, in order, for a model with several inputs",
    )  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, default="table", help="report format (default: table)")
    parser.add_argument("--latency", action="store_true", help="also measure the time of a forward pass before and after")


def _rank_arg(text: str):
    """int, 'full' or float; whether the value is usable is convert's call (exit 1 with its message)."""
    if text == "full":
        return text
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a rank: use an int, 'full', or a float in (0, 1)")


def _cli_type(parse):
    """An argparse type from a parser of ours: its ConvsepError becomes a usage error (exit 2)."""

    def convert_text(text: str):
        try:
            return parse(text)
        except ConvsepError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert_text.__name__ = parse.__name__
    return convert_text


def _one_input_shape(text: str) -> Shape:
    shape = from_text(text)
    if several(shape):
        raise ConvsepValueError(f"{text!r}: give one shape per --input-shape, and repeat the flag for each input")
    return shape


def _input_shape(args: argparse.Namespace, checkpoint: Checkpoint) -> Optional[InputShape]:
    """--input-shape (one per model input when repeated), else the shape recorded in the checkpoint."""
    given = args.input_shape
    if not given:
        return checkpoint.input_shape
    return given[0] if len(given) == 1 else tuple(given)


# --- shared helpers ------------------------------------------------------------------------


@dataclass
class _Loaded:
    checkpoint: Checkpoint
    model: nn.Module  # the checkpoint's model with its weights, in eval mode (converted if the checkpoint was)
    original: Optional[nn.Module]  # the original architecture: the same model, or for a converted
    # checkpoint a fresh one from --model (its weights are the factory's); None when unknown

    @property
    def original_weights(self) -> bool:
        """Whether `original` holds the trained weights (a converted checkpoint keeps only the converted ones)."""
        return not self.checkpoint.converted


def _load(path: str, model_spec: Optional[str], *, trust_pickle: bool) -> _Loaded:
    """Read a checkpoint and build the model it holds, with --model naming the architecture."""
    checkpoint = read(path, trust_pickle=trust_pickle)
    if model_spec:
        template = _build_model(model_spec)
        model = checkpoint.build(template)
        original = template.eval() if checkpoint.converted else model
    elif checkpoint.module is not None:
        model, original = checkpoint.module, (None if checkpoint.converted else checkpoint.module)
    else:
        what = "a converted state_dict" if checkpoint.converted else "a state_dict"
        raise ConvsepValueError(
            f"{path} holds weights only ({what}): pass --model package.module:factory (or path/to/file.py:factory) "
            "naming a callable that builds the original architecture"
        )
    return _Loaded(checkpoint, model.eval(), original)


def _build_model(spec: str) -> nn.Module:
    factory = resolve_callable(spec, what="--model")
    try:
        model = factory()
    except Exception as error:  # user code: anything can go wrong there
        raise ConvsepValueError(f"--model {spec!r}: calling it failed ({error_summary(error)})") from None
    if not isinstance(model, nn.Module):
        raise ConvsepTypeError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _example_input(model: nn.Module, shape: InputShape) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Seeded random inputs of `shape` in the model's dtype (a tuple for several inputs); an error if the model cannot run on them."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=generator, dtype=dtype).to(device_of(model)) for s in shapes_of(shape))
    x = inputs if several(shape) else inputs[0]
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as error:  # user code: the shape check is whatever the model's forward rejects
        raise InputShapeError(
            f"input shape {_shape_text(shape)} does not fit the model ({error_summary(error)})"
        ) from None
    return x


def _print_report(
    before: nn.Module, after: nn.Module, x: torch.Tensor, fmt: str, latency: bool, *, original_weights: bool = True
) -> None:
    """convsep.report(...).render(fmt) on stdout.

    original_weights=False: `before` has the original architecture but not its trained weights, so
    weight errors must come from the conversion plan, not from comparing kernels.
    """
    shown = report(before, after, x, latency=latency, original_weights=original_weights)  # on every process: timing is collective
    if distributed.is_main():
        print(shown.render(fmt))


def _print_summary(before: nn.Module, after: nn.Module, fmt: str) -> None:
    """What needs no input: the conversion decisions and the parameter counts."""
    if not distributed.is_main():
        return
    plan = plan_of(after)
    params_before = sum(p.numel() for p in before.parameters())
    params_after = sum(p.numel() for p in after.parameters())
    if fmt == "json":
        print(json.dumps({"plan": plan.to_dict() if plan else None, "params_before": params_before, "params_after": params_after}))
        return
    if plan is not None:
        print(plan.summary())
        for layer in plan.converted:
            print(f"  {layer.name}: rank {layer.rank} of {layer.full_rank}")
    ratio = params_after / params_before if params_before else 1.0
    print(f"params: {params_before:,} -> {params_after:,} ({ratio:.1%})")


def _shape_text(shape: InputShape) -> str:
    return " ".join(f"--input-shape {','.join(map(str, s))}" for s in shapes_of(shape)) if several(shape) else to_text(shape)


def _note(text: str) -> None:
    """Status lines go to stderr, so stdout holds only the report (parseable with --format json)."""
    if distributed.is_main():
        print(f"convsep: {text}", file=sys.stderr)


def _warn(text: str) -> None:
    if distributed.is_main():
        print(f"convsep: warning: {text}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _warn(str(message).strip().splitlines()[0] if str(message).strip() else category.__name__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # argparse exits 2 on usage errors and 0 on --help/--version
        return int(exit.code or 0)
    started = distributed.init_from_environment()  # under torchrun: join its process group
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line each, no source line
        try:
            with distributed.together():  # a failure on one process ends every process
                return args.run(args)
        except ConvsepError as error:
            if distributed.is_main() or not getattr(error, distributed.SHARED, False):  # rank 0 speaks for all
                print(f"convsep: error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("convsep: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `convsep report ... | head`: the reader left; say nothing more
            _silence_stdout()
            return 1
        finally:
            if started:
                distributed.shutdown()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured, replaced)
        pass


def console() -> None:
    """The `convsep` command and `python -m convsep`: main(), then exit with its code.

    A process that torchrun started leaves without running C++ static destructors: with the
    process group already torn down, gloo's leftover threads can otherwise abort the
    interpreter's exit now and then (seen under load), failing a run that succeeded.
    """
    code = main()
    if distributed.launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
