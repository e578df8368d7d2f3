"""Where calibration inputs come from on the command line: an import string or a folder of images.

`load_batches(spec)` turns the text of `--calibrate-with DATA` into an iterable of batches:
- "package.module:callable" or "path/to/file.py:callable": the callable is called with no
  arguments and returns an iterable of batches (tensors, or tuples whose first item is the
  input; a single tensor is taken as one batch);
- a folder: every image file under it (recursively, sorted by path), decoded with Pillow
  (the `images` extra), converted to `channels` channels (1: grayscale "L", 3: "RGB"; alpha
  is dropped), resized to `size` with bilinear filtering (aspect ratio not kept), scaled to
  float32 values in [0, 1] and, if `mean`/`std` are given, normalised per channel as
  (x - mean) / std. Batches of `batch_size` images, shape (B, channels, height, width).
  Files are decoded again on every pass, so memory stays at one batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from .errors import ConvsepTypeError, ConvsepValueError, OptionalDependencyError
from .imports import resolve_callable

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
_MODES = {1: "L", 3: "RGB"}


def load_batches(
    spec: str,
    *,
    channels: int = 3,
    size: Union[int, Sequence[int]] = 224,
    batch_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    option: str = "--calibrate-with",
) -> Iterable[Any]:
    """The batches `spec` names: a folder of images, or an import string to a callable returning batches.

    channels, size (an int or (height, width)), batch_size, mean and std apply to image folders only.
    option: the command-line flag that gave `spec`, named in errors (--calibrate-with, --data, --val-data).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise ConvsepTypeError(f"{option} {spec!r} must be a folder or an import string, got {type(spec).__name__}")
    path = Path(spec)
    if path.is_dir():
        return ImageFolder(path, channels=channels, size=size, batch_size=batch_size, mean=mean, std=std)
    spec = str(spec)
    if ":" not in spec:
        raise ConvsepValueError(
            f"{option} {spec!r} is neither a folder nor an import string like package.module:callable "
            "or path/to/file.py:callable"
        )
    produced = resolve_callable(spec, what=option)()
    if isinstance(produced, torch.Tensor):
        return [produced]
    try:
        iter(produced)
    except TypeError:
        raise ConvsepTypeError(
            f"{option} {spec!r} returned a value of type {type(produced).__name__}, not an iterable of batches"
        ) from None
    return produced


class ImageFolder:
    """Batches of the images under a folder, decoded on each pass (see the module docstring for the preprocessing)."""

    def __init__(
        self,
        folder: Union[str, os.PathLike],
        *,
        channels: int = 3,
        size: Union[int, Sequence[int]] = 224,
        batch_size: int = 32,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        self.folder = Path(folder)
        if channels not in _MODES:
            raise ConvsepValueError(f"channels={channels!r}: images can be read with 1 (grayscale) or 3 (RGB) channels")
        self.mode = _MODES[channels]
        self.size = _height_width(size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConvsepValueError(f"batch_size={batch_size!r} must be a positive int")
        self.batch_size = batch_size
        self.mean = _per_channel(mean, channels, "mean")
        self.std = _per_channel(std, channels, "std")
        if self.std is not None and bool((self.std == 0).any()):
            raise ConvsepValueError(f"std={std!r} has a zero: it divides the pixel values")
        self.files = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ConvsepValueError(
                f"folder {str(self.folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}) to calibrate on"
            )
        self._image_module = _pillow()

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self)):
            yield self[index]

    def __getitem__(self, index: int) -> torch.Tensor:
        """Batch `index` alone (a process of a distributed job decodes only the batches of its shard)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        start = (index % len(self)) * self.batch_size
        return torch.stack([self._read(p) for p in self.files[start : start + self.batch_size]])

    def _read(self, path: Path) -> torch.Tensor:
        Image = self._image_module
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode).resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except (OSError, ValueError) as error:
            raise ConvsepValueError(f"cannot read image {str(path)!r}: {error}") from None
        x = pixels.reshape(self.size[0], self.size[1], len(self.mode)).permute(2, 0, 1).float() / 255
        if self.mean is not None:
            x = x - self.mean.reshape(-1, 1, 1)
        if self.std is not None:
            x = x / self.std.reshape(-1, 1, 1)
        return x


def _height_width(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    pair = [size, size] if isinstance(size, int) else list(size) if isinstance(size, (tuple, list)) else []
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ConvsepValueError(f"size={size!r} must be a positive int or (height, width)")
    return pair[0], pair[1]


def _per_channel(values: Optional[Sequence[float]], channels: int, name: str) -> Optional[torch.Tensor]:
    if values is None:
        return None
    try:
        tensor = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise ConvsepValueError(f"{name}={values!r} must be {channels} numbers, one per channel") from None
    if tensor.numel() == 1:
        tensor = tensor.repeat(channels)
    if tensor.numel() != channels:
        raise ConvsepValueError(f"{name}={values!r} must be {channels} numbers, one per channel")
    return tensor


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise OptionalDependencyError("reading a folder of images needs Pillow: pip install 'convsep[images]'") from None
    return Image
