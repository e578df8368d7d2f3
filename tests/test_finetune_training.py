"""What a fine-tuning step trains and how: the objective's terms, the teacher's calls, which parameters
train and decay, norm statistics, gradients, and the order of the batches."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convsep
from convsep.losses import Objective, distillation_loss


def test_the_default_temperature_is_2():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    torch.testing.assert_close(distillation_loss(student, teacher), distillation_loss(student, teacher, "kl", 2.0))
    assert not torch.allclose(distillation_loss(student, teacher, "kl", 2.0), distillation_loss(student, teacher, "kl", 3.0))


def test_loss_mse_on_logits_compares_with_the_teacher_and_the_targets_by_mse():
    torch.manual_seed(0)
    out, teacher_out, targets = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)
    value = Objective("mse", 2.0, 0.25)(out, teacher_out, targets, "batch 1")
    expected = 0.25 * F.mse_loss(out, teacher_out) + 0.75 * F.mse_loss(out, targets.float())
    torch.testing.assert_close(value, expected)  # float32, as the model: the float64 targets are cast


def test_loss_mse_takes_targets_of_any_value_and_integer_dtype():
    out = torch.zeros(2, 2)
    targets = torch.tensor([[-3, 7], [5, 0]])  # not class indices: no range check
    value = Objective("mse", 2.0, 0.5)(out, None, targets, "batch 1")
    torch.testing.assert_close(value, torch.tensor((9 + 49 + 25) / 4))


def test_class_probabilities_as_targets_give_cross_entropy():
    torch.manual_seed(0)
    out, probabilities = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    value = Objective("auto", 2.0, 0.5)(out, None, probabilities, "batch 1")
    torch.testing.assert_close(value, F.cross_entropy(out, probabilities))


def test_alpha_1_without_a_teacher_trains_on_the_targets_alone():
    torch.manual_seed(0)
    out, targets = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(Objective("auto", 2.0, 1.0)(out, None, targets, "batch 1"), F.cross_entropy(out, targets))


def test_alpha_1_with_a_teacher_ignores_the_targets_even_unfit_ones():
    torch.manual_seed(0)
    out, teacher_out = torch.randn(4, 3), torch.randn(4, 3)
    unfit = torch.tensor([7, 7])  # wrong shape and range: not even looked at
    value = Objective("auto", 2.0, 1.0)(out, teacher_out, unfit, "batch 1")
    torch.testing.assert_close(value, distillation_loss(out, teacher_out, "kl", 2.0))


def test_a_float64_teacher_is_compared_in_the_students_float32():
    torch.manual_seed(0)
    out, teacher_out = torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)
    value = Objective("auto", 2.0, 0.5)(out, teacher_out, None, "batch 1")
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, distillation_loss(out, teacher_out.float(), "kl", 2.0))


class CountingTeacher(nn.Linear):
    """A teacher that counts its forward calls on itself (a copy would count on the copy)."""

    def __init__(self):
        super().__init__(3, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


LABELLED = [(torch.ones(2, 3), torch.tensor([0, 1]))] * 3


def test_the_teacher_given_runs_once_per_step():
    teacher = CountingTeacher()
    convsep.finetune(nn.Linear(3, 2), LABELLED, teacher=teacher, verbose=False)
    assert teacher.calls == 3


def test_with_alpha_0_the_teacher_is_not_run_on_labelled_batches():
    teacher = CountingTeacher()
    convsep.finetune(nn.Linear(3, 2), LABELLED, teacher=teacher, alpha=0.0, verbose=False)
    assert teacher.calls == 0


def test_a_loss_callable_gets_the_teachers_output_whatever_alpha():
    seen = []

    def record(out, teacher_out, targets):
        seen.append(teacher_out is not None)
        return out.square().mean()

    convsep.finetune(nn.Linear(3, 2), LABELLED, teacher=CountingTeacher(), alpha=0.0, loss=record, verbose=False)
    assert seen == [True, True, True]


def test_trainable_callable_gets_each_name_and_parameter_and_trains_what_it_selects():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    asked = []

    def second_weight(name, parameter):
        asked.append((name, tuple(parameter.shape)))
        return name == "2.weight"

    convsep.finetune(model, LABELLED, trainable=second_weight, verbose=False)
    assert asked == [("0.weight", (4, 3)), ("0.bias", (4,)), ("2.weight", (2, 4)), ("2.bias", (2,))]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"2.weight"}
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_parameters_get_no_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    convsep.finetune(model, LABELLED, trainable=lambda name, p: name.startswith("2."), verbose=False)
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert model[2].weight.grad is not None


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, affine=False),
                         nn.Flatten(), nn.Linear(4, 2))  # fmt: skip


IMAGES = [(torch.randn(4, 3, 5, 5) + 3.0, torch.tensor([0, 1, 0, 1]))]


def running_means(model):
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_trainable_all_updates_the_statistics_of_every_norm_even_one_without_parameters():
    model = bn_net()
    before = running_means(model)
    convsep.finetune(model, IMAGES, verbose=False)
    assert [not torch.equal(b, a) for b, a in zip(before, running_means(model))] == [True, True]


def test_a_partial_trainable_updates_the_statistics_of_exactly_the_norms_it_trains():
    model = bn_net()
    before = running_means(model)
    convsep.finetune(model, IMAGES, trainable=lambda name, p: name.startswith("1."), verbose=False)  # the first BN only
    assert [not torch.equal(b, a) for b, a in zip(before, running_means(model))] == [True, False]


def test_weight_decay_skips_depthwise_filters_of_pairs_and_plain_depthwise_convs_biases_and_norms():
    """With a zero gradient, AdamW moves a parameter only by its decay: exactly the decayed ones change."""
    torch.manual_seed(0)
    original = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),  # one input channel: converted, its pair's depthwise conv has groups=1
        nn.Conv2d(2, 2, 3, padding=1, groups=2),  # a plain depthwise conv with two channels
        nn.BatchNorm2d(2), nn.Conv2d(2, 4, 1),
    )  # fmt: skip
    model = convsep.convert(original, rank=1, include=["0"])
    assert model[0].depthwise.groups == 1
    before = {k: v.clone() for k, v in model.named_parameters()}
    zero = lambda out, teacher_out, targets: 0.0 * out.sum()  # noqa: E731
    convsep.finetune(model, [torch.randn(2, 1, 6, 6)], loss=zero, lr=0.1, weight_decay=0.5, verbose=False)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {"0.pointwise.weight", "3.weight"}


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x), self.b(x)


def test_a_parameter_without_gradient_in_a_step_is_not_moved_by_that_step():
    """Gradients are cleared to None before each step, so AdamW skips what the loss did not reach (no momentum drift)."""
    torch.manual_seed(0)
    model, used = TwoHeads(), iter(["a", "b"])
    after_step_1 = {}

    def one_head(out, teacher_out, targets):
        head = next(used)
        if head == "b":
            after_step_1.update({k: v.clone() for k, v in model.a.state_dict().items()})
        return out[0 if head == "a" else 1].square().mean()

    convsep.finetune(model, [torch.ones(2, 3)] * 2, loss=one_head, weight_decay=0.0, verbose=False)
    for name, value in model.a.state_dict().items():
        assert torch.equal(value, after_step_1[name]), name


def test_an_interrupted_step_leaves_no_gradients():
    model = nn.Linear(3, 2)
    calls = []

    def interrupt(parameter):
        calls.append(1)
        if len(calls) == 2:  # in the second step's backward pass, after the weight's gradient is in
            raise KeyboardInterrupt

    model.weight.register_post_accumulate_grad_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        convsep.finetune(model, [torch.ones(2, 3)] * 3, loss=lambda out, t, y: out.square().mean(), verbose=False)
    assert model.weight.grad is None and model.bias.grad is None


class InputsOnly:
    """A DataLoader of 1-tuples as batches of inputs alone (re-iterable, with len)."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return (inputs for (inputs,) in self.loader)


def test_the_epochs_over_a_shuffling_dataloader_see_the_orders_a_plain_loop_sees():
    x = torch.arange(8.0).reshape(8, 1).repeat(1, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=2, shuffle=True)
    seen = []

    class Spy(nn.Linear):
        def forward(self, x):
            seen.append(x[:, 0].tolist())
            return super().forward(x)

    model = Spy(3, 2)
    torch.manual_seed(3)
    expected = [inputs[:, 0].tolist() for _ in range(3) for inputs in InputsOnly(loader)]
    torch.manual_seed(3)
    convsep.finetune(model, InputsOnly(loader), epochs=3, loss=lambda out, t, y: out.square().mean(), verbose=False)
    assert seen == expected
