"""`convsep finetune`: every option reaches finetune(), the files it refuses to overwrite, what it writes and says.

Complements the end-to-end finetune tests of test_cli.py with the values and lines that mutation
testing showed no test pinned down (issue #17). Most tests replace finetune() by a spy that
returns the model untrained: the CLI's part is the wiring, finetune's is tested on its own.
"""

import pytest
import torch

from cli_support import run, spec
import convsep
import convsep.cli
from convsep.models import small_cnn

FACTORIES = """
import torch
from convsep.models import small_cnn

def build():
    return small_cnn(width=4)

def batches():
    torch.manual_seed(1)
    return [torch.randn(8, 1, 28, 28) for _ in range(4)]

def labelled():
    torch.manual_seed(2)
    return [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
"""


@pytest.fixture
def work(tmp_path, capsys):
    """A folder with a factory and data file (nets.py), the original small_cnn(width=4) as in.pt and,
    converted from it at input shape 2,1,28,28, sep.pt."""
    (tmp_path / "nets.py").write_text(FACTORIES)
    torch.manual_seed(0)
    torch.save(small_cnn(width=4).eval().state_dict(), tmp_path / "in.pt")
    argv = ["convert", tmp_path / "in.pt", "-o", tmp_path / "sep.pt", "--model", spec(tmp_path)]
    code, _, err = run(argv + ["--input-shape", "2,1,28,28"], capsys)
    assert code == 0, err
    return tmp_path


def finetune_argv(folder, *extra, student="sep.pt", out="ft.pt"):
    return ["finetune", folder / student, "-o", folder / out, "--teacher", folder / "in.pt", "--model", spec(folder),
            "--data", spec(folder, "batches"), *extra]  # fmt: skip


@pytest.fixture
def spy(monkeypatch):
    """finetune() replaced by a spy: the options it was given, and the model returned as it came."""
    seen = {}

    def fake_finetune(model, data, **options):
        seen.update(options, data=data)
        return model

    monkeypatch.setattr(convsep.cli, "finetune", fake_finetune)
    return seen


def test_finetune_passes_validation_precision_and_training_state_options_on(work, capsys, spy):
    extra = ["--val-data", spec(work, "labelled"), "--val-every", "2", "--autocast", "bf16", "--save-every", "3"]
    extra += ["--training-state", work / "state.pt", "--warmup", "0.2", "--epochs", "2"]
    code, _, err = run(finetune_argv(work, *extra), capsys)
    assert code == 0, err
    assert [len(batch) for batch in spy["val_data"]] == [2, 2]  # (inputs, labels) pairs of labelled()
    assert {k: spy[k] for k in ("val_every", "autocast", "save_every", "save_state", "warmup", "epochs", "resume")} == {
        "val_every": 2, "autocast": "bf16", "save_every": 3, "save_state": str(work / "state.pt"), "warmup": 0.2,
        "epochs": 2, "resume": None,
    }  # fmt: skip
    assert err.splitlines()[-1] == f"convsep: wrote {work / 'ft.pt'} (training state: {work / 'state.pt'})"


def test_finetune_resume_continues_in_the_training_state_it_resumes(work, capsys, spy):
    (work / "state.pt").write_bytes(b"the state of a killed run")  # finetune() (a spy here) reads it
    code, _, err = run(finetune_argv(work, "--resume", work / "state.pt"), capsys)
    assert code == 0, err
    assert (spy["resume"], spy["save_state"]) == (str(work / "state.pt"), str(work / "state.pt"))


def test_finetune_keeps_the_input_shape_recorded_at_conversion(work, capsys, spy):
    code, _, err = run(finetune_argv(work), capsys)
    assert code == 0, err
    assert convsep.load(work / "ft.pt").input_shape == (2, 1, 28, 28)


def test_finetune_force_replaces_an_existing_output_and_training_state(work, capsys, spy):
    (work / "ft.pt").write_bytes(b"an earlier result")
    (work / "ft.pt.training.pt").write_bytes(b"an earlier training state")
    code, _, err = run(finetune_argv(work, "--force"), capsys)
    assert code == 0, err
    assert convsep.load(work / "ft.pt").plan.to_dict() == convsep.load(work / "sep.pt").plan.to_dict()


@pytest.mark.parametrize(
    "extra, out, says",
    [
        ([], "sep.pt", "the output {w}/sep.pt is the input {w}/sep.pt: write the output"),
        ([], "in.pt", "the output {w}/in.pt is the teacher {w}/in.pt: write the output"),
        (
            ["--training-state", "in.pt"],
            "ft.pt",
            "the training state {w}/in.pt is the teacher {w}/in.pt: write the training state",
        ),
        (
            ["--training-state", "sep.pt"],
            "ft.pt",
            "the training state {w}/sep.pt is the input {w}/sep.pt: write the training state",
        ),
        (
            ["--training-state", "ft.pt"],
            "ft.pt",
            "the training state {w}/ft.pt is the output {w}/ft.pt: write the training state",
        ),
    ],
    ids=["OUT is the student", "OUT is the teacher", "state is the teacher", "state is the student", "state is OUT"],
)
def test_finetune_never_writes_over_its_inputs_even_with_force(extra, out, says, work, capsys, spy):
    extra = [work / e if e.endswith(".pt") else e for e in extra]
    contents = {name: (work / name).read_bytes() for name in ("in.pt", "sep.pt")}
    code, _, err = run(finetune_argv(work, *extra, "--force", out=out), capsys)
    assert code == 1 and spy == {}
    assert err == f"convsep: error: {says.format(w=work)} to another file\n"
    assert {name: (work / name).read_bytes() for name in contents} == contents


def test_finetune_reads_a_pickled_student_and_teacher_with_trust_pickle(work, capsys, spy):
    original = small_cnn(width=4).eval()
    original.load_state_dict(torch.load(work / "in.pt", weights_only=True))
    torch.save(original, work / "whole.pt")
    torch.save(convsep.convert(original), work / "whole_sep.pt")
    argv = ["finetune", work / "whole_sep.pt", "-o", work / "ft.pt", "--teacher", work / "whole.pt", "--trust-pickle"]
    code, _, err = run(argv + ["--data", spec(work, "batches")], capsys)
    assert code == 0, err
    assert type(spy["teacher"]) is type(original) and len(convsep.load(work / "ft.pt").plan.converted) == 4


def test_finetune_val_data_errors_name_the_val_data_option(work, capsys, spy):
    code, _, err = run(finetune_argv(work, "--val-data", "no-colon-here"), capsys)
    assert code == 1 and spy == {}
    assert err == (
        "convsep: error: --val-data 'no-colon-here' is neither a folder nor an import string like "
        "package.module:callable or path/to/file.py:callable\n"
    )


def test_finetune_of_an_unconverted_checkpoint_writes_it_without_a_validation_note(work, capsys, spy):
    code, _, err = run(finetune_argv(work, student="in.pt"), capsys)
    assert code == 0, err
    assert err == f"convsep: wrote {work / 'ft.pt'} (training state: {work / 'ft.pt'}.training.pt)\n"
    assert not convsep.load(work / "ft.pt").converted


def test_finetune_notes_the_first_and_last_validation_loss_and_the_step_it_kept(work, capsys):
    code, _, err = run(
        finetune_argv(work, "--val-data", spec(work, "labelled"), "--epochs", "2", "--lr", "3e-3"), capsys
    )
    assert code == 0, err
    record = convsep.load(work / "ft.pt").plan.finetune
    losses = [row["val_loss"] for row in record["history"]]
    assert len({f"{loss:.4f}" for loss in losses}) == 3  # three evaluations, told apart at the precision shown
    assert err.splitlines()[-2:] == [
        (
            f"convsep: validation loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
            f"kept step {record['best_step']} (validation loss {record['best_val_loss']:.4f})"
        ),
        f"convsep: wrote {work / 'ft.pt'} (training state: {work / 'ft.pt'}.training.pt)",
    ]
