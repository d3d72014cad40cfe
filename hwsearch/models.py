"""Model registry: CIFAR-style networks, torchvision classifiers by name, and user factories.

``create_model(name, num_classes=..., in_channels=...)`` accepts
- a registered name (``resnet20``, ``resnet32``, ``resnet56``, ``vgg11_bn``, ``alexnet_cifar``,
  ``mobilenet_v2_cifar``, ``mobilenet_v2``, ``resnet18``),
- any torchvision classification model name (``efficientnet_b0``, ``vit_b_16``, ...),
- a user's own model as ``package.module:factory`` (called with ``num_classes`` and
  ``in_channels`` keywords when it accepts them).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from cost_models import Registry

__all__ = ["ModelSpec", "create_model", "list_models", "models"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model factory and its metadata."""

    factory: Callable[..., nn.Module]
    input_size: int  # the spatial size it was designed for
    description: str


models: Registry[ModelSpec] = Registry("model")


def register_model(name: str, input_size: int, description: str):
    def deco(fn):
        models.register(name, ModelSpec(fn, input_size, description))
        return fn
    return deco


# --- CIFAR-style ResNet (He et al. 2016, section 4.2; option A identity shortcuts) ---

class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels (no parameters, no MACs)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth: CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


for _depth in (20, 32, 56):
    register_model(f"resnet{_depth}", 32, f"CIFAR ResNet-{_depth} (He et al. 2016)")(
        lambda num_classes=10, in_channels=3, _d=_depth: CifarResNet(_d, num_classes, in_channels))


def _conv_stack(cfg, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            # ceil_mode keeps 1x1 maps at 1x1, so small inputs (8x8 digits) still run.
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, cfg, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = _conv_stack(cfg, in_channels)
        self.classifier = nn.Linear(cfg[-2] if cfg[-1] == "M" else cfg[-1], num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@register_model("vgg11_bn", 32, "VGG-11 with batch norm for 32x32 inputs (Simonyan & Zisserman 2015)")
def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return VGG([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], num_classes, in_channels)


class AlexNetCifar(nn.Module):
    """AlexNet sized for 32x32 inputs (5 convs, 3 FC), with batch norm as in common CIFAR variants."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = _conv_stack([64, "M", 192, "M", 384, 256, 256, "M"], in_channels)
        self.fc1 = nn.Linear(256 * 4 * 4, 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.fc3 = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 4).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


register_model("alexnet_cifar", 32, "AlexNet for 32x32 inputs (Krizhevsky et al. 2012, CIFAR variant)")(AlexNetCifar)


def _torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                                            mod.padding, mod.dilation, mod.groups, mod.bias is not None))
            return
    raise ValueError("in_channels: the model has no Conv2d to adapt")


for _tv in ("mobilenet_v2", "resnet18"):
    register_model(_tv, 224, f"torchvision {_tv}")(
        lambda num_classes=10, in_channels=3, _n=_tv: _torchvision(_n, num_classes, in_channels))


def mobilenet_v2_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018) for 32x32 inputs: torchvision's blocks and width 1.0, with the
    first convolution and the first downsampling stage (t=6, c=24) at stride 1, so that the feature maps
    are 32, 32, 16, 8, 8, 4, 4 pixels across (ImageNet's network would shrink a CIFAR image to 1x1).
    Depthwise 3x3 convolutions carry 6.4% of its 88 M MACs; the linear bottlenecks' outputs (no ReLU)
    are signed inputs of the next pointwise convolution, which PACT quantizes with a signed range."""
    import torchvision

    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    model = torchvision.models.MobileNetV2(num_classes=num_classes, inverted_residual_setting=setting)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    return model


register_model("mobilenet_v2_cifar", 32, "MobileNetV2 for 32x32 inputs (stride 1 stem and first downsampling stage)")(
    mobilenet_v2_cifar)


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names and torchvision classification names, optionally filtered by a glob pattern."""
    import fnmatch

    names = sorted(set(models.names()) | set(_torchvision_names()))
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def _user_factory(spec: str) -> Callable[..., nn.Module]:
    import os
    import sys

    module_name, _, attr = spec.partition(":")
    # As `python -m` does, look in the current directory first, so `--model mynet:make` finds ./mynet.py.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code
        raise ValueError(f"model {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a model by name for a dataset with ``num_classes`` and ``in_channels``.

    Raises:
        KeyError: an unknown name (the message lists the valid names).
        ValueError: a user factory that cannot be imported or called.
    """
    if ":" in name:
        factory = _user_factory(name)
        params = inspect.signature(factory).parameters
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
                  if k in params or accepts_kwargs}
        try:
            model = factory(**kwargs)
        except Exception as exc:
            raise ValueError(f"model {name!r}: factory failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {name!r}: factory returned {type(model).__name__}, not an nn.Module")
        return model
    if name in models:
        return models.get(name).factory(num_classes=num_classes, in_channels=in_channels)
    if name in _torchvision_names():
        return _torchvision(name, num_classes, in_channels)
    raise KeyError(f"unknown model {name!r}; registered: {', '.join(models.names())}; "
                   f"also any torchvision classification model (see `hwsearch models`) or package.module:factory")
