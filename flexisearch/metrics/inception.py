"""FIDInceptionV3: the Inception-v3 that FID is defined with, written in plain torch.

FID numbers are only comparable when measured with TensorFlow's 2015-12-05 Inception graph. This is
that network as ported by pytorch-fid (torchvision's Inception3 layout, 1008 classes, no auxiliary
head, and the FID block variants: TF-style average pooling that ignores padding, and a max pool in the
last block), so its state dict is exactly the one in pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.
Features are the 2048-d global average pool after Mixed_7c ("pool3") of images resized to 299x299.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..files import check_state, fingerprint, load_weights, save_weights

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SPEC = "fid-inception"
INPUT_SIZE = 299


@dataclass(frozen=True)
class InceptionConfig:
    """The FID Inception's fixed sizes; image_size only records what the images were (any size is resized to 299)."""

    feature_dim: int = 2048
    in_channels: int = 3
    num_classes: int = 1008
    image_size: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _ConvBN(nn.Module):
    """Conv (no bias), BatchNorm with TensorFlow's eps 0.001, ReLU: torchvision's BasicConv2d."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool() -> nn.AvgPool2d:
    """3x3 stride-1 average pool that, like TensorFlow's, averages over the unpadded pixels only."""
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.pool = _tf_avg_pool()
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(self.pool(x)),
        ], 1)


class _BlockB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b-e)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.pool = _tf_avg_pool()
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(self.pool(x))], 1)


class _BlockD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 convolutions (Mixed_7b-c); pool is the pooling before branch_pool."""

    def __init__(self, cin: int, pool: nn.Module):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.pool = pool
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(self.pool(x)),
        ], 1)


def _first_line(e: Exception) -> str:
    """Type and informative line of an exception (torch.load's weights_only errors span many lines)."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3: features() gives pool3 features, forward() the 1008 logits.

    Always in eval mode with frozen weights: BatchNorm uses the stored statistics and dropout is off.
    """

    feature_batch_size = 50  # images per forward (each is resized to 299x299)

    def __init__(self, config: InceptionConfig | None = None):
        super().__init__()
        self.config = config = config or InceptionConfig()
        if config.feature_dim != 2048 or config.in_channels != 3:
            raise UserError(f"FID Inception has feature_dim 2048 and in_channels 3, "
                            f"got {config.feature_dim} and {config.in_channels}")
        if config.num_classes <= 0:
            raise UserError(f"FID Inception: num_classes must be positive, got {config.num_classes}")
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, _tf_avg_pool())
        # The TF graph max-pools here (Mixed_7c), where the paper and torchvision average.
        self.Mixed_7c = _BlockE(2048, nn.MaxPool2d(3, stride=1, padding=1))
        self.fc = nn.Linear(2048, config.num_classes)
        self.requires_grad_(False)
        self.train(False)
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> FIDInceptionV3:
        return super().train(False)  # never leave eval mode: BatchNorm must not update on generated images

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1], C 1 or 3 -> (N, 2048) float32 pool3 features."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"FID Inception expects images of shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.to(torch.float32).expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):  # bilinear at the same size is the identity
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the 1008 classes (torchvision's dropout before fc is the identity in eval mode)."""
        return self.fc(self.features(x))

    # ---- weights in and out -------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        self._fingerprint = None  # new weights, new fingerprint
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def fingerprint(self) -> str:
        """Short content hash of config and weights: reference statistics record the net they belong to.

        Computed once (the weights are frozen; load_state_dict recomputes it, in-place edits are not seen).
        """
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.config.to_dict(), self.state_dict())
        return self._fingerprint

    def save_pretrained(self, path: str | Path) -> None:
        """Write the state dict to one .safetensors file, atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise UserError(f"{path}: FID Inception weights are saved as a .safetensors file")
        save_weights(path, self.state_dict())

    @classmethod
    def from_pretrained(cls, spec: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
        """Load strictly from a .pth/.pt state dict, a .safetensors file, or "fid-inception" (pytorch-fid's
        release file, downloaded once into torch's hub cache). Returned in eval mode with frozen weights."""
        if str(spec) == FID_WEIGHTS_SPEC:
            source = str(Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1])
            try:
                state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", weights_only=True,
                                                           progress=False)
            except OSError as e:  # urllib.error.URLError and socket errors when offline
                raise UserError(f"{FID_WEIGHTS_URL}: cannot download the FID Inception weights ({_first_line(e)}); "
                                f"without network access, pass a local path to pt_inception-2015-12-05-6726825d.pth "
                                f"instead") from None
            except Exception as e:  # a corrupt cached download
                raise UserError(f"{source}: not loadable as a state dict ({_first_line(e)})") from None
        else:
            path = Path(spec)
            source = str(path)
            if not path.is_file():
                raise UserError(f"{path}: FID Inception weights file not found (expected a .pth/.pt or .safetensors "
                                f"state dict, or '{FID_WEIGHTS_SPEC}')")
            if path.suffix not in (".pth", ".pt", ".safetensors"):
                raise UserError(f"{path}: expected a .pth/.pt or .safetensors FID Inception state dict")
            try:
                if path.suffix == ".safetensors":
                    state = load_weights(path)
                else:
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # corrupt or foreign files raise assorted error types
                raise UserError(f"{path}: not loadable as a state dict ({_first_line(e)})") from None
        net = cls()
        net.load_state_dict(_checked_state(state, net.state_dict(), source))
        return net.to(device).eval()


def _checked_state(state: object, expected: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """state, validated against expected names and shapes; BatchNorm counters (unused in eval) may be absent."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{source}: expected a state dict of tensors (name -> tensor), got {type(state).__name__}")
    optional = {k: v for k, v in expected.items() if k.endswith(".num_batches_tracked") and k not in state}
    state = {**optional, **state}
    check_state(state, expected, source)
    return state


__all__ = ["FID_WEIGHTS_URL", "FIDInceptionV3", "InceptionConfig"]
