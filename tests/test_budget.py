import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import convsep
from convsep.budget import (
    KEEP,
    LayerOptions,
    _lower_hull,
    allocate,
    brute_force,
    cheapest_cost,
    greedy,
    options_from_spectrum,
    rounded_optimum,
    spectrum_errors,
)
from convsep.factorize import channel_svd, discarded_energy_fraction
from convsep.models import small_cnn
from helpers import assert_bitwise_equal, snapshot


def macs(model, x):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2


def params(model):
    return sum(p.numel() for p in model.parameters())


# --- pure maths -----------------------------------------------------------------------------


def test_options_list_the_ranks_that_save_and_their_squared_relative_errors():
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3)
    S = channel_svd(weight, 1).S  # full rank min(6, 9) = 6
    options = options_from_spectrum(S, keep_cost=100, cost_per_rank=30)
    assert options.rank_costs == (30, 60, 90)  # rank 4 would cost 120 > 100
    for r, error in enumerate(options.rank_errors, start=1):
        assert error == pytest.approx(discarded_energy_fraction(S, r), rel=1e-6)
    assert options.choices()[0] == (100, 0.0, KEEP)


def test_lower_hull_drops_options_that_a_mix_of_others_beats():
    layer = LayerOptions(keep_cost=10, rank_costs=(2, 4, 6), rank_errors=(0.9, 0.85, 0.1))
    hull = _lower_hull(layer.choices())
    assert [choice for _, _, choice in hull] == [1, 3, KEEP]  # rank 2 lies above the segment 1 -> 3


def layer_options():
    """A layer: keep cost, cost per rank, and a descending spectrum of energies."""
    return st.tuples(
        st.integers(5, 60),
        st.integers(1, 20),
        st.lists(st.floats(0.01, 10.0), min_size=1, max_size=6).map(lambda e: sorted(e, reverse=True)),
    ).map(_options)


def _options(spec):
    keep_cost, per_rank, energies = spec
    S = torch.tensor(energies, dtype=torch.float64).sqrt().unsqueeze(0)
    return options_from_spectrum(S, keep_cost, per_rank)


def _largest_hull_step(layers):
    steps = [0.0]
    for layer in layers:
        hull = _lower_hull(layer.choices())
        steps += [hull[i][1] - hull[i + 1][1] for i in range(len(hull) - 1)]
    return max(steps)


@settings(max_examples=200, deadline=None)
@given(st.lists(layer_options(), min_size=1, max_size=4), st.floats(0.0, 1.0))
def test_greedy_is_feasible_and_within_one_hull_step_of_the_optimum(layers, share):
    low, high = cheapest_cost(layers), sum(layer.keep_cost for layer in layers)
    available = low + share * (high - low)
    found = greedy(layers, available)
    exact = brute_force(layers, available)
    assert found.cost <= available
    assert exact.error <= found.error + 1e-12
    assert found.error <= exact.error + _largest_hull_step(layers) + 1e-12
    assert found.error == pytest.approx(sum(layer.error_of(c) for layer, c in zip(layers, found.choices)))


@settings(max_examples=200, deadline=None)
@given(st.lists(layer_options(), min_size=1, max_size=4), st.floats(0.0, 1.0), st.sampled_from([16, 64, 4096]))
def test_allocation_beats_greedy_and_the_optimum_of_a_budget_short_by_the_rounding(layers, share, resolution):
    low, high = cheapest_cost(layers), sum(layer.keep_cost for layer in layers)
    available = low + share * (high - low)
    chosen = allocate(layers, available, resolution)
    assert chosen.cost <= available
    assert chosen.error <= greedy(layers, available).error + 1e-12
    assert brute_force(layers, available).error <= chosen.error + 1e-12
    # Rounding each cost up wastes under one step per layer, so every answer that leaves that much unused is matched.
    shorter = available - len(layers) * available / resolution
    if shorter >= low:
        assert chosen.error <= brute_force(layers, shorter).error + 1e-12


def _hull_segments_by_gain(layers):
    """(cost of the segment, layer, step) in the order of most error removed per unit of cost."""
    hulls = [_lower_hull(layer.choices()) for layer in layers]
    segments = [
        ((hulls[i][s][1] - hulls[i][s + 1][1]) / (hulls[i][s + 1][0] - hulls[i][s][0]), i, s)
        for i in range(len(hulls))
        for s in range(len(hulls[i]) - 1)
    ]
    segments.sort(key=lambda segment: (-segment[0], segment[1], segment[2]))
    return [(hulls[i][s + 1][0] - hulls[i][s][0], i, s) for _, i, s in segments], sum(h[0][0] for h in hulls)


@settings(max_examples=200, deadline=None)
@given(st.lists(layer_options(), min_size=1, max_size=4), st.floats(0.0, 1.0))
def test_greedy_is_the_exact_optimum_at_a_budget_its_best_segments_fill_exactly(layers, share):
    # There the relaxation over the convex hulls has an integral optimum, so no allocation beats it.
    segments, available = _hull_segments_by_gain(layers)
    for extra, _, _ in segments[: round(share * len(segments))]:
        available += extra
    found = greedy(layers, available)
    assert found.cost <= available
    assert found.error == pytest.approx(brute_force(layers, available).error, rel=1e-12, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(layer_options(), min_size=1, max_size=4), st.floats(0.0, 1.0))
def test_rounded_optimum_is_the_exact_optimum_when_one_step_is_one_unit_of_integer_costs(layers, share):
    low, high = cheapest_cost(layers), sum(layer.keep_cost for layer in layers)
    available = round(low + share * (high - low))  # layer_options() costs are integers
    found = rounded_optimum(layers, available, resolution=available)
    exact = brute_force(layers, available)
    assert found.cost <= available
    assert found.error == pytest.approx(exact.error, rel=1e-12, abs=1e-12)
    assert found.error == pytest.approx(sum(layer.error_of(c) for layer, c in zip(layers, found.choices)), rel=1e-12)


def test_rounded_optimum_of_nothing_to_spend_or_no_layers_is_none():
    layers = [_options((40, 12, [5.0, 2.0]))]
    assert rounded_optimum(layers, 0.0) is None and rounded_optimum([], 10.0) is None
    assert rounded_optimum(layers, 11.0, resolution=11) is None  # even rank 1 (12) does not fit


def test_greedy_spends_what_the_hull_leaves_on_an_option_off_the_hull_that_fits_exactly():
    # (40, 0.3) lies above the hull from (10, 0.5) to (60, 0.1); with 40 to spend the hull's next point does not fit.
    # Relative errors are below 1, and so is every gain the leftover can make.
    layer = LayerOptions(keep_cost=100, rank_costs=(10, 40, 60), rank_errors=(0.5, 0.3, 0.1))
    assert [point[:2] for point in _lower_hull(layer.choices())] == [(10, 0.5), (60, 0.1), (100, 0.0)]
    found = greedy([layer], 40)
    assert (found.choices, found.cost, found.error) == ([2], 40, 0.3)


def test_greedy_takes_segments_by_error_removed_per_unit_of_cost():
    # a: 20 for 20 more (1.0 per unit); b and c: 15 for 10 more (1.5 each). 20 to spend: b and c, not a.
    a = LayerOptions(keep_cost=21, rank_costs=(1,), rank_errors=(20.0,))
    b = c = LayerOptions(keep_cost=40, rank_costs=(30,), rank_errors=(15.0,))
    found = greedy([a, b, c], cheapest_cost([a, b, c]) + 20)
    assert (found.choices, found.cost, found.error) == ([1, KEEP, KEEP], 81, 20.0)


def test_allocation_finds_the_optimum_greedy_misses_when_its_resolution_can_see_it():
    # Greedy keeps b (the better ratio) and then cannot afford a; keeping a and converting b removes more.
    a = LayerOptions(keep_cost=100, rank_costs=(10,), rank_errors=(10.0,))
    b = LayerOptions(keep_cost=60, rank_costs=(10,), rank_errors=(9.0,))
    assert (greedy([a, b], 111).choices, greedy([a, b], 111).error) == ([1, KEEP], 10.0)
    found = allocate([a, b], 111)
    assert (found.choices, found.cost, found.error) == ([KEEP, 1], 110, 9.0)
    coarse = allocate([a, b], 111, resolution=2)  # 55.5 per step: a kept (2 steps) and b (1) no longer fit together
    assert (coarse.choices, coarse.error) == ([1, KEEP], 10.0)


def test_spectrum_errors_are_the_energy_share_each_rank_leaves_out_over_all_channels():
    S = torch.tensor([[0.3, 0.1, 0.0], [0.2, 0.2, 0.1]], dtype=torch.float64)  # a kernel whose total energy (0.19) is below 1
    errors = spectrum_errors(S)
    assert errors == pytest.approx([1 - 0.13 / 0.19, 1 - 0.18 / 0.19, 0.0], abs=1e-12)


def test_spectrum_errors_of_a_zero_kernel_are_zero_at_every_rank():
    assert spectrum_errors(torch.zeros(4, 3)) == [0.0, 0.0, 0.0]


def test_greedy_is_exact_at_both_ends():
    layers = [_options((40, 12, [5.0, 2.0, 1.0, 0.5])), _options((30, 11, [3.0, 3.0, 0.1]))]
    everything = allocate(layers, sum(layer.keep_cost for layer in layers))
    assert everything.choices == [KEEP, KEEP] and everything.error == 0
    tightest = allocate(layers, cheapest_cost(layers))
    assert tightest.choices == [1, 1]
    with pytest.raises(ValueError, match="cheapest"):
        allocate(layers, cheapest_cost(layers) - 1)


# --- through convert ------------------------------------------------------------------------


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return small_cnn(width=8).eval(), torch.randn(2, 1, 28, 28)


@pytest.mark.parametrize("budget", [0.25, 0.35, 0.5, 0.8])
def test_macs_budget_holds_for_the_whole_model(cnn, budget):
    model, x = cnn
    before = snapshot(model)
    converted = convsep.convert(model, budget=budget, example_inputs=x)
    assert macs(converted, x) <= budget * macs(model, x)
    record = converted.convsep_plan.budget
    assert record["on"] == "macs" and record["original"] == macs(model, x)
    assert record["reached"] == pytest.approx(macs(converted, x) / macs(model, x))
    assert_bitwise_equal(before, model)


@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_params_budget_needs_no_inputs(cnn, budget):
    model, _ = cnn
    converted = convsep.convert(model, budget=budget, budget_on="params")
    assert params(converted) <= budget * params(model)
    assert converted.convsep_plan.budget["reached"] == pytest.approx(params(converted) / params(model))


def test_budget_choice_is_close_to_the_exhaustive_optimum_on_a_small_model(cnn):
    """The choice convert makes, priced independently from the model's shapes and spectra."""
    model, x = cnn
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    total = macs(model, x)
    positions = {}
    for name, conv in convs:  # output positions of each conv, from its output shape
        out = []
        handle = conv.register_forward_hook(lambda m, i, o: out.append(o.shape[0] * o.shape[2] * o.shape[3]))
        with torch.no_grad():
            model(x)
        handle.remove()
        positions[name] = out[0]
    layers = []
    for name, conv in convs:
        n, m, k = conv.out_channels, conv.in_channels, 9
        S = channel_svd(conv.weight, 1).S
        layers.append(options_from_spectrum(S, n * m * k * positions[name], (m * k + n * m) * positions[name]))
    fixed = total - sum(layer.keep_cost for layer in layers)
    for budget in (0.25, 0.5):
        exact = brute_force(layers, budget * total - fixed)
        plan = convsep.convert(model, budget=budget, example_inputs=x).convsep_plan
        chosen = {d.name: d.rank for d in plan.layers}
        error = sum(layer.error_of(chosen[name]) for layer, (name, _) in zip(layers, convs))
        assert plan.budget["error"] == pytest.approx(error, rel=1e-5)
        assert exact.error <= error + 1e-9
        assert error <= exact.error + _largest_hull_step(layers) + 1e-9


def test_budget_that_cannot_be_met_names_the_smallest_reachable_share(cnn):
    model, x = cnn
    with pytest.raises(convsep.ConvsepValueError, match=r"budget=0.05 cannot be met.*smallest reachable budget is") as info:
        convsep.convert(model, budget=0.05, example_inputs=x)
    smallest = float(str(info.value).split("smallest reachable budget is ")[1].split(";")[0])
    converted = convsep.convert(model, budget=smallest, example_inputs=x)
    assert all(d.rank in (None, 1) for d in converted.convsep_plan.layers)
    assert macs(converted, x) <= smallest * macs(model, x)


def test_budget_of_one_keeps_every_layer(cnn):
    model, x = cnn
    plan = convsep.convert(model, budget=1.0, example_inputs=x).convsep_plan
    assert not plan.converted and all("budget=1.0 of MACs is spent" in d.reason or "no rank" in d.reason for d in plan.layers)


def test_overrides_keep_their_rank_and_count_at_their_cost(cnn):
    model, x = cnn
    converted = convsep.convert(model, budget=0.4, example_inputs=x, ranks={"3.0": 2})
    ranks = {d.name: d.rank for d in converted.convsep_plan.layers}
    assert ranks["3.0"] == 2
    assert macs(converted, x) <= 0.4 * macs(model, x)


def test_layer_that_does_not_run_is_kept_with_its_reason():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(8, 16, 3, padding=1)
            self.unused = nn.Conv2d(8, 16, 3, padding=1)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    plan = convsep.convert(Branchy(), budget=0.5, example_inputs=torch.randn(1, 8, 6, 6)).convsep_plan
    reasons = {d.name: d.reason for d in plan.layers}
    assert "did not run on example_inputs" in reasons["unused"]
    assert "used" in {d.name for d in plan.converted}


def test_shared_conv_counts_every_call():
    from zoo import SharedConvNet

    torch.manual_seed(0)
    model, x = SharedConvNet().eval(), torch.randn(1, 4, 10, 10)
    converted = convsep.convert(model, budget=0.6, example_inputs=x)
    assert macs(converted, x) <= 0.6 * macs(model, x)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"budget": 0}, ValueError, r"budget=0 must lie in \(0, 1\]"),
        ({"budget": 1.5}, ValueError, "budget=1.5"),
        ({"budget": -0.1}, ValueError, "budget=-0.1"),
        ({"budget": "0.3"}, TypeError, "budget='0.3'"),
        ({"budget": True}, TypeError, "budget=True"),
        ({"budget": 0.3, "budget_on": "flops", "example_inputs": torch.randn(1, 3, 8, 8)}, ValueError, "'flops'"),
        ({"budget_on": "latency"}, ValueError, "budget_on='latency'"),
        ({"budget": 0.3}, ValueError, "needs example_inputs"),
        ({"budget": 0.3, "rank": 2, "example_inputs": torch.randn(1, 3, 8, 8)}, ValueError, "rank=2 and budget=0.3"),
        ({"budget": 0.5, "example_inputs": torch.randn(1, 5, 8, 8)}, convsep.InputShapeError, r"\(1, 5, 8, 8\)"),
        ({"budget": 0.5, "objective": "latency", "example_inputs": torch.randn(1, 3, 8, 8)}, ValueError, "cannot be combined"),
        ({"rank": 1.0}, ValueError, r"rank=1.0 .* \(0, 1\)"),
        ({"rank": 0.0}, ValueError, "rank=0.0"),
    ],
)
def test_bad_budget_arguments_are_refused_and_the_model_untouched(kwargs, error, match):
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        convsep.convert(model, inplace=True, **kwargs)
    assert isinstance(info.value, convsep.ConvsepError)
    assert_bitwise_equal(before, model)
    assert isinstance(model[0], nn.Conv2d)


# --- energy ranks (rank=0.9) --------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.97])
def test_energy_rank_is_the_smallest_rank_keeping_the_fraction(fraction):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(6, 64, 3))  # full rank 9, break-even 64*9/73 = 7.9
    decision = convsep.convert(model, rank=fraction).convsep_plan.layers[0]
    S = channel_svd(model[0].weight, 1).S
    kept = [1 - discarded_energy_fraction(S, r) for r in range(1, 10)]
    smallest = next(r for r, share in enumerate(kept, start=1) if share >= fraction - 1e-6)
    if smallest < 64 * 9 / 73:
        assert decision.converted and decision.rank == smallest
        assert decision.relative_error == pytest.approx(math.sqrt(1 - kept[smallest - 1]), rel=1e-5)
    else:
        assert not decision.converted and "would not save MACs" in decision.reason


def test_energy_rank_met_exactly_by_a_share_takes_that_rank():
    from convsep.ranks import rank_for_energy

    equal = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # each value holds a quarter of the energy
    assert [rank_for_energy(equal, f) for f in (0.25, 0.5, 0.75, 0.7500001, 1.0)] == [1, 2, 3, 3, 4]
    assert rank_for_energy(equal.double(), 0.5) == 2


def test_energy_rank_of_a_zero_kernel_is_one():
    from convsep.ranks import rank_for_energy

    assert rank_for_energy(torch.zeros(3, 4), 0.9) == 1
    model = nn.Sequential(nn.Conv2d(6, 64, 3))
    with torch.no_grad():
        model[0].weight.zero_()
    assert convsep.convert(model, rank=0.9).convsep_plan.layers[0].rank == 1


def test_budget_measures_functional_convs_too():
    from zoo import FunctionalConvNet

    torch.manual_seed(0)
    model, x = FunctionalConvNet().eval(), torch.randn(1, 3, 12, 12)
    converted = convsep.convert(model, budget=0.5, example_inputs=x)
    assert macs(converted, x) <= 0.5 * macs(model, x)
    assert converted.convsep_plan.budget["reached"] == pytest.approx(macs(converted, x) / macs(model, x))


# --- command-line text (for --rank, --rank-for) ------------------------------------------------


@pytest.mark.parametrize("text, expected", [("1", 1), (" 3 ", 3), ("full", "full"), ("0.9", 0.9), (".5", 0.5)])
def test_rank_text_parses(text, expected):
    from convsep.ranks import parse_rank

    assert parse_rank(text) == expected and type(parse_rank(text)) is type(expected)


@pytest.mark.parametrize("text, match", [("half", "'half' is not a rank"), ("0", "--rank=0"), ("1.0", "--rank=1.0"), ("-0.5", "-0.5")])
def test_bad_rank_text_is_refused(text, match):
    from convsep.ranks import parse_rank

    with pytest.raises(convsep.ConvsepValueError, match=match):
        parse_rank(text)


def test_rank_override_text_parses_and_feeds_convert():
    from convsep.ranks import parse_rank_override

    assert parse_rank_override("layer3.*=2") == ("layer3.*", 2)
    assert parse_rank_override("stem.conv=full") == ("stem.conv", "full")
    assert parse_rank_override("a=b=0.8") == ("a=b", 0.8)
    for bad, match in (("layer3", "GLOB=RANK"), ("=2", "GLOB=RANK"), ("x=0", "--rank-for x=0")):
        with pytest.raises(convsep.ConvsepValueError, match=match):
            parse_rank_override(bad)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    plan = convsep.convert(model, ranks=dict(map(parse_rank_override, ["1=2", "0=full"]))).convsep_plan
    assert {d.name: d.rank for d in plan.layers} == {"0": 9, "1": 2}
