"""Child process run in bench/.venv-export: a MobileNetV2 (torchvision's layout, written out here because
PyPI's torchvision does not import beside the CPU torch this machine has) exported to ONNX.

Usage: python bench/mobile_cnn_child.py OUT.onnx
Weights are torch's default initialisation with seeded, non-trivial BatchNorm statistics (no pretrained
weights can be fetched here), exported with the TorchScript exporter at opset 13 in eval mode, so
BatchNorm folds into the convolutions as it does for any PyTorch export. Deterministic.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore", category=DeprecationWarning)


def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
        cin = 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for index in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                cin = cout
        layers.append(conv_bn(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = MobileNetV2()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(channels, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(channels, generator=generator))
    model.eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(out), input_names=["image"], output_names=["logits"],
                      opset_version=13, dynamo=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
