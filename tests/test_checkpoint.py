import os
import stat
import sys

import pytest
import torch
from torch import nn

import convsep
from convsep.checkpoint import check_destination, load_weights
from helpers import assert_bitwise_equal, snapshot
from zoo import ARCHITECTURES, SharedConvNet

FORMATS = [".pt", ".safetensors"]
# The odd architectures and one residual net; the other classic families add nothing here but time.
ROUND_TRIP = ["resnet18", "small_cnn", "functional", "nested_functional", "shared", "untraceable", "subclass", "mixed_dims"]


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3)).eval()


def files_in(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_is_bitwise(name, suffix, tmp_path):
    torch.manual_seed(0)
    factory, shape = ARCHITECTURES[name]
    model, x = factory().eval(), torch.randn(shape)
    converted = convsep.convert(model, rank=2)
    path = tmp_path / f"{name}{suffix}"
    convsep.save(converted, path)
    template = ARCHITECTURES[name][0]().eval()  # other weights: everything must come from the file
    before = snapshot(template)
    loaded = convsep.load(path, model=template)
    assert_bitwise_equal(before, template)  # the template is not modified
    assert str(loaded) == str(converted)
    assert loaded.convsep_plan.to_dict() == converted.convsep_plan.to_dict()
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


@pytest.mark.parametrize("suffix", FORMATS)
def test_load_without_model_returns_state_dict_and_plan(suffix, tmp_path):
    converted = convsep.convert(small_net(), rank=1)
    path = tmp_path / f"net{suffix}"
    convsep.save(converted, path, input_shape=(1, 3, 8, 8))
    checkpoint = convsep.load(path)
    assert isinstance(checkpoint, convsep.Checkpoint)
    assert checkpoint.kind == "convsep" and checkpoint.converted and checkpoint.module is None
    assert checkpoint.version == convsep.__version__
    assert checkpoint.input_shape == (1, 3, 8, 8)
    assert checkpoint.plan.to_dict() == converted.convsep_plan.to_dict()
    expected = converted.state_dict()
    assert sorted(checkpoint.state_dict) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(checkpoint.state_dict[key], value), key
    rebuilt = checkpoint.build(small_net())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), converted(x))


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize(
    "given, recorded",
    [
        ((1, 3, 8, 8), (1, 3, 8, 8)),
        (torch.Size([2, 3, 8, 8]), (2, 3, 8, 8)),
        ([[1, 3, 8, 8], [1, 5]], ((1, 3, 8, 8), (1, 5))),  # a model with two inputs
        (None, None),
    ],
)
def test_input_shapes_are_recorded_for_one_input_or_several(suffix, given, recorded, tmp_path):
    convsep.save(small_net(), tmp_path / f"net{suffix}", input_shape=given)
    assert convsep.load(tmp_path / f"net{suffix}").input_shape == recorded


@pytest.mark.parametrize("bad", ["1,3,8,8", (0, 3), (1.5, 3), (True, 3), [[1, 3], []], 5])
def test_a_bad_input_shape_is_refused_before_anything_is_written(bad, tmp_path):
    with pytest.raises(convsep.ConvsepValueError, match="is not an input shape"):
        convsep.save(small_net(), tmp_path / "net.pt", input_shape=bad)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_input_shape_in_a_checkpoint_is_named(tmp_path):
    convsep.save(small_net(), tmp_path / "net.pt", input_shape=(1, 3, 8, 8))
    content = torch.load(tmp_path / "net.pt", weights_only=True)
    content["input_shape"] = ["one", 3]
    torch.save(content, tmp_path / "net.pt")
    with pytest.raises(convsep.CheckpointError, match=r"damaged convsep checkpoint: its input shape is \['one', 3\]"):
        convsep.load(tmp_path / "net.pt")


def test_pt_checkpoint_is_a_plain_dict_that_loads_with_weights_only(tmp_path):
    converted = convsep.convert(small_net(), rank=1)
    convsep.save(converted, tmp_path / "net.pt")
    content = torch.load(tmp_path / "net.pt", weights_only=True)
    assert content["convsep_version"] == convsep.__version__
    assert convsep.ConversionPlan.from_json(content["plan"]).to_dict() == converted.convsep_plan.to_dict()
    assert set(content["state_dict"]) == set(converted.state_dict())


def test_safetensors_checkpoint_keeps_the_plan_in_its_metadata(tmp_path):
    from safetensors import safe_open

    converted = convsep.convert(small_net(), rank=1)
    convsep.save(converted, tmp_path / "net.safetensors")
    with safe_open(str(tmp_path / "net.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert convsep.ConversionPlan.from_json(metadata["convsep_plan"]).to_dict() == converted.convsep_plan.to_dict()
    assert metadata["convsep_version"] == convsep.__version__


def test_shared_module_is_stored_once_in_safetensors_and_loads_back(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = SharedConvNet().eval()
    convsep.save(model, tmp_path / "shared.safetensors")
    stored = load_file(str(tmp_path / "shared.safetensors"))
    assert "conv.weight" in stored and "alias.weight" not in stored
    loaded = convsep.load(tmp_path / "shared.safetensors", model=SharedConvNet())
    assert loaded.alias is loaded.conv
    assert_bitwise_equal(snapshot(model), loaded)


def test_unconverted_model_saves_and_loads_as_a_copy(tmp_path):
    model = small_net()
    convsep.save(model, tmp_path / "plain.pt")
    checkpoint = convsep.load(tmp_path / "plain.pt")
    assert checkpoint.kind == "convsep" and checkpoint.plan is None and not checkpoint.converted
    loaded = convsep.load(tmp_path / "plain.pt", model=nn.Sequential(*small_net()))
    assert_bitwise_equal(snapshot(model), loaded)
    assert loaded is not model


def test_conversion_resumes_from_a_checkpoint(tmp_path):
    model = small_net()
    first = convsep.convert(model, rank=1, include="0")
    convsep.save(first, tmp_path / "first.pt")
    resumed = convsep.load(tmp_path / "first.pt", model=small_net())
    second = convsep.convert(resumed, rank=1)
    assert [d.name for d in second.convsep_plan.converted] == ["0", "3"]
    convsep.save(second, tmp_path / "second.pt")
    reloaded = convsep.load(tmp_path / "second.pt", model=small_net())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(x), second(x))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "step": 10},
        lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"lr": 0.1}},
    ],
    ids=["plain", "state_dict", "model", "model_state_dict"],
)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_reads_user_state_dicts_and_wrappers(wrap, suffix, tmp_path):
    model = small_net()
    torch.save(wrap(model.state_dict()), tmp_path / f"user{suffix}")
    checkpoint = convsep.load(tmp_path / f"user{suffix}")
    assert checkpoint.kind == "state_dict" and checkpoint.plan is None
    assert_bitwise_equal(snapshot(model), convsep.load(tmp_path / f"user{suffix}", model=small_net()))


def test_reads_a_user_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    model = small_net()
    save_file(model.state_dict(), str(tmp_path / "user.safetensors"))
    assert convsep.load(tmp_path / "user.safetensors").kind == "state_dict"
    assert_bitwise_equal(snapshot(model), convsep.load(tmp_path / "user.safetensors", model=small_net()))


def test_kind_is_told_by_content_not_by_name(tmp_path):
    from safetensors.torch import save_file

    model = small_net()
    save_file(model.state_dict(), str(tmp_path / "weights.pt"))
    torch.save(model.state_dict(), tmp_path / "weights.safetensors")
    for name in ("weights.pt", "weights.safetensors"):
        assert_bitwise_equal(snapshot(model), convsep.load(tmp_path / name, model=small_net()))


def test_pickled_module_needs_trust_pickle(tmp_path):
    torch.manual_seed(0)
    model = SharedConvNet().eval()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(convsep.CheckpointError, match=r"pickled Python objects \(zoo.SharedConvNet\).*trust_pickle"):
        convsep.load(tmp_path / "whole.pt")
    checkpoint = convsep.load(tmp_path / "whole.pt", trust_pickle=True)
    assert checkpoint.kind == "module" and isinstance(checkpoint.module, SharedConvNet)
    assert_bitwise_equal(snapshot(model), checkpoint.module)
    assert_bitwise_equal(snapshot(model), convsep.load(tmp_path / "whole.pt", SharedConvNet(), trust_pickle=True))


def test_pickled_converted_module_keeps_its_plan(tmp_path):
    converted = convsep.convert(small_net(), rank=1)
    torch.save(converted, tmp_path / "whole.pt")
    checkpoint = convsep.load(tmp_path / "whole.pt", trust_pickle=True)
    assert checkpoint.converted and checkpoint.plan.to_dict() == converted.convsep_plan.to_dict()
    loaded = checkpoint.build(small_net())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


def test_dict_with_python_objects_needs_trust_pickle(tmp_path):
    model = small_net()
    torch.save({"state_dict": model.state_dict(), "args": SharedConvNet}, tmp_path / "train.pt")
    with pytest.raises(convsep.CheckpointError, match="trust_pickle"):
        convsep.load(tmp_path / "train.pt")
    assert_bitwise_equal(snapshot(model), convsep.load(tmp_path / "train.pt", small_net(), trust_pickle=True))


def test_unimportable_pickled_class_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "gone_models.py").write_text(
        "from torch import nn\nclass GoneNet(nn.Sequential):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_models

    torch.save(gone_models.GoneNet(nn.Conv2d(1, 2, 3)), tmp_path / "whole.pt")
    monkeypatch.delitem(sys.modules, "gone_models")
    (tmp_path / "gone_models.py").unlink()
    with pytest.raises(convsep.CheckpointError, match="whose class cannot be found.*gone_models"):
        convsep.load(tmp_path / "whole.pt", trust_pickle=True)


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path):
    torch.save(small_net().state_dict(), tmp_path / "net.pt")
    wrong = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Conv2d(6, 6, 1))
    with pytest.raises(convsep.CheckpointError) as caught:
        convsep.load(tmp_path / "net.pt", model=wrong)
    message = str(caught.value)
    assert "missing 4.weight, 4.bias" in message
    assert "0.weight is (8, 3, 3, 3) in the file but (4, 3, 3, 3) in the model" in message
    with pytest.raises(convsep.CheckpointError, match=r"unexpected 3\.weight, 3\.bias"):
        load_weights(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), small_net().state_dict())


def test_data_parallel_prefix_gets_a_hint(tmp_path):
    model = small_net()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "dp.pt")
    with pytest.raises(convsep.CheckpointError, match="DataParallel"):
        convsep.load(tmp_path / "dp.pt", model=small_net())


def test_converted_checkpoint_on_another_architecture_is_a_clear_error(tmp_path):
    convsep.save(convsep.convert(small_net(), rank=1), tmp_path / "net.pt")
    with pytest.raises(convsep.ConvsepError, match="another architecture"):
        convsep.load(tmp_path / "net.pt", model=nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_text("hello, I am a text file\n"), "is not a checkpoint"),
        (lambda p: p.write_bytes(os.urandom(64) + b"\x00"), "is not a checkpoint"),
        (lambda p: torch.save(torch.ones(3), p), "holds a Tensor"),
        (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p), r"'epoch', 'lr'.*no 'state_dict'"),
    ],
    ids=["missing", "directory", "empty", "text", "random", "tensor", "dict-without-weights"],
)
def test_files_that_are_not_checkpoints(make, match, tmp_path):
    path = tmp_path / "in.pt"
    make(path)
    with pytest.raises(convsep.ConvsepError, match=match):
        convsep.load(path)


@pytest.mark.parametrize("suffix", FORMATS)
def test_truncated_checkpoint(suffix, tmp_path):
    path = tmp_path / f"net{suffix}"
    convsep.save(small_net(), path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(convsep.CheckpointError, match="truncated or corrupt"):
        convsep.load(path)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "net.pt"
    convsep.save(small_net(), path)
    content = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(convsep.CheckpointError, match="No space left on device"):
        convsep.save(convsep.convert(small_net()), path)
    assert files_in(tmp_path) == ["net.pt"] and path.read_bytes() == content
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        convsep.save(small_net(), tmp_path / "other.pt")
    assert files_in(tmp_path) == ["net.pt"]


def test_saved_file_has_the_usual_permissions(tmp_path):
    convsep.save(small_net(), tmp_path / "net.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "net.pt").st_mode) == 0o666 & ~umask


def test_destination_checks(tmp_path):
    source = tmp_path / "in.pt"
    torch.save({}, source)
    (tmp_path / "sub").mkdir()
    for same in (source, tmp_path / "sub" / ".." / "in.pt"):
        with pytest.raises(convsep.CheckpointError, match="is the input"):
            check_destination(same, overwrite=True, sources={"input": source})
    os.symlink(source, tmp_path / "link.pt")
    with pytest.raises(convsep.CheckpointError, match="is the input"):
        check_destination(tmp_path / "link.pt", overwrite=True, sources={"input": source})
    with pytest.raises(convsep.CheckpointError, match="exists: pass --force"):
        check_destination(source, overwrite=False)
    with pytest.raises(convsep.CheckpointError, match="is a directory"):
        check_destination(tmp_path / "sub", overwrite=True)
    with pytest.raises(convsep.CheckpointError, match="does not exist"):
        check_destination(tmp_path / "nowhere" / "out.pt", overwrite=True)
    check_destination(tmp_path / "new.pt", overwrite=False, sources={"input": source})


def test_safetensors_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(convsep.OptionalDependencyError, match=r"pip install convsep\[safetensors\]"):
        convsep.save(small_net(), tmp_path / "net.safetensors")
    assert files_in(tmp_path) == []


def test_save_rejects_what_is_not_a_model(tmp_path):
    with pytest.raises(TypeError, match="dict"):
        convsep.save({"a": torch.ones(1)}, tmp_path / "x.pt")
    torch.save(small_net().state_dict(), tmp_path / "net.pt")
    with pytest.raises(TypeError, match="OrderedDict"):
        convsep.load(tmp_path / "net.pt", model=small_net().state_dict())


def test_safetensors_header_that_starts_like_a_pickle_is_read_as_safetensors(tmp_path):
    # A 1408-byte header is b"\x80\x05..." little-endian: the opening bytes of a protocol-5 pickle.
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from convsep.checkpoint import _sniff

    path = tmp_path / "w.safetensors"
    for padding in range(1200, 1500):
        save_file({"w": torch.ones(2)}, str(path), metadata={"pad": "x" * padding})
        if path.read_bytes()[:2] == b"\x80\x05":
            break
    assert path.read_bytes()[:2] == b"\x80\x05"
    assert _sniff(path.read_bytes()[:16], path.stat().st_size) == "safetensors"
    assert torch.equal(convsep.load(path).state_dict["w"], torch.ones(2))
