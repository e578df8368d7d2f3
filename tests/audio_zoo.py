"""Small stand-ins for the audio encoders and vision models people convert from model hubs.

Written from the published architectures (Whisper, EnCodec / HiFi-GAN, wav2vec2, ConvNeXt),
shrunk to a few channels, with no dependency beyond torch. What matters is the shape of
each model's code: strided Conv1d stacks, weight-normed convs (new parametrizations and the
old hooks), grouped positional convs with `padding=K//2` and a trimmed last step, and
forwards that read conv attributes at run time.
"""

import warnings

import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


def old_weight_norm(module, **kwargs):
    """torch.nn.utils.weight_norm, the deprecated hook form that HiFi-GAN checkpoints still use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module, **kwargs)


class WhisperEncoder(nn.Module):
    """Whisper's audio stem: two Conv1d (the second strided), then a length check reading conv1.stride."""

    def __init__(self, mels=8, width=12, frames=16):
        super().__init__()
        self.conv1 = nn.Conv1d(mels, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.max_source_positions = frames // 2
        self.embed_positions = nn.Embedding(self.max_source_positions, width)

    def forward(self, features):
        expected = self.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if features.shape[-1] != expected:
            raise ValueError(f"expects {expected} frames, got {features.shape[-1]}")
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        return x + self.embed_positions.weight


class EncodecEncoder(nn.Module):
    """EnCodec / HiFi-GAN style: every conv weight-normed, strided downsampling, residual units."""

    def __init__(self, width=4, old_style=False):
        super().__init__()
        norm = old_weight_norm if old_style else parametrizations.weight_norm

        def conv(c_in, c_out, k, stride=1, dilation=1):
            return norm(nn.Conv1d(c_in, c_out, k, stride=stride, dilation=dilation, padding=(k - 1) * dilation // 2))

        layers = [conv(1, width, 7)]
        for i in range(4):  # 4 convs per block: 2 in the residual unit, its 1x1 shortcut, the strided downsample
            c = width * 2**i
            layers.append(ResidualUnit(conv(c, c // 2, 3, dilation=2), conv(c // 2, c, 3), conv(c, c, 1)))
            layers.append(nn.ELU())
            layers.append(conv(c, 2 * c, 4, stride=2))
        layers += [nn.ELU(), conv(16 * width, 6, 3)]
        self.layers = nn.Sequential(*layers)

    def forward(self, audio):
        return self.layers(audio)


class ResidualUnit(nn.Module):
    def __init__(self, first, second, shortcut):
        super().__init__()
        self.first, self.second, self.shortcut = first, second, shortcut

    def forward(self, x):
        return self.shortcut(x) + self.second(F.elu(self.first(F.elu(x))))


class Wav2Vec2PositionalConv(nn.Module):
    """wav2vec2's positional embedding: a grouped conv, weight-normed over the kernel axis (dim=2),
    padded by K//2 on both sides, so an even kernel yields one step too many, which is trimmed."""

    def __init__(self, width=8, kernel=8, groups=2):
        super().__init__()
        conv = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=groups)
        self.conv = parametrizations.weight_norm(conv, name="weight", dim=2)
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, hidden):  # (B, T, C), as transformers passes it
        x = self.conv(hidden.transpose(1, 2))
        if self.remove:
            x = x[:, :, : -self.remove]
        return hidden + F.gelu(x).transpose(1, 2)


class Wav2Vec2Encoder(nn.Module):
    """wav2vec2 / HuBERT: a strided Conv1d feature extractor, a projection, the positional conv."""

    def __init__(self, width=8):
        super().__init__()
        self.features = nn.ModuleList(
            [nn.Conv1d(1, width, 10, stride=5, bias=False)] + [nn.Conv1d(width, width, 3, stride=2, bias=False) for _ in range(2)]
        )
        self.norm = nn.GroupNorm(width, width)
        self.positional = Wav2Vec2PositionalConv(width)

    def forward(self, audio):  # (B, 1, samples)
        x = audio
        for i, conv in enumerate(self.features):
            x = conv(x)
            x = F.gelu(self.norm(x) if i == 0 else x)
        return self.positional(x.transpose(1, 2))


class ConvNeXtBlock(nn.Module):
    """A depthwise 7x7 (already separable: kept) and pointwise Linear layers, after a patchify stem."""

    def __init__(self, width):
        super().__init__()
        self.dwconv = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width)
        self.pwconv1, self.pwconv2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        return x + self.pwconv2(F.gelu(self.pwconv1(y))).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, width=8, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)  # patchify
        self.stage1 = ConvNeXtBlock(width)
        self.downsample = nn.Conv2d(width, 2 * width, 2, stride=2)
        self.stage2 = ConvNeXtBlock(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.head(x.mean((-2, -1)))


class PatchEmbedding(nn.Module):
    """ViT / Swin / MobileViT / SegFormer style: a conv patch embedding whose caller casts to the conv's dtype."""

    def __init__(self, width=8):
        super().__init__()
        self.projection = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, pixels):
        target_dtype = self.projection.weight.dtype
        x = self.projection(pixels.to(dtype=target_dtype))
        return self.mix(x).flatten(2).transpose(1, 2)


class ReadsEveryConvAttribute(nn.Module):
    """A forward that reads each attribute of nn.ConvNd that model code is seen to read, and
    calls _conv_forward with the conv's own weight and bias (as subclasses of Conv do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, padding_mode="reflect")
        self.plain = nn.Conv1d(6, 6, 3, padding=1, bias=False)

    def forward(self, x):
        conv, plain = self.conv, self.plain
        if conv.in_channels != x.shape[1] or conv.out_channels != 6 or conv.groups != 2 or conv.transposed:
            raise ValueError("conv attributes are wrong")
        if conv.padding_mode != "reflect" or conv.kernel_size != (3,) or conv.dilation != (1,) or conv.output_padding != (0,):
            raise ValueError("conv attributes are wrong")
        if conv.weight.shape != (6, 2, 3) or conv.bias is None or plain.bias is not None:
            raise ValueError("conv attributes are wrong")
        length = (x.shape[-1] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
        x = x.to(dtype=conv.weight.dtype, device=conv.weight.device)
        y = conv._conv_forward(x, conv.weight, conv.bias)
        if y.shape[-1] != length:
            raise ValueError("output length is wrong")
        return plain._conv_forward(y, plain.weight, plain.bias)


# name -> (factory, example input shape): models with 1-d audio encoders and hub-style vision models.
HUB_ARCHITECTURES = {
    "whisper": (WhisperEncoder, (2, 8, 16)),
    "encodec": (EncodecEncoder, (2, 1, 64)),
    "hifigan_old_weight_norm": (lambda: EncodecEncoder(old_style=True), (2, 1, 64)),
    "wav2vec2": (Wav2Vec2Encoder, (2, 1, 200)),
    "convnext": (ConvNeXt, (2, 3, 32, 32)),
    "patch_embedding": (PatchEmbedding, (2, 3, 16, 16)),
    "reads_conv_attributes": (ReadsEveryConvAttribute, (2, 4, 11)),
}

# Convs each must convert; the rest are depthwise or 1x1, which conversion leaves as they are.
ELIGIBLE = {
    "whisper": 2,
    "encodec": 14,
    "hifigan_old_weight_norm": 14,
    "wav2vec2": 4,
    "convnext": 2,
    "patch_embedding": 2,
    "reads_conv_attributes": 2,
}
