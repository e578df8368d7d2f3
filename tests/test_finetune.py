import importlib.util
import math
import os
import warnings

import pytest
import torch
from torch import nn

import convsep
from convsep.losses import distillation_loss
from helpers import DiesAfter, Killed, assert_bitwise_equal, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_net(classes: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )  # fmt: skip


def quadrant_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images whose class is the quadrant holding a bright patch: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    for q in range(4):
        r, c = divmod(q, 2)
        x[y == q, :, 6 * r : 6 * r + 6, 6 * c : 6 * c + 6] += 1.5
    return x, y


def chunks(x, y=None, size=32):
    return [(x[i : i + size], y[i : i + size]) if y is not None else x[i : i + size] for i in range(0, len(x), size)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is as fast as two, and does not fight a busy machine for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """(teacher trained on labels by finetune itself, train batches, held-out inputs and labels)."""
    torch.manual_seed(0)
    x, y = quadrant_task(512, seed=0)
    held_x, held_y = quadrant_task(256, seed=1)
    teacher = convsep.finetune(small_net(), chunks(x, y), epochs=3, lr=1e-2, verbose=False)
    return teacher, chunks(x, y), held_x, held_y


def held_out_distillation_loss(student, teacher, x):
    with torch.no_grad():
        return float(distillation_loss(student(x), teacher(x)))


def test_supervised_training_without_a_teacher_learns_the_task(trained):
    teacher, _, held_x, held_y = trained
    assert not teacher.training
    accuracy = (teacher(held_x).argmax(1) == held_y).float().mean()
    assert accuracy > 0.7, accuracy  # chance is 0.25


def test_distillation_lowers_the_loss_and_leaves_the_teacher_bitwise_unchanged(trained):
    teacher, batches, held_x, _ = trained
    student = convsep.convert(teacher, rank=1)
    teacher.train()
    teacher[1].eval()  # mixed flags must come back exactly as they were
    flags = [m.training for m in teacher.modules()]
    before = snapshot(teacher)
    try:
        start = held_out_distillation_loss(student, teacher.eval(), held_x)
        teacher.train()
        teacher[1].eval()
        result = convsep.finetune(student, [x for x, _ in batches], teacher=teacher, epochs=2, lr=3e-3, verbose=False)
        assert [m.training for m in teacher.modules()] == flags
        assert_bitwise_equal(before, teacher)
    finally:
        teacher.eval()
    assert result is student and not student.training
    end = held_out_distillation_loss(student, teacher, held_x)
    assert end < 0.5 * start, (start, end)


def test_labels_and_teacher_combine_as_documented():
    torch.manual_seed(0)
    student_out, teacher_out = torch.randn(8, 5), torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    soft = distillation_loss(student_out, teacher_out, "kl", temperature=3.0)
    expected_soft = 9.0 * (
        torch.softmax(teacher_out / 3, 1) * (torch.log_softmax(teacher_out / 3, 1) - torch.log_softmax(student_out / 3, 1))
    ).sum(1).mean()
    torch.testing.assert_close(soft, expected_soft)

    seen = {}

    class Probe(nn.Module):
        """Returns fixed logits plus a trainable offset of 0, so the first loss is the formula's value."""

        def __init__(self, outputs):
            super().__init__()
            self.outputs, self.offset = outputs, nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return self.outputs + self.offset

    def record(student, teacher, targets):
        value = 0.25 * distillation_loss(student, teacher, "kl", 3.0) + 0.75 * nn.functional.cross_entropy(student, targets)
        seen.setdefault("custom", float(value.detach()))
        return value

    convsep.finetune(Probe(student_out), [(torch.zeros(8), targets)], teacher=Probe(teacher_out), loss=record,
                     lr=1e-9, verbose=False)  # fmt: skip
    expected = 0.25 * float(expected_soft) + 0.75 * float(nn.functional.cross_entropy(student_out, targets))
    assert seen["custom"] == pytest.approx(expected, rel=1e-6)

    from convsep.losses import Objective

    combined = Objective("auto", 3.0, 0.25)(student_out, teacher_out, targets, "batch 1")
    assert float(combined) == pytest.approx(expected, rel=1e-6)
    assert float(Objective("auto", 3.0, 1.0)(student_out, teacher_out, targets, "batch 1")) == pytest.approx(float(soft))


def test_mse_is_chosen_for_outputs_that_are_not_logits():
    from convsep.losses import Objective

    out, teacher_out = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    objective = Objective("auto", 2.0, 0.5)
    torch.testing.assert_close(objective(out, teacher_out, None, "batch 1"), nn.functional.mse_loss(out, teacher_out))
    assert objective.kind == "mse"


def test_trainable_separable_changes_only_the_pairs(trained):
    teacher, batches, _, _ = trained
    student = convsep.convert(teacher, rank=1)
    outside = {k: v for k, v in snapshot(student).items() if ".depthwise." not in k and ".pointwise." not in k}
    pairs = {k: v for k, v in snapshot(student).items() if k not in outside}
    convsep.finetune(student, batches, teacher=teacher, trainable="separable", steps=4, lr=1e-2, verbose=False)
    after = student.state_dict()
    for key, value in outside.items():
        assert torch.equal(after[key], value), key  # weights and BN running statistics alike
    assert any(not torch.equal(after[key], value) for key, value in pairs.items())
    assert all(p.requires_grad for p in student.parameters())


def test_no_weight_decay_on_depthwise_filters_biases_or_norms():
    """With a zero gradient, AdamW moves a parameter only by its decay: exactly the decayed ones change."""
    torch.manual_seed(0)
    model = convsep.convert(small_net(), rank=1)
    before = snapshot(model)
    zero = lambda out, teacher_out, targets: 0.0 * out.sum()  # noqa: E731
    convsep.finetune(model, [torch.randn(4, 3, 12, 12)], loss=zero, lr=0.1, weight_decay=0.5, verbose=False)
    after = model.state_dict()
    for name, param in model.named_parameters():
        changed = not torch.equal(after[name], before[name])
        decays = param.dim() > 1 and ".depthwise." not in name  # pointwise and linear weights
        assert changed == decays, name
        if decays:
            torch.testing.assert_close(after[name], before[name] * (1 - 0.1 * 0.5))


def test_gradients_are_clipped_to_the_given_norm():
    """SGD's first step moves the weights by lr * gradient: with clipping, by exactly lr * clip_grad_norm."""
    model = nn.Linear(3, 2)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    huge = lambda out, teacher_out, targets: 1e6 * out.sum()  # noqa: E731
    convsep.finetune(model, [torch.ones(4, 3)], loss=huge, optimizer="sgd", lr=0.1, weight_decay=0.0,
                     clip_grad_norm=2.0, verbose=False)  # fmt: skip
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(0.1 * 2.0, rel=1e-4)


def test_quiet_when_stderr_is_not_a_terminal(capsys):
    pytest.importorskip("tqdm")
    convsep.finetune(nn.Linear(3, 2), [(torch.randn(4, 3), torch.randint(0, 2, (4,)))], verbose=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_steps_cycle_over_the_data():
    calls = []

    def counting(out, teacher_out, targets):
        calls.append(1)
        return out.square().mean()

    convsep.finetune(nn.Linear(3, 2), [torch.randn(2, 3)] * 2, steps=5, loss=counting, verbose=False)
    assert len(calls) == 5


def lr_of_every_step(monkeypatch, **kwargs) -> list[float]:
    """The lr the optimiser holds at each of its steps (a spy on AdamW.step) during one finetune call."""
    seen, step = [], torch.optim.AdamW.step

    def spy(self, *args, **kw):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    square = lambda out, teacher_out, targets: out.square().mean()  # noqa: E731
    convsep.finetune(nn.Linear(3, 2), [torch.randn(2, 3)], loss=square, verbose=False, **kwargs)
    return seen


def test_the_lr_warms_up_linearly_then_follows_a_cosine_to_zero(monkeypatch):
    lrs = lr_of_every_step(monkeypatch, steps=20, lr=0.1, warmup=0.1)  # 2 warmup steps, 18 of cosine
    expected = [0.1 / 3, 0.2 / 3] + [0.05 * (1 + math.cos(math.pi * s / 18)) for s in range(18)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_the_default_warmup_is_a_few_percent_of_the_steps(monkeypatch):
    lrs = lr_of_every_step(monkeypatch, steps=40, lr=1.0)
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # 5% of 40: two steps below the peak


def test_a_one_shot_generator_gives_one_epoch_with_a_warning():
    calls = []

    def counting(out, teacher_out, targets):
        calls.append(1)
        return out.square().mean()

    generator = (torch.randn(2, 3) for _ in range(3))
    with pytest.warns(UserWarning, match="one-shot"):
        convsep.finetune(nn.Linear(3, 2), generator, epochs=2, loss=counting, verbose=False)
    assert len(calls) == 3


def test_training_works_when_the_caller_has_turned_autograd_off():
    torch.manual_seed(0)
    model, x = small_net(), torch.randn(4, 3, 12, 12)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        convsep.finetune(model, [x], teacher=small_net(), steps=2, verbose=False)
    assert torch.is_grad_enabled()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [[], iter([]), (x for x in [])], ids=["list", "iterator", "generator"])
def test_data_that_yields_nothing_is_an_error(data):
    with pytest.raises(convsep.ConvsepValueError, match="no batches"):
        convsep.finetune(small_net(), data, teacher=small_net(), verbose=False)


def test_inputs_of_the_wrong_shape_name_the_shape():
    with pytest.raises(convsep.InputShapeError, match=r"batch 1.*\(4, 5, 12, 12\)"):
        convsep.finetune(small_net(), [torch.randn(4, 5, 12, 12)], teacher=small_net(), verbose=False)


def test_a_batch_that_is_neither_a_tensor_nor_a_tuple_is_named():
    batches = [torch.randn(4, 3, 12, 12), {"image": torch.randn(4, 3, 12, 12)}]
    with pytest.raises(convsep.ConvsepTypeError, match="batch 2: a batch is a tensor or a tuple .*got dict"):
        convsep.finetune(small_net(), batches, teacher=small_net(), verbose=False)


def test_targets_of_the_wrong_shape_or_range_are_errors():
    x = torch.randn(4, 3, 12, 12)
    with pytest.raises(convsep.InputShapeError, match=r"\(3,\).*\(4, 4\)"):
        convsep.finetune(small_net(), [(x, torch.zeros(3, dtype=torch.long))], verbose=False)
    with pytest.raises(convsep.ConvsepValueError, match=r"class index 7 is outside \[0, 4\)"):
        convsep.finetune(small_net(), [(x, torch.tensor([0, 1, 7, 2]))], verbose=False)


def test_a_teacher_whose_outputs_do_not_match_is_an_error():
    with pytest.raises(convsep.ConvsepValueError, match=r"teacher's output is \(4, 5\) float32 but the student's is \(4, 4\)"):
        convsep.finetune(small_net(4), [torch.randn(4, 3, 12, 12)], teacher=small_net(5), verbose=False)


def test_a_nan_loss_stops_at_that_step_and_keeps_the_last_finite_weights():
    torch.manual_seed(0)
    teacher, student = small_net().eval(), small_net()
    good = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    bad = torch.full((4, 3, 12, 12), float("nan"))
    reference = small_net()
    reference.load_state_dict(student.state_dict())
    # generators have no len(): both runs train at the same constant lr, so they must agree bitwise
    convsep.finetune(reference, (b for b in good), teacher=teacher, verbose=False)
    with pytest.raises(convsep.NonFiniteLossError, match="step 3 .*loss is nan.*weights of the last finite step"):
        convsep.finetune(student, (b for b in good + [bad]), teacher=teacher, nonfinite_retries=0, verbose=False)
    assert_bitwise_equal(snapshot(reference), student)  # BN running statistics included
    assert not student.training


def test_bad_arguments_are_named():
    model, data = small_net(), [torch.randn(2, 3, 12, 12)]
    for kwargs, pattern in [
        ({"epochs": 0}, "epochs"), ({"steps": -1}, "steps"), ({"lr": math.nan}, "lr"), ({"alpha": 1.5}, "alpha"),
        ({"loss": "hinge"}, "hinge"), ({"optimizer": "lbfgs"}, "lbfgs"), ({"trainable": "some"}, "some"),
        ({"temperature": 0}, "temperature"), ({"weight_decay": -1.0}, "weight_decay"),
        ({"device": "tpu9"}, "device='tpu9'"), ({"device": "meta"}, "device='meta'"),
    ]:  # fmt: skip
        with pytest.raises(convsep.ConvsepValueError, match=pattern):
            convsep.finetune(model, data, teacher=small_net(), verbose=False, **kwargs)
    with pytest.raises(convsep.ConvsepValueError, match="no targets and no teacher"):
        convsep.finetune(model, data, verbose=False)
    with pytest.raises(convsep.ConvsepValueError, match="teacher is the model"):
        convsep.finetune(model, data, teacher=model, verbose=False)
    with pytest.raises(convsep.ConvsepValueError, match="no SeparableConv"):
        convsep.finetune(model, data, teacher=small_net(), trainable="separable", verbose=False)
    with pytest.raises(convsep.ConvsepTypeError, match="did you mean to call it"):
        convsep.finetune(model, lambda: data, teacher=small_net(), verbose=False)


# --- the Fashion-MNIST example -----------------------------------------------------------------


def load_example(name: str):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"convsep_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fashion_mnist_example_runs_in_quick_mode(capsys):
    reader = load_example("fashion_mnist")
    if not reader.available():
        pytest.skip(f"Fashion-MNIST not found in {reader.data_dir()}: {reader.INSTALL_HINT}")
    example = load_example("fashion_mnist_end_to_end")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert example.main(["--quick", "--quiet"]) == 0
    out = capsys.readouterr().out
    accuracy = {step: float(value.split("%")[0]) for step, _, value in
                (line.partition(": test accuracy ") for line in out.splitlines()) if value}  # fmt: skip
    calibrated = accuracy["converted, budget 0.3 + calibration"]
    tuned = accuracy["fine-tuned (3 epochs), budget 0.3 + calibration"]
    assert accuracy["original"] > 40, accuracy  # ten classes: chance is 10%
    assert tuned > calibrated + 5, accuracy  # fine-tuning wins accuracy back (measured: 54 -> 69%)


def test_a_device_written_without_its_index_is_where_the_teacher_already_is():
    from convsep.devices import on_device, parse_device

    teacher = small_net()
    assert parse_device("cpu:0") == parse_device("cpu") == torch.device("cpu")
    assert on_device(teacher, parse_device("cpu:0")) is teacher  # no copy of a model already there


def test_a_bad_argument_is_found_before_the_model_is_moved(monkeypatch):
    model, moved = small_net(), []
    monkeypatch.setattr(model, "to", lambda *args, **kwargs: moved.append(args))
    for kwargs in ({"trainable": "some"}, {"teacher": model}):
        with pytest.raises(convsep.ConvsepValueError):
            convsep.finetune(model, [torch.randn(2, 3, 12, 12)], device="cpu", verbose=False, **kwargs)
    assert moved == []


# --- validation, keep-best, history ------------------------------------------------------------


def labelled_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return small_net().eval()


def test_with_validation_a_run_that_only_hurts_returns_the_model_it_was_given(trained):
    teacher, batches, held_x, held_y = trained
    student = convsep.convert(teacher, rank=2)
    before = snapshot(student)
    # lr 1.0 throws an already close model far away: every later state is worse on validation
    convsep.finetune(student, batches, teacher=teacher, lr=1.0, epochs=2, val_data=chunks(held_x, held_y), verbose=False)
    assert_bitwise_equal(before, student)
    history = student.convsep_plan.finetune
    assert history["best_step"] == 0 and [r["step"] for r in history["history"]] == [0, 16, 32]
    assert all(r["val_loss"] > history["history"][0]["val_loss"] for r in history["history"][1:])


def test_validation_keeps_the_state_with_the_lowest_validation_loss(trained):
    teacher, batches, held_x, held_y = trained
    student = convsep.convert(teacher, rank=1)
    val = chunks(held_x, held_y)
    convsep.finetune(student, batches, teacher=teacher, lr=3e-3, epochs=2, val_every=5, val_data=val, verbose=False)
    history = student.convsep_plan.finetune["history"]
    best = min(history, key=lambda r: r["val_loss"])
    assert [r["step"] for r in history] == [0, 5, 10, 15, 16, 20, 25, 30, 32]
    assert best["step"] == student.convsep_plan.finetune["best_step"] and best["step"] > 0
    with torch.no_grad():  # the returned model is the one measured at that step (same objective, alpha 0.5)
        loss = sum(float(_objective_on(student, teacher, x, y)) * len(x) for x, y in val) / len(held_x)
    assert loss == pytest.approx(best["val_loss"], rel=1e-5)


def _objective_on(student, teacher, x, y):
    from convsep.losses import Objective

    return Objective("auto", 2.0, 0.5)(student(x), teacher(x), y, "check")


def test_the_history_records_accuracy_train_loss_and_lr(trained):
    teacher, batches, held_x, held_y = trained
    student = convsep.convert(teacher, rank=1)
    with torch.no_grad():
        start_accuracy = float((student(held_x).argmax(1) == held_y).float().mean())
    convsep.finetune(student, batches, teacher=teacher, steps=6, lr=3e-3, warmup=0.0, val_data=chunks(held_x, held_y), verbose=False)
    first, last = student.convsep_plan.finetune["history"]
    assert first["val_accuracy"] == pytest.approx(start_accuracy) and first["train_loss"] is None
    assert (last["step"], last["epoch"], last["lr"]) == (6, 1, pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 6 / 6))))
    assert last["train_loss"] > 0


def test_a_model_without_a_plan_keeps_its_history_on_itself():
    x, y = quadrant_task(16, seed=3)
    model = convsep.finetune(labelled_net(), chunks(x, y, 8), steps=2, val_data=chunks(x, y, 8), verbose=False)
    assert [r["step"] for r in model.convsep_finetune["history"]] == [0, 2]


def test_validation_batches_that_do_not_fit_are_named():
    good, bad = torch.randn(4, 3, 12, 12), torch.randn(4, 5, 12, 12)
    with pytest.raises(convsep.InputShapeError, match=r"validation batch 2: the model cannot run .*\(4, 5, 12, 12\)"):
        convsep.finetune(small_net(), [good], teacher=small_net(), val_data=[good, bad], verbose=False)


def test_verbose_prints_the_history(capsys):
    x, y = quadrant_task(16, seed=3)
    convsep.finetune(labelled_net(), chunks(x, y, 8), steps=2, val_data=chunks(x, y, 8), verbose=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if "validation loss" in line]
    assert len(lines) == 2 and lines[0].startswith("step 0 (epoch 1): validation loss") and "accuracy" in lines[0]


# --- non-finite steps ---------------------------------------------------------------------------


def test_a_nan_step_is_undone_and_skipped_and_the_lr_halved(monkeypatch):
    torch.manual_seed(0)
    good = [torch.randn(2, 3) for _ in range(3)]
    data = [good[0], torch.full((2, 3), float("nan")), good[1], good[2]]
    lrs = lr_of_every_step(monkeypatch, steps=4, lr=0.1, warmup=0.0)  # the closed form, without the NaN
    monkeypatch.undo()
    seen, step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1])
    model = nn.Linear(3, 2)
    square = lambda out, teacher_out, targets: out.square().mean()  # noqa: E731
    convsep.finetune(model, data, loss=square, lr=0.1, warmup=0.0, verbose=False)
    assert seen == pytest.approx([lrs[0], lrs[2] / 2, lrs[3] / 2])  # step 2 never reached the optimiser
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_after_the_allowed_retries_training_gives_up_with_the_last_finite_weights():
    model = nn.Linear(3, 2)
    nan = torch.full((2, 3), float("nan"))
    square = lambda out, teacher_out, targets: out.square().mean()  # noqa: E731
    reference = nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    convsep.finetune(reference, [torch.ones(2, 3)] + [nan] * 2, loss=square, nonfinite_retries=2, warmup=0.0, verbose=False)
    with pytest.raises(convsep.NonFiniteLossError, match=r"step 4 .*loss is nan \(2 earlier step\(s\) undone"):
        convsep.finetune(model, [torch.ones(2, 3)] + [nan] * 3, loss=square, nonfinite_retries=2, warmup=0.0, verbose=False)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_non_finite_gradient_with_a_finite_loss_is_caught():
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    root = lambda out, teacher_out, targets: out.abs().sqrt().sum()  # noqa: E731  (0 at 0; its gradient is not finite)
    with pytest.raises(convsep.NonFiniteLossError, match="gradient norm is nan"):
        convsep.finetune(model, [torch.ones(2, 3)], loss=root, nonfinite_retries=0, verbose=False)
    assert bool((model.weight == 0).all()) and bool((model.bias == 0).all())


def test_every_step_non_finite_is_an_error_and_leaves_the_model_as_it_was():
    model = nn.Linear(3, 2)
    before = snapshot(model)
    square = lambda out, teacher_out, targets: out.square().mean()  # noqa: E731
    with pytest.raises(convsep.NonFiniteLossError, match="every one of the 2 steps"):
        convsep.finetune(model, [torch.full((2, 3), float("inf"))] * 2, loss=square, verbose=False)
    assert_bitwise_equal(before, model)


# --- the teacher, clipping ---------------------------------------------------------------------


def test_the_teacher_gets_no_gradients():
    torch.manual_seed(0)
    teacher = small_net().eval()
    convsep.finetune(convsep.convert(teacher, rank=1), [torch.randn(4, 3, 12, 12)], teacher=teacher, steps=2, verbose=False)
    assert all(p.grad is None for p in teacher.parameters())


def test_gradients_are_clipped_to_norm_1_by_default():
    model = nn.Linear(3, 2)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    huge = lambda out, teacher_out, targets: 1e6 * out.sum()  # noqa: E731
    convsep.finetune(model, [torch.ones(4, 3)], loss=huge, optimizer="sgd", lr=0.1, weight_decay=0.0, verbose=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(0.1 * 1.0, rel=1e-4)


# --- mixed precision ---------------------------------------------------------------------------


def test_bf16_autocast_trains_and_keeps_float32_weights(trained):
    teacher, batches, held_x, _ = trained
    student = convsep.convert(teacher, rank=1)
    start = held_out_distillation_loss(student, teacher, held_x)
    convsep.finetune(student, [x for x, _ in batches], teacher=teacher, lr=3e-3, autocast="bf16", verbose=False)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert held_out_distillation_loss(student, teacher, held_x) < 0.7 * start


def test_fp16_autocast_needs_cuda_and_unknown_kinds_are_named():
    data = [torch.randn(2, 3, 12, 12)]
    with pytest.raises(convsep.ConvsepValueError, match="autocast='fp16' needs a CUDA device"):
        convsep.finetune(small_net(), data, teacher=small_net(), autocast="fp16", device="cpu", verbose=False)
    with pytest.raises(convsep.ConvsepValueError, match="autocast='int8' is not known"):
        convsep.finetune(small_net(), data, teacher=small_net(), autocast="int8", verbose=False)


# --- training checkpoints and resume -------------------------------------------------------------


def resumable_setup():
    """A float64 teacher with batch norm and dropout (random on every step), its conversion, a shuffling DataLoader."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                            nn.Linear(288, 4)).double().eval()  # fmt: skip
    x, y = torch.randn(32, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    val = [(x[:16], y[:16])]
    return convsep.convert(teacher, rank=1), teacher, loader, val


def run_to_the_end(tmp_path, **options):
    student, teacher, loader, val = resumable_setup()
    torch.manual_seed(1)
    convsep.finetune(student, loader, teacher=teacher, epochs=2, lr=1e-2, val_data=val, verbose=False,
                     save_state=tmp_path / "whole.pt", **options)  # fmt: skip
    return student


def killed_then_resumed(tmp_path, killed_at: int, **options):
    student, teacher, loader, val = resumable_setup()
    start = snapshot(student)
    torch.manual_seed(1)
    with pytest.raises(Killed):
        convsep.finetune(student, DiesAfter(loader, killed_at), teacher=teacher, epochs=2, lr=1e-2, val_data=val,
                         verbose=False, save_state=tmp_path / "state.pt", **options)  # fmt: skip
    resumed, teacher, loader, val = resumable_setup()
    torch.manual_seed(123)  # whatever the generators hold now, the checkpoint's state is what counts
    convsep.finetune(resumed, loader, teacher=teacher, epochs=2, lr=1e-2, val_data=val, verbose=False,
                     save_state=tmp_path / "state.pt", resume=tmp_path / "state.pt", **options)  # fmt: skip
    return resumed, start


def test_a_run_killed_after_epoch_1_and_resumed_ends_as_the_uninterrupted_one(tmp_path):
    whole = run_to_the_end(tmp_path)
    resumed, start = killed_then_resumed(tmp_path, killed_at=4)  # 4 batches an epoch: killed taking the 5th
    assert any(not torch.equal(v, whole.state_dict()[k]) for k, v in start.items())  # it did train
    assert_bitwise_equal(snapshot(whole), resumed)
    assert resumed.convsep_plan.finetune["history"] == whole.convsep_plan.finetune["history"]


def test_a_run_killed_mid_epoch_resumes_from_its_last_save_every_checkpoint(tmp_path):
    whole = run_to_the_end(tmp_path, save_every=3)
    resumed, _ = killed_then_resumed(tmp_path, killed_at=7, save_every=3)  # saved at step 6, in epoch 2
    assert_bitwise_equal(snapshot(whole), resumed)
    # the row after the kill has the train loss of steps 5 and 6 (before it) and 7, 8 (after) too
    assert resumed.convsep_plan.finetune["history"] == whole.convsep_plan.finetune["history"]


def test_resuming_with_another_model_is_one_error_and_changes_nothing(tmp_path):
    run_to_the_end(tmp_path)
    saved = (tmp_path / "whole.pt").read_bytes()
    _, teacher, loader, _ = resumable_setup()
    other = convsep.convert(teacher, rank=2)
    before = snapshot(other)
    with pytest.raises(convsep.CheckpointError, match="whole.pt is the training state of another model"):
        convsep.finetune(other, loader, teacher=teacher, save_state=tmp_path / "whole.pt", resume=tmp_path / "whole.pt",
                         verbose=False)  # fmt: skip
    assert (tmp_path / "whole.pt").read_bytes() == saved
    assert_bitwise_equal(before, other)
