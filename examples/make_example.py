"""Train the bundled example: a small residual CNN with BatchNorm on scikit-learn's digits.

Writes examples/digits_resnet.onnx (dynamic batch, opset 17), examples/digits_calib.npy (held-out images,
float32 [N, 1, 16, 16]) and examples/digits_labels.npy (their labels, int64). Needs torch and scikit-learn
(``pip install .[bench]``); running the README's commands does not.

Usage: python examples/make_example.py
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

HERE = pathlib.Path(__file__).parent
SIZE = 16
N_HELD_OUT = 500


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """Digits 8x8 (0..16) upsampled bilinearly to 16x16 and standardised."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    return x.numpy(), digits.target.astype(np.int64)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class DigitsResNet(nn.Module):
    def __init__(self, width: int = 24, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(
            Block(width, width, 1),
            Block(width, width, 1),
            Block(width, 2 * width, 2),
            Block(2 * width, 2 * width, 1),
            Block(2 * width, 4 * width, 2),
            Block(4 * width, 4 * width, 1),
        )
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _shift(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    dx, dy = torch.randint(-2, 3, (2,), generator=rng).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def main() -> None:
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    images, labels = load_images()
    order = np.random.default_rng(0).permutation(len(images))
    held, train = order[:N_HELD_OUT], order[N_HELD_OUT:]
    x_train, y_train = torch.tensor(images[train]), torch.tensor(labels[train])
    model = DigitsResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    epochs = 40
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * ((len(train) + 63) // 64))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=rng)
        for i in range(0, len(train), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(_shift(x_train[idx], rng)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.tensor(images[held])).argmax(1).numpy() == labels[held]).mean()
    print(f"held-out accuracy {acc:.4f} after {epochs} epochs")
    dummy = torch.tensor(images[held[:2]])
    torch.onnx.export(
        model,
        (dummy,),
        str(HERE / "digits_resnet.onnx"),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    np.save(HERE / "digits_calib.npy", images[held].astype(np.float32))
    np.save(HERE / "digits_labels.npy", labels[held])


if __name__ == "__main__":
    main()
