"""Small networks for the int8 tests (tests/test_deploy.py, tests/test_int8.py): a hand-built one
with every BatchNorm case, timm's ResNet18 with its export, and seeded input images."""
import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn import functional as F

from dptq import deploy, models
from dptq.data import normalize

SIZE = 16


class Tiny(nn.Module):
    """Conv-BN-ReLU, Conv-BatchNormAct2d (stride 2), a residual Conv-BN-ReLU, a BN no conv feeds, a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), BatchNormAct2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.bn4 = nn.BatchNorm2d(16)  # reads a sum: nothing to fold into
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        y = self.bn4(F.relu(self.bn3(self.conv3(y))) + y)
        return self.fc(y.mean((2, 3)))


def with_running_stats(model: nn.Module, size: int) -> nn.Module:
    """Non-trivial BN running statistics from a few train-mode passes, then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size) * 1.5 + 0.3)
    return model.eval()


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return normalize(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return with_running_stats(Tiny(), SIZE)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """timm's resnet18 at 32 px and its export (its zero-initialised last BNs make equal folded weights)."""
    torch.manual_seed(0)
    model = with_running_stats(models.create("resnet18", 10), 32)
    return model, deploy.export(model, 32, tmp_path_factory.mktemp("r18") / "fp32.onnx")
