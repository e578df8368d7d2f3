"""convert()'s own wiring: argument errors, the plan it attaches, what it logs and prints, how it reads the data."""

import logging
import re
import sys

import pytest
import torch
from torch import nn

import convsep
from convsep import SeparableConv2d
from convsep.convert import rebuild
from convsep.plan import ConversionPlan, LayerDecision


def _two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))


def _batches(count):
    torch.manual_seed(1)
    return [torch.randn(2, 3, 8, 8) for _ in range(count)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"parametrized": "unfold"}, "parametrized='unfold' is not known: use one of 'fold', 'keep'"),
        ({"objective": "speed"}, "objective='speed' is not known: use one of 'macs', 'latency'"),
        ({"objective": "latency"}, "objective='latency' needs example_inputs: the timings depend on the input shape"),
        (
            {"objective": "latency", "budget": 0.5, "example_inputs": torch.randn(1, 3, 8, 8)},
            (
                "budget=0.5 and objective='latency' cannot be combined: the latency pass reverts layers, "
                "which would break the budget; use one of them"
            ),
        ),
    ],
)
def test_bad_settings_are_refused_with_the_whole_message(kwargs, message):
    with pytest.raises(convsep.ConvsepError) as info:
        convsep.convert(_two_convs(), **kwargs)
    assert str(info.value) == message


def test_plan_of_a_plain_conversion_records_version_and_no_budget_or_statistics():
    plan = convsep.convert(_two_convs(), rank=2).convsep_plan
    assert (plan.rank, plan.init, plan.path, plan.untraceable) == (2, "svd", "fx", {})
    assert plan.version == convsep.__version__
    assert plan.budget is None and plan.activations is None


def test_a_model_fx_cannot_trace_at_all_takes_the_module_tree_path():
    class ChecksItsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.b = nn.Conv2d(8, 8, 3)

        def forward(self, x):
            if x.shape[1] != 3:  # fx cannot trace this; the children are convs, so nothing else is traced
                raise ValueError("expects RGB")
            return self.b(self.a(x))

    plan = convsep.convert(ChecksItsInput()).convsep_plan
    assert plan.path == "module-tree"
    assert list(plan.untraceable) == ["<root>"]
    assert [d.name for d in plan.converted] == ["a", "b"]


def test_the_plan_summary_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="convsep.convert"):
        converted = convsep.convert(_two_convs())
    assert [r.getMessage() for r in caplog.records if r.name == "convsep.convert"] == [converted.convsep_plan.summary()]


def test_a_bare_conv_is_returned_as_its_pair():
    conv = nn.Conv2d(4, 8, 3)
    converted = convsep.convert(conv)
    assert isinstance(converted, SeparableConv2d)
    assert [(d.name, d.kind, d.converted, d.rank) for d in converted.convsep_plan.layers] == [("", "Conv2d", True, 1)]
    assert isinstance(conv, nn.Conv2d) and not hasattr(conv, "convsep_plan")


def test_verbose_calibration_prints_each_layers_error_then_the_summary(capsys):
    converted = convsep.convert(_two_convs(), calibration_data=_batches(2), verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(r"\d\.\d{4}", "E", line) for line in lines] == [
        "calibrated 0: relative output error E -> E",
        "calibrated 1: relative output error E -> E",
        *converted.convsep_plan.summary().splitlines(),
    ]


def test_calibration_batches_limits_the_batches_read_from_a_generator():
    drawn = []

    def batches():
        for batch in _batches(4):
            drawn.append(batch)
            yield batch

    convsep.convert(_two_convs(), init="activation", refit=False, calibration_data=batches(), calibration_batches=2)
    assert len(drawn) == 2


def test_calibration_batches_limits_the_statistics_gathered_from_a_list():
    kwargs = {"init": "activation", "refit": False}
    limited = convsep.convert(_two_convs(), calibration_data=_batches(3), calibration_batches=1, **kwargs)
    one = convsep.convert(_two_convs(), calibration_data=_batches(1), **kwargs)
    assert limited.convsep_plan.activations == one.convsep_plan.activations == {"ridge": 1e-3, "positions_seen": 24}
    assert [d.relative_error for d in limited.convsep_plan.converted] == [
        d.relative_error for d in one.convsep_plan.converted
    ]


def test_rank_that_saves_nothing_says_so_and_how_to_convert_anyway():
    plan = convsep.convert(nn.Sequential(nn.Conv2d(16, 4, 3)), rank=3).convsep_plan
    assert plan.layers[0].reason == (
        "rank 3 would not save MACs here (the pair saves only below rank 2.77); use rank='full' to convert anyway"
    )


def test_energy_rank_with_random_init_is_the_rank_svd_init_chooses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3))
    ranks = [convsep.convert(model, rank=0.5, init=init).convsep_plan.layers[0].rank for init in ("svd", "random")]
    assert ranks[0] == ranks[1] and 1 < ranks[0] < 9


def test_random_init_with_a_fixed_rank_computes_no_svd(monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("init='random' with an int rank needs no SVD")

    monkeypatch.setattr(sys.modules["convsep.convert"], "channel_svd", no_svd)
    plan = convsep.convert(_two_convs(), rank=2, init="random").convsep_plan
    assert [(d.converted, d.rank, d.relative_error) for d in plan.layers] == [(True, 2, None), (True, 2, None)]


def test_rebuild_names_the_layers_the_model_lacks():
    names = ["a", "b", "c", "d", "e", "f"]
    plan = ConversionPlan(layers=[LayerDecision(name=n, kind="Conv2d", converted=True, rank=1) for n in names])
    with pytest.raises(convsep.ConvsepError) as info:
        rebuild(_two_convs(), plan)
    assert str(info.value) == (
        "the conversion plan names layers this model does not have as convertible convs: a, b, c, d, e; "
        "was the checkpoint made from another architecture?"
    )
