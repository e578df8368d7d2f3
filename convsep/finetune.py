"""finetune(model, data, teacher=original): win back, by training, the accuracy a conversion lost.

After conversion the model is already close to the original, so the original is the best
teacher there is: matching its outputs needs no labels (knowledge distillation, Hinton et al.
2015), and labels, when the batches carry them, are added to that signal. The loss of a batch is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, targets)

for classifier outputs (2-d logits with at least two classes), and

    alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, targets)

for any other output. A batch without targets uses the first term alone (weight 1); without a
teacher the second term alone is plain supervised training. The T^2 keeps the gradient of the soft
term on the scale of the hard one whatever the temperature.

Optimisation follows the usual recipe: AdamW (or SGD with momentum), a linear warmup then a cosine
schedule (convsep/schedule.py), gradient clipping, and no weight decay on depthwise filters
(MobileNet: they hold few parameters, so decay mostly shrinks them) nor on biases and normalisation
parameters. What a real run needs besides lives beside this loop: the loss (losses.py), the batches of
each epoch (epochs.py), the parameters trained and the optimiser (trainable.py), validation with
keep-best and the history (validation.py), mixed precision (precision.py), training checkpoints and
resume (training_state.py). A non-finite step is never applied: it is undone, the lr halved, and only after
a few such steps does training give up.

Under torchrun each process passes its own shard of the batches and the model is wrapped in
DistributedDataParallel: gradients are averaged over the processes, so a step sees the batches of
all of them, and every process ends with the same weights. The processes agree before every step
that each has a batch (the shortest shard sets the length of an epoch) and that none failed, so a
bad batch or a NaN on one process stops all of them with the same error instead of a hang.
Normalisation layers use each process's own batch statistics (as DDP does; convert them to
SyncBatchNorm yourself on GPUs); their running statistics end as rank 0's.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from . import distributed, training_state
from .batches import as_args, split_batch
from .devices import device_of, on_device, parse_device, to_device
from .epochs import END_OF_EPOCH, run_batches, total_steps
from .errors import ConvsepError, ConvsepTypeError, ConvsepValueError, NonFiniteLossError, first_line
from .losses import LOSSES, LossFn, Objective
from .plan import plan_of
from .precision import Precision
from .precision import check as check_autocast
from .probe import cannot_run, eval_mode
from .progress import progress_bar
from .schedule import Schedule
from .trainable import (
    DEFAULT_WEIGHT_DECAY,
    OPTIMIZERS,
    TrainableSpec,
    freeze_all_but,
    keep_statistics_of_frozen_norms,
    make_optimizer,
    parameter_groups,
    trainable_parameters,
)
from .validation import History, attach, evaluate, format_row

log = logging.getLogger(__name__)

NONFINITE_LR_FACTOR = 0.5  # after a non-finite step, the rest of the run trains at half the lr


def finetune(
    model: nn.Module,
    data: Iterable,
    *,
    teacher: Optional[nn.Module] = None,
    epochs: int = 1,
    lr: float = 1e-3,
    steps: Optional[int] = None,
    loss: Union[str, LossFn] = "auto",
    temperature: float = 2.0,
    alpha: float = 0.5,
    device: Union[str, torch.device, None] = None,
    trainable: TrainableSpec = "all",
    optimizer: str = "adamw",
    weight_decay: Optional[float] = None,
    clip_grad_norm: Optional[float] = 1.0,
    warmup: float = 0.05,
    val_data: Optional[Iterable] = None,
    val_every: Optional[int] = None,
    autocast: Optional[str] = None,
    nonfinite_retries: int = 3,
    save_state: Union[str, "os.PathLike[str]", None] = None,
    save_every: Optional[int] = None,
    resume: Union[str, "os.PathLike[str]", None] = None,
    verbose: bool = True,
) -> nn.Module:
    """Train `model` (usually the output of `convsep.convert`) in place and return it in eval mode.

    data: an iterable of batches: a tensor of inputs, or a tuple `(inputs, targets)`; inputs may be a
        tuple of tensors for several model inputs (see `convsep.batches`). Each epoch calls `iter(data)`
        once, so a list or a DataLoader gives `epochs` passes; a one-shot generator or iterator gives one
        pass only (later epochs find it empty: training stops there, with a warning).
    teacher: the original model, for distillation. It runs in eval mode under `torch.no_grad()` and is
        never changed (its parameters, buffers and training flags are as before; if it lives on another
        device, a copy is moved). Without a teacher, every batch must carry targets.
    epochs: passes over `data`. steps: if given, train exactly this many steps instead, cycling over
        `data` as often as needed (epochs is then ignored).
    lr: peak learning rate, reached after a linear warmup and decayed to 0 by a cosine schedule over the
        run (convsep.schedule). The schedule needs the number of steps: `steps`, or `epochs * len(data)`;
        data without `len()` trains at a constant lr. 1e-3 suits AdamW; give SGD a larger one (e.g. 0.01 to 0.1).
    warmup: the fraction of the run's steps spent raising the lr linearly to its peak (0: none).
    loss: "kl" (classifier: KL at `temperature` against the teacher, cross-entropy against targets),
        "mse" (any output: mean squared error against both), "auto" ("kl" when the output is 2-d with
        at least two columns, else "mse"), or a callable `(student_out, teacher_out, targets) -> scalar`
        (teacher_out / targets are None when absent) for outputs that are not one tensor.
    temperature, alpha: the loss is `alpha * T^2 * KL + (1 - alpha) * CE` ("kl") or
        `alpha * MSE(teacher) + (1 - alpha) * MSE(targets)` ("mse") when a batch has both a teacher and
        targets; one term alone (weight 1) when it has one. alpha=1 ignores targets, alpha=0 the teacher.
    device: where to train; default the model's device. The model is moved there and stays there.
    trainable: "all" (every parameter with requires_grad), "separable" (only the depthwise + pointwise
        pairs conversion made: everything else, norm running statistics included, stays as it is), or
        a callable `(name, parameter) -> bool`. Frozen parameters get their requires_grad back after.
    optimizer: "adamw" (default) or "sgd" (momentum 0.9). weight_decay: default 0.01 for AdamW, 1e-4
        for SGD; never applied to depthwise filters, biases or normalisation parameters.
    clip_grad_norm: clip the global gradient norm to this value (None: no clipping).
    val_data: validation batches (like `data`). The objective (and accuracy, when they carry class labels)
        is evaluated on them before training, after every epoch and every `val_every` steps, and the state
        with the lowest validation loss is returned: the starting state included, so the result is never
        worse on them than the model given. The history (step, epoch, train loss, validation loss and
        accuracy, lr) is kept in `model.convsep_plan.finetune` (saved with the checkpoint), or in
        `model.convsep_finetune` for a model without a conversion plan; verbose prints it.
    autocast: "bf16" (CPU or GPU) or "fp16" (CUDA, with a gradient scaler) runs the forward passes in that
        precision; weights, optimiser and loss stay in float32. None (default): float32 throughout.
    nonfinite_retries: how many times a step with a NaN or infinite loss or gradient is undone (the model,
        its buffers and the optimiser stay as after the last good step), the batch skipped and the lr
        halved for the rest of the run, before giving up with `NonFiniteLossError`. Each time is logged.
    save_state, save_every: write a training checkpoint (model, optimiser, schedule, position in the data,
        random generators, history) to `save_state` after every epoch and, if given, every `save_every`
        steps (atomically; rank 0 only). resume: a training checkpoint to continue from: the same call with
        the same data then ends where the uninterrupted run would have.
    verbose: a tqdm progress bar (loss, steps/s) on a terminal; quiet when stderr is not a TTY, when
        verbose=False, or when tqdm (the `progress` extra) is not installed.

    A step whose loss or gradient is NaN or infinite is never applied (see nonfinite_retries); when training
    gives up, the model keeps the weights and buffers (norm statistics) of the last finite step. Bad batches
    raise `InputShapeError` (validation batches too, named so); data that yields no batch `ConvsepValueError`.

    In a torch.distributed process group (torchrun), `data` is this process's shard and training is
    data-parallel (see the module docstring); the progress bar and log lines come from rank 0 only.
    """
    with distributed.together():  # a bad argument on one process ends them all, not only that one
        _check_arguments(
            model, data, teacher, epochs, steps, lr, warmup, loss, temperature, alpha, optimizer, weight_decay, clip_grad_norm
        )
        _check_run_options(val_data, val_every, autocast, nonfinite_retries, save_state, save_every)
        device = parse_device(device) if device is not None else device_of(model)
        named = trainable_parameters(model, trainable)
        if teacher is not None:
            _check_teacher(model, teacher)
        precision = Precision(autocast, device)
        resumed = training_state.load(resume, _structure(model)) if resume is not None else None
        # Only now, with every argument checked, is anything moved.
        model.to(device)
        if teacher is not None:
            teacher = on_device(teacher, device)
    trained_names = ",".join(name for name, _ in named)
    distributed.same_everywhere(distributed.fingerprint(model, teacher, extra=trained_names), "models")
    verbose = verbose and distributed.is_main()

    total, why = total_steps(data, epochs, steps)
    decay = DEFAULT_WEIGHT_DECAY[optimizer] if weight_decay is None else weight_decay
    opt = make_optimizer(optimizer, parameter_groups(model, named, decay), lr)
    schedule = Schedule(opt, lr, total, warmup)
    if why:
        log.info("%s and steps is None: training at a constant lr of %g", why, lr)
    objective = Objective(loss, temperature, alpha)
    history, position = History(), training_state.Position()
    run = {"rollbacks": 0, "applied": 0}  # steps undone for a non-finite value; steps applied
    since = [0.0, 0]  # train loss summed over the steps since the last evaluation, and their count
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        if precision.scaler is not None and resumed.get("scaler"):
            precision.scaler.load_state_dict(resumed["scaler"])
        history.load_state_dict(resumed["history"])
        position.load(resumed["position"], resumed["rng"])
        saved = dict(resumed["run"])
        trained_before = saved.pop("since", [0.0, 0])  # the sum over every process: rank 0 alone carries it on
        if distributed.is_main():
            since[:] = trained_before
        run.update(saved)
    params = [p for _, p in named]
    frozen = freeze_all_but(model, params)
    buffers = _BufferBackup(model)
    teacher_mode = contextlib.ExitStack()  # the teacher runs in eval mode; its own flags come back at the end
    teacher_mode.enter_context(eval_mode(*([teacher] if teacher is not None else [])))
    # Training needs autograd even when the caller runs under torch.no_grad() or inference_mode().
    teacher_mode.enter_context(torch.inference_mode(False))
    teacher_mode.enter_context(torch.enable_grad())
    model.train()
    keep_statistics_of_frozen_norms(model, {id(p) for p in params}, trainable)
    student = _data_parallel(model, device)
    bar = progress_bar(total, verbose, "finetune", "step")
    full_precision = Precision(None, device)

    def trained_since_evaluation() -> Tensor:
        trained = torch.tensor(since, dtype=torch.float64)
        distributed.all_sum([trained])  # a collective: every process reaches it at the same step
        return trained

    def validate() -> None:
        if val_data is None or (history.records and history.records[-1]["step"] == position.step):
            return
        distributed.broadcast_tensors(model.buffers())  # every process evaluates with the same running statistics
        with eval_mode(model), torch.no_grad():  # the unwrapped model: no DDP hooks, no collectives per batch
            evaluation = evaluate(val_data, lambda batch, where: _batch_loss(
                model, teacher, objective, batch, where, device, full_precision))  # fmt: skip
        trained = trained_since_evaluation()  # the mean over every process's batches, the same number everywhere
        train_loss = float(trained[0] / trained[1]) if trained[1] else None
        row = history.add(model, evaluation, step=position.step, epoch=position.epoch_of_last_step, train_loss=train_loss, lr=schedule.lr)
        since[:] = [0.0, 0]
        log.info("%s", format_row(row))
        if verbose:
            (bar.write if bar is not None else print)(format_row(row))

    def checkpoint() -> None:
        if save_state is None:
            return
        rngs = distributed.gather(position.rng())  # a collective: every process reaches it at the same step
        trained = trained_since_evaluation()  # so that the next history row's train loss survives a resume
        with distributed.together():  # a failed write on rank 0 (a full disk) stops the others too, not hangs them
            training_state.save(save_state, {
                "fingerprint": _structure(model), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "schedule": schedule.state_dict(), "scaler": precision.scaler.state_dict() if precision.scaler else None,
                "history": history.state_dict(), "position": position.state(), "rng": rngs, "run": {**run, "since": trained.tolist()},
            })  # fmt: skip

    try:
        if resumed is None:
            validate()  # the starting state: the one to beat
        for batch in run_batches(data, epochs, steps, position):
            if batch is END_OF_EPOCH:
                validate()
                checkpoint()
                continue
            position.step += 1
            step = position.step
            buffers.save()
            opt.zero_grad(set_to_none=True)
            applied = False
            try:
                # Everything up to the loss may fail on one process only: all of them hear of it before the
                # backward pass, whose gradient all-reduce would otherwise wait for the failed one forever.
                # A non-finite loss raises in there too, so every process undoes the step together.
                with distributed.together():
                    value, _, _ = _batch_loss(student, teacher, objective, batch, f"batch {step}", device, precision)
                    _check_finite(value, "loss", step, total, position.epoch, schedule.lr, run["rollbacks"])
                scaler = precision.scaler
                (scaler.scale(value) if scaler is not None else value).backward()
                if scaler is not None:
                    scaler.unscale_(opt)
                norm = nn.utils.clip_grad_norm_(params, clip_grad_norm or math.inf)
                if scaler is None:  # the same gradients on every process after DDP's all-reduce: the same verdict
                    _check_finite(norm, "gradient norm", step, total, position.epoch, schedule.lr, run["rollbacks"])
                    opt.step()
                else:  # float16: the scaler skips steps with overflowing gradients and lowers its scale
                    scaler.step(opt)
                    scaler.update()
                applied = True
            except NonFiniteLossError as error:
                opt.zero_grad(set_to_none=True)
                buffers.restore()
                if run["rollbacks"] >= nonfinite_retries:
                    raise
                run["rollbacks"] += 1
                schedule.lower(NONFINITE_LR_FACTOR)
                if distributed.is_main():
                    log.warning(
                        "%s. Undone and skipped (%d of %d allowed); the lr is now %g of the schedule",
                        first_line(error).split(". ")[0], run["rollbacks"], nonfinite_retries, schedule.scale,
                    )  # fmt: skip
            except BaseException:
                opt.zero_grad(set_to_none=True)
                buffers.restore()
                raise
            schedule.step()
            if applied:
                loss_value = value.item()
                run["applied"] += 1
                since[0], since[1] = since[0] + loss_value, since[1] + 1
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", epoch=position.epoch, refresh=False)
            if bar is not None:
                bar.update(1)
            if val_every and step % val_every == 0:
                validate()
            if save_every and step % save_every == 0:
                checkpoint()
        if position.step == 0:
            whose = "data" if not distributed.active() else "the data of at least one process"
            raise ConvsepValueError(
                f"{whose} yielded no batches ({type(data).__name__} was empty here): pass an iterable of input "
                "tensors or (inputs, targets) tuples"
            )
        if run["applied"] == 0:
            raise NonFiniteLossError(
                f"every one of the {position.step} steps had a NaN or infinite loss or gradient: the model was not "
                "changed. Look for NaN/inf in the data, or lower lr"
            )
        validate()  # a run of `steps` may end inside an epoch
        if history.restore_best(model):
            log.info("kept the state of step %d (lowest validation loss %.4f)", history.best_step, history.best_loss)
            if verbose:
                print(f"kept the state of step {history.best_step}: its validation loss {history.best_loss:.4f} is the lowest")
        if distributed.is_main():
            log.info("fine-tuned %d steps (%d undone)", position.step, run["rollbacks"])
        # Running statistics were updated by each process's own batches: end with rank 0's everywhere.
        distributed.broadcast_tensors(model.buffers())
        if val_data is not None:
            attach(model, {**history.summary(), "steps": position.step, "rollbacks": run["rollbacks"]})
    finally:
        if bar is not None:
            bar.close()
        teacher_mode.close()
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return model


def _batch_loss(module, teacher, objective, batch, where: str, device, precision: Precision):
    """(loss, the module's output, targets) of one batch; the teacher runs without autograd."""
    inputs, targets = (to_device(part, device) for part in split_batch(batch, where))
    with precision.forward():
        out = _run(module, inputs, where, "model")
        teacher_out = None
        if teacher is not None and objective.wants_teacher(targets is not None):
            with torch.no_grad():
                teacher_out = _run(teacher, inputs, where, "teacher")
    out, teacher_out = precision.as_float(out), precision.as_float(teacher_out)
    return objective(out, teacher_out, targets, where), out, targets


def _structure(model: nn.Module) -> str:
    """What a training checkpoint must match to be resumed: parameter names and shapes, converted layers and ranks."""
    plan = plan_of(model)
    layers = ";".join(f"{d.name}>{d.module}@{d.rank}" for d in plan.converted) if plan is not None else ""
    return distributed.fingerprint(model, extra=layers)


def _check_finite(value: Tensor, what: str, step: int, total: Optional[int], epoch: int, lr: float, undone: int) -> None:
    if torch.isfinite(value):
        return
    kept = "the weights of the last finite step" if step - 1 > undone else "its weights from before fine-tuning"
    before = f" ({undone} earlier step(s) undone already)" if undone else ""
    raise NonFiniteLossError(
        f"fine-tuning stopped at step {step}{f' of {total}' if total else ''} (epoch {epoch}): the {what} is "
        f"{value.item()}{before}. The model keeps {kept}. Lower lr (now {lr:g}), clip gradients, or look for "
        "NaN/inf in the data"
    )


def _run(module: nn.Module, inputs: Any, where: str, who: str) -> Any:
    args = as_args(inputs)
    try:
        return module(*args)
    except ConvsepError:
        raise
    except Exception as err:  # the user's model can reject inputs in any way (shape asserts, ValueError, ...)
        raise cannot_run(where, who, args, err) from err


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """The model wrapped in DistributedDataParallel in a process group of several, else the model itself.

    static_graph: every step trains the same parameters, which lets DDP cope with parameters the
    forward pass does not use and with modules called twice. No buffer broadcast in forward: it would
    be a collective before the processes agree that every one of them has a good batch.
    """
    if not distributed.active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device] if device.type == "cuda" else None
    # Newer torch names the switch forward_sync_buffers (buffers still sync once, at construction).
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=device_ids, static_graph=True, **{no_sync: False})


class _BufferBackup:
    """The model's buffers before a step, to put back if the step fails (train-mode BN updates them in forward)."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = list(model.buffers())
        self.copies = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        with torch.no_grad():
            for copy_, buffer in zip(self.copies, self.buffers, strict=True):
                copy_.copy_(buffer)

    def restore(self) -> None:
        with torch.no_grad():
            for copy_, buffer in zip(self.copies, self.buffers, strict=True):
                buffer.copy_(copy_)


def _check_teacher(model: nn.Module, teacher: nn.Module) -> None:
    if teacher is model:
        raise ConvsepValueError(
            "teacher is the model being fine-tuned: pass the original model (convert returns a copy unless inplace=True)"
        )
    shared = {id(p) for p in model.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ConvsepValueError(
            f"the teacher shares {len(shared)} parameter(s) with the model, so training would change the teacher: "
            "pass an independent copy of the original (convsep.convert without inplace=True gives one)"
        )


def _check_run_options(val_data, val_every, autocast, nonfinite_retries, save_state, save_every) -> None:
    if val_data is not None and (
        isinstance(val_data, (Tensor, str, bytes)) or not (hasattr(val_data, "__iter__") or hasattr(val_data, "__getitem__"))
    ):
        raise ConvsepTypeError(f"val_data must be an iterable of batches (a list, a DataLoader, ...), got {type(val_data).__name__}")
    for name, value in (("val_every", val_every), ("save_every", save_every), ("nonfinite_retries", nonfinite_retries)):
        minimum = 0 if name == "nonfinite_retries" else 1
        if value is None and name != "nonfinite_retries":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConvsepValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if val_every is not None and val_data is None:
        raise ConvsepValueError(f"val_every={val_every} needs val_data: the batches to validate on")
    if save_every is not None and save_state is None:
        raise ConvsepValueError(f"save_every={save_every} needs save_state: the path of the training checkpoint")
    check_autocast(autocast)


def _check_arguments(model, data, teacher, epochs, steps, lr, warmup, loss, temperature, alpha, optimizer, weight_decay, clip):
    if not isinstance(model, nn.Module):
        raise ConvsepTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ConvsepTypeError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}")
    if isinstance(data, (Tensor, str, bytes)) or not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        hint = " (did you mean to call it?)" if callable(data) else ""
        raise ConvsepTypeError(
            f"data must be an iterable of batches (a list, a DataLoader, ...), got {type(data).__name__}{hint}"
        )
    for name, value, minimum in (("epochs", epochs, 1), ("steps", steps, 1)):
        if value is None and name == "steps":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConvsepValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < 1:
        raise ConvsepValueError(f"warmup must be a fraction of the steps in [0, 1), got {warmup!r}")
    for name, value in (("lr", lr), ("temperature", temperature), ("clip_grad_norm", clip)):
        if value is None and name == "clip_grad_norm":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ConvsepValueError(f"{name} must be a positive finite number, got {value!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ConvsepValueError(f"alpha must be in [0, 1] (the weight of the teacher's term), got {alpha!r}")
    if weight_decay is not None and (not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf):
        raise ConvsepValueError(f"weight_decay must be a non-negative number or None, got {weight_decay!r}")
    if not callable(loss) and loss not in LOSSES:
        raise ConvsepValueError(f"loss={loss!r} is not known: use one of {', '.join(map(repr, LOSSES))} or a callable")
    if optimizer not in OPTIMIZERS:
        raise ConvsepValueError(f"optimizer={optimizer!r} is not known: use one of {', '.join(map(repr, OPTIMIZERS))}")
