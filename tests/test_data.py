import sys

import pytest
import torch
from torch import nn

import convsep
from convsep.data import ImageFolder, load_batches


@pytest.fixture
def image_folder(tmp_path):
    """Five images of mixed sizes and modes, one in a subfolder, plus a file that is not an image."""
    Image = pytest.importorskip("PIL.Image")  # only the image tests need Pillow
    Image.new("L", (10, 6), color=255).save(tmp_path / "a_white.png")
    Image.new("RGB", (7, 9), color=(255, 0, 51)).save(tmp_path / "b_red.png")
    Image.new("RGBA", (5, 5), color=(0, 0, 0, 0)).save(tmp_path / "c_clear.png")
    (tmp_path / "nested").mkdir()
    Image.new("RGB", (12, 12), color=(0, 255, 0)).save(tmp_path / "nested" / "d_green.jpg", quality=100)
    Image.new("L", (8, 8), color=0).save(tmp_path / "nested" / "e_black.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_becomes_batches_of_the_asked_shape_with_values_in_unit_range(image_folder):
    batches = load_batches(str(image_folder), channels=3, size=(4, 6), batch_size=2)
    assert isinstance(batches, ImageFolder) and len(batches) == 3
    shapes = [tuple(b.shape) for b in batches]
    assert shapes == [(2, 3, 4, 6), (2, 3, 4, 6), (1, 3, 4, 6)]
    images = torch.cat(list(batches))
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images[0], torch.ones(3, 4, 6))  # white, sorted first
    torch.testing.assert_close(images[1, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]))  # (255, 0, 51) / 255
    torch.testing.assert_close(images[2], torch.zeros(3, 4, 6))  # alpha is dropped
    torch.testing.assert_close(images[4], torch.zeros(3, 4, 6))
    assert list(batches)[0].shape == (2, 3, 4, 6)  # a second pass reads the files again


def test_grayscale_and_normalisation(image_folder):
    gray = torch.cat(list(load_batches(image_folder, channels=1, size=5, batch_size=8)))
    assert gray.shape == (5, 1, 5, 5)
    normalised = torch.cat(list(load_batches(image_folder, channels=1, size=5, mean=[0.5], std=[0.25])))
    torch.testing.assert_close(normalised, (gray - 0.5) / 0.25)


def test_import_string_names_a_callable_returning_batches(tmp_path):
    source = tmp_path / "calibration_source.py"
    source.write_text(
        "import torch\n"
        "def batches():\n    return [torch.zeros(2, 3, 8, 8), (torch.ones(2, 3, 8, 8), torch.tensor([0, 1]))]\n"
        "def one_tensor():\n    return torch.zeros(4, 3, 8, 8)\n"
        "def number():\n    return 7\n"
    )
    batches = load_batches(f"{source}:batches")
    assert len(batches) == 2 and batches[1][0].shape == (2, 3, 8, 8)
    single = load_batches(f"{source}:one_tensor")
    assert len(single) == 1 and single[0].shape == (4, 3, 8, 8)
    with pytest.raises(TypeError, match="returned a value of type int, not an iterable"):
        load_batches(f"{source}:number")
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        load_batches(f"{source}:missing")


def test_folder_batches_calibrate_a_model(image_folder):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    converted = convsep.convert(model, rank=1, calibration_data=load_batches(image_folder, size=8, batch_size=2))
    assert converted.convsep_plan.calibration["samples"] == 5


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("no_such_folder", ValueError, "'no_such_folder' is neither a folder nor an import string"),
        (3, TypeError, "3"),
    ],
)
def test_sources_that_are_neither_a_folder_nor_an_import_string_are_refused(spec, error, match):
    with pytest.raises(error, match=match) as info:
        load_batches(spec)
    assert isinstance(info.value, convsep.ConvsepError)


@pytest.mark.parametrize(
    "spec, kwargs, error, match",
    [
        ("EMPTY", {}, ValueError, "holds no image files"),
        ("IMAGES", {"channels": 2}, ValueError, "channels=2"),
        ("IMAGES", {"size": (4, 0)}, ValueError, r"size=\(4, 0\)"),
        ("IMAGES", {"batch_size": 0}, ValueError, "batch_size=0"),
        ("IMAGES", {"mean": [0.5, 0.5]}, ValueError, "mean=.*3 numbers"),
        ("IMAGES", {"std": 0}, ValueError, "std=0 has a zero"),
    ],
)
def test_bad_sources_are_refused_clearly(tmp_path, image_folder, spec, kwargs, error, match):
    (tmp_path / "empty").mkdir()
    spec = {"EMPTY": str(tmp_path / "empty"), "IMAGES": str(image_folder)}.get(spec, spec)
    with pytest.raises(error, match=match) as info:
        load_batches(spec, **kwargs)
    assert isinstance(info.value, convsep.ConvsepError)


def test_unreadable_image_names_the_file(image_folder):
    (image_folder / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        list(load_batches(image_folder, size=4))


def test_missing_pillow_says_which_extra_to_install(image_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(convsep.OptionalDependencyError, match=r"convsep\[images\]"):
        load_batches(image_folder)
