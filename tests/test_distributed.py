"""Two real processes (gloo, CPU) against one: sharded work ends where one process on all the data ends.

Each job runs in tests/jobs.py under multiprocess.run_ranks, with a timeout, so a hang fails.
"""

import json
import sys
from pathlib import Path

import jobs
import pytest
import torch
from helpers import relative_error
from jobs import _student_and_teacher, batches, net
from multiprocess import run_command, run_ranks, succeeded

pytestmark = pytest.mark.slow

import convsep
from convsep.cli import main


def _results(folder, world=2):
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _errors(folder, world=2):
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


def _assert_bitwise_same(states):
    for key, value in states[0].items():
        assert all(torch.equal(value, other[key]) for other in states[1:]), key


def _assert_close(state, expected, tolerance):
    for key, value in expected.items():
        assert relative_error(state[key], value) < tolerance, key


def test_sharded_calibration_equals_one_process_on_all_batches(tmp_path):
    succeeded(run_ranks("calibrate_unequal_shards", tmp_path))
    results = _results(tmp_path)
    _assert_bitwise_same([r["state"] for r in results])

    model = net()
    data = [x[: 2 + i % 3] for i, (x, _) in enumerate(batches(5))]
    alone = convsep.calibrate(convsep.convert(model, rank=1), model, data, alternate=1)
    _assert_close(results[0]["state"], alone.state_dict(), 1e-4)
    calibration = results[0]["calibration"]
    assert (calibration["batches"], calibration["samples"]) == (5, sum(len(x) for x in data))
    for name, errors in alone.convsep_plan.calibration["layers"].items():  # the errors are the global ones
        assert calibration["layers"][name] == pytest.approx(errors, rel=1e-6)


def test_sharded_refit_of_kept_layers_equals_one_process_on_all_batches(tmp_path):
    succeeded(run_ranks("calibrate_kept_unequal_shards", tmp_path))
    results = _results(tmp_path)
    _assert_bitwise_same([r["state"] for r in results])

    model = net()
    data = [x[: 2 + i % 3] for i, (x, _) in enumerate(batches(5))]
    alone = convsep.calibrate(convsep.convert(model, rank=1, exclude=["2"]), model, data, alternate=1, refit_kept=True)
    _assert_close(results[0]["state"], alone.state_dict(), 1e-4)
    kept = results[0]["calibration"]["kept"]
    assert kept["2"]["refitted"] is True and kept["2"] == pytest.approx(alone.convsep_plan.calibration["kept"]["2"], rel=1e-6)
    assert kept["6"] == alone.convsep_plan.calibration["kept"]["6"]  # too few samples, counted over both processes
    assert kept["6"]["refitted"] is False
    assert not torch.equal(results[0]["state"]["2.weight"], model.state_dict()["2.weight"])


def test_sharded_calibration_at_once_equals_one_process_on_all_batches(tmp_path):
    succeeded(run_ranks("calibrate_at_once_unequal_shards", tmp_path))
    results = _results(tmp_path)
    _assert_bitwise_same([r["state"] for r in results])

    model = net()
    data = [x[: 2 + i % 3] for i, (x, _) in enumerate(batches(5))]
    alone = convsep.calibrate(convsep.convert(model, rank=1), model, data, alternate=1, sequential=False)
    _assert_close(results[0]["state"], alone.state_dict(), 1e-4)
    calibration = results[0]["calibration"]
    assert (calibration["batches"], calibration["samples"], calibration["sequential"]) == (5, len(torch.cat(data)), False)
    for name, errors in alone.convsep_plan.calibration["layers"].items():
        assert calibration["layers"][name] == pytest.approx(errors, rel=1e-6)


@pytest.mark.parametrize("sequential", [True, False])
def test_a_process_with_no_batches_gets_the_weights_of_the_others(tmp_path, sequential):
    succeeded(run_ranks("calibrate_empty_shard" if sequential else "calibrate_at_once_empty_shard", tmp_path))
    results = _results(tmp_path)
    _assert_bitwise_same([r["state"] for r in results])
    model = net()
    alone = convsep.calibrate(convsep.convert(model, rank=1), model, [x for x, _ in batches(3)], sequential=sequential)
    _assert_close(results[1]["state"], alone.state_dict(), 1e-4)
    assert results[1]["calibration"]["batches"] == 3


def test_a_bad_batch_on_one_process_stops_every_process_with_its_error(tmp_path):
    succeeded(run_ranks("calibrate_bad_batch_on_rank_1", tmp_path))
    failed, told = _errors(tmp_path)[::-1]
    assert failed["type"] == told["type"] == "InputShapeError"
    assert "calibration batch 2" in failed["message"]
    assert told["message"].startswith("rank 1: calibration batch 2")


@pytest.mark.parametrize("job", ["calibrate_different_models", "finetune_different_models"])
def test_processes_given_different_models_are_told_so(tmp_path, job):
    succeeded(run_ranks(job, tmp_path))
    for error in _errors(tmp_path):
        assert error["type"] == "ConvsepValueError" and "different models" in error["message"]
        assert "rank(s) 1 differ" in error["message"]


def _finetuned_alone(global_batches, **kwargs):
    student, teacher = _student_and_teacher()
    return convsep.finetune(student, global_batches, teacher=teacher, lr=1e-2, verbose=False, **kwargs).state_dict()


def _merged(pairs):
    """One process's batch for each step of two: both ranks' batches of that step, concatenated."""
    return [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in pairs]


def test_data_parallel_finetuning_equals_one_process_on_the_global_batches(tmp_path):
    succeeded(run_ranks("finetune_sharded", tmp_path))
    states = [r["state"] for r in _results(tmp_path)]
    _assert_bitwise_same(states)
    data = batches(6)
    alone = _finetuned_alone(_merged(zip(data[0::2], data[1::2])), epochs=2)
    _assert_close(states[0], alone, 1e-6)
    untrained, _ = _student_and_teacher()
    assert relative_error(states[0]["0.pointwise.weight"], untrained.state_dict()["0.pointwise.weight"]) > 1e-3


def test_a_sharded_run_killed_and_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(tmp_path):
    (tmp_path / "whole").mkdir(), (tmp_path / "resumed").mkdir()
    succeeded(run_ranks("finetune_sharded", tmp_path / "whole"))
    succeeded(run_ranks("finetune_sharded_killed_then_resumed", tmp_path / "resumed"))
    whole, resumed = _results(tmp_path / "whole"), _results(tmp_path / "resumed")
    _assert_bitwise_same([r["state"] for r in resumed] + [whole[0]["state"]])
    assert (tmp_path / "resumed" / "state.pt").exists()


def test_validation_keeps_the_same_best_state_on_every_rank_as_one_process(tmp_path):
    succeeded(run_ranks("finetune_validated", tmp_path))
    results = _results(tmp_path)
    _assert_bitwise_same([r["state"] for r in results])
    assert results[0]["finetune"] == results[1]["finetune"]  # the same numbers everywhere, so the same choice
    student, teacher = _student_and_teacher()
    data = batches(6)
    convsep.finetune(student, _merged(zip(data[0::2], data[1::2])), teacher=teacher, val_data=jobs.validation_batches(),
                     verbose=False, **jobs.VALIDATED)  # fmt: skip
    alone = student.convsep_plan.finetune
    assert results[0]["finetune"]["best_step"] == alone["best_step"] == 3
    assert [r["val_loss"] for r in results[0]["finetune"]["history"]] == pytest.approx([r["val_loss"] for r in alone["history"]], rel=1e-6)
    _assert_close(results[0]["state"], student.state_dict(), 1e-6)


def test_ranks_end_with_the_same_batch_norm_statistics(tmp_path):
    succeeded(run_ranks("finetune_with_batch_norm", tmp_path))
    states = [r["state"] for r in _results(tmp_path)]
    _assert_bitwise_same(states)
    assert int(states[0]["1.num_batches_tracked"]) == 2


def test_unequal_shards_train_the_steps_of_the_shortest(tmp_path):
    finished = succeeded(run_ranks("finetune_unequal_shards", tmp_path))
    states = [r["state"] for r in _results(tmp_path)]
    _assert_bitwise_same(states)
    data = batches(7)
    alone = _finetuned_alone(_merged(zip(data[0::2], data[1::2])))  # three steps, schedule over three
    _assert_close(states[0], alone, 1e-6)
    assert "3 to 4 batches: every process trains 3 steps" in finished[0].stderr


def test_a_nan_on_one_process_stops_every_process_with_the_same_error(tmp_path):
    succeeded(run_ranks("finetune_nan_on_rank_1", tmp_path))
    rank_0, rank_1 = _errors(tmp_path)
    assert rank_0["type"] == rank_1["type"] == "NonFiniteLossError"
    assert "step 2" in rank_1["message"] and rank_0["message"] == "rank 1: " + rank_1["message"].splitlines()[0]
    states = [r["state"] for r in _results(tmp_path)]
    _assert_bitwise_same(states)  # both keep the weights of step 1
    assert all(torch.isfinite(v).all() for v in states[0].values())


def test_a_nan_on_one_process_is_undone_on_every_process_as_in_one(tmp_path):
    succeeded(run_ranks("finetune_nan_on_rank_1_undone", tmp_path))
    states = [r["state"] for r in _results(tmp_path)]
    _assert_bitwise_same(states)
    data = jobs.batches_with_a_nan()
    _assert_close(states[0], _finetuned_alone(_merged(zip(data[0::2], data[1::2]))), 1e-6)


def test_a_batch_that_does_not_fit_on_rank_0_stops_rank_1_too(tmp_path):
    succeeded(run_ranks("finetune_bad_batch_on_rank_0", tmp_path))
    rank_0, rank_1 = _errors(tmp_path)
    assert rank_0["type"] == rank_1["type"] == "InputShapeError"
    assert rank_1["message"].startswith("rank 0: batch 2")


def test_latency_objective_and_report_use_rank_0s_timings_everywhere(tmp_path):
    succeeded(run_ranks("convert_for_latency", tmp_path))
    rank_0, rank_1 = _results(tmp_path)
    assert rank_0["plan"] == rank_1["plan"]  # reasons quote the timings, so they would differ otherwise
    assert rank_0["latency"] == rank_1["latency"]


# --- the CLI under torchrun ----------------------------------------------------------------------

JOBS = str(Path(jobs.__file__))


def _torchrun(*argv):
    return run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "convsep", *map(str, argv)])  # fmt: skip


@pytest.fixture
def original(tmp_path):
    torch.save(net().state_dict(), tmp_path / "model.pt")
    return tmp_path / "model.pt"


def test_cli_convert_under_torchrun_writes_what_one_process_writes(tmp_path, original):
    common = ["--model", f"{JOBS}:net", "--calibrate-with", f"{JOBS}:calibration_batches", "--input-shape", "1,3,8,8",
              "--init", "activation"]  # the input statistics are summed over the processes too  # fmt: skip
    finished = _torchrun("convert", original, "-o", tmp_path / "two.pt", *common)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.count("convsep report:") == 1  # the report, from rank 0 only
    assert main(["convert", str(original), "-o", str(tmp_path / "one.pt"), *common]) == 0
    two, one = (convsep.load(tmp_path / name) for name in ("two.pt", "one.pt"))
    _assert_close(two.state_dict, one.state_dict, 1e-4)
    assert two.plan.calibration["samples"] == one.plan.calibration["samples"] == sum(map(len, jobs.calibration_batches()))
    assert two.plan.init == "activation" and two.plan.activations == one.plan.activations
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "one.pt", "two.pt"]


def test_cli_convert_under_torchrun_fits_the_same_joint_pairs_as_one_process(tmp_path, original):
    common = ["--model", f"{JOBS}:net", "--calibrate-with", f"{JOBS}:more_calibration_batches", "--budget", "0.6",
              "--input-shape", "1,3,8,8", "--no-refit"]  # the joint pairs as fitted, nothing refitted after  # fmt: skip
    finished = _torchrun("convert", original, "-o", tmp_path / "two.pt", *common)
    assert finished.returncode == 0, finished.stderr
    assert main(["convert", str(original), "-o", str(tmp_path / "one.pt"), *common]) == 0
    two, one = (convsep.load(tmp_path / name) for name in ("two.pt", "one.pt"))
    joint = [[(d.name, d.joint_fit) for d in plan.converted] for plan in (two.plan, one.plan)]
    assert joint[0] == joint[1] and any(fit.startswith("fitted on the input moments") for _, fit in joint[0])
    _assert_close(two.state_dict, one.state_dict, 1e-6)


def test_cli_convert_with_a_budget_under_torchrun_allocates_and_writes_what_one_process_does(tmp_path, original):
    common = ["--model", f"{JOBS}:net", "--calibrate-with", f"{JOBS}:calibration_batches", "--input-shape", "1,3,8,8",
              "--budget", "0.6"]  # ranks by the error the refit leaves: cross-channel moments summed over the processes  # fmt: skip
    finished = _torchrun("convert", original, "-o", tmp_path / "two.pt", *common)
    assert finished.returncode == 0, finished.stderr
    assert main(["convert", str(original), "-o", str(tmp_path / "one.pt"), *common]) == 0
    two, one = (convsep.load(tmp_path / name) for name in ("two.pt", "one.pt"))
    assert two.plan.budget["allocated_by"] == "activations" and two.plan.budget == pytest.approx(one.plan.budget)
    assert [(d.name, d.rank) for d in two.plan.converted] == [(d.name, d.rank) for d in one.plan.converted]
    assert two.plan.converted and all(d.predicted_refit_error is not None for d in two.plan.converted)
    errors = [[d.predicted_refit_error for d in plan.converted] for plan in (two.plan, one.plan)]
    assert errors[0] == pytest.approx(errors[1], rel=1e-9)  # the same positions sampled, the same sums
    # ... so every process fits the same joint pairs, in the same rounds, as one process does.
    joint = [[d.joint_fit for d in plan.converted] for plan in (two.plan, one.plan)]
    assert two.plan.init == "joint" and joint[0] == joint[1] and all(joint[0])
    _assert_close(two.state_dict, one.state_dict, 1e-4)


def test_cli_finetune_under_torchrun_trains_on_both_shards(tmp_path, original):
    assert main(["convert", str(original), "-o", str(tmp_path / "sep.pt"), "--model", f"{JOBS}:net", "--rank", "2"]) == 0
    common = ["--teacher", str(original), "--model", f"{JOBS}:net", "--lr", "1e-2"]
    finished = _torchrun("finetune", tmp_path / "sep.pt", "-o", tmp_path / "two.pt", "--data", f"{JOBS}:training_batches", *common)
    assert finished.returncode == 0, finished.stderr
    one = ["finetune", str(tmp_path / "sep.pt"), "-o", str(tmp_path / "one.pt"), "--data", f"{JOBS}:merged_training_batches"]
    assert main(one + common) == 0
    two, one = (convsep.load(tmp_path / name) for name in ("two.pt", "one.pt"))
    _assert_close(two.state_dict, one.state_dict, 1e-6)


def test_cli_failure_on_one_process_is_one_error_line_and_no_file(tmp_path, original):
    assert main(["convert", str(original), "-o", str(tmp_path / "sep.pt"), "--model", f"{JOBS}:net"]) == 0
    finished = _torchrun("finetune", tmp_path / "sep.pt", "-o", tmp_path / "out.pt", "--teacher", original,
                         "--model", f"{JOBS}:net", "--data", f"{JOBS}:training_batches_bad_at_3")  # fmt: skip
    assert finished.returncode != 0
    assert finished.stderr.count("convsep: error:") == 1, finished.stderr  # rank 0 speaks for both
    assert "convsep: error: rank 1: batch 2: the model cannot run on inputs (4, 5, 8, 8)" in finished.stderr
    assert "warning" not in finished.stderr
    assert not (tmp_path / "out.pt").exists()
