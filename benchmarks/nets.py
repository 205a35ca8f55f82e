"""The suite's networks (torch, CPU): a CIFAR-style ResNet-20, a VGG with BatchNorm, a MobileNetV2-style net and a
small vision transformer (ViT) written as timm writes it.

Each is trained once per data set and cached (torch state dict + ONNX export) under the data cache; `export` writes
the eval-mode ONNX with a dynamic batch, BatchNorm folded by the exporter, as a user's exporter would.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet(nn.Module):
    """ResNet-6n+2 for small images (He et al. 2016, CIFAR variant): n blocks per stage, widths w, 2w, 4w."""

    def __init__(self, classes: int, n: int = 3, width: int = 16, channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, 2 if stage and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class VGG(nn.Module):
    """VGG-style stack of 3x3 Conv-BN-ReLU with max pools, global pooling and a two-layer classifier."""

    def __init__(self, classes: int, cfg=(32, "M", 64, "M", 128, 128, "M", 256, 256, "M"), channels: int = 1) -> None:
        super().__init__()
        layers, cin = [], channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin, 256), nn.ReLU(), nn.Linear(256, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) scaled for 32x32 inputs: (expansion, channels, blocks, stride) stages."""

    def __init__(
        self,
        classes: int,
        cfg=((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1)),
        channels: int = 1,
    ) -> None:
        super().__init__()
        layers = [nn.Conv2d(channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        cin = 32
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 320, 1, bias=False), nn.BatchNorm2d(320), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(320, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class VGGFC(VGG):
    """The VGG stack with a VGG-16-style classifier: flatten (no global pooling), two wide fully connected layers.

    At 32x32 the flattened features are 256 x 2 x 2 = 1024; with `width` 2048 the classifier holds 6.4 M of the
    7.5 M parameters, the share the FC layers hold in VGG-16 and AlexNet (the tensor-train issue's target).
    """

    def __init__(self, classes: int, width: int = 2048, channels: int = 1) -> None:
        super().__init__(classes, channels=channels)
        self.classifier = nn.Sequential(
            nn.Linear(1024, width),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class Attention(nn.Module):
    """Multi-head self-attention as timm's ViT writes it: one packed qkv Linear, heads split by reshape/permute."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU (exported as Erf)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.n1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.n2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class ViT(nn.Module):
    """A small ViT for 32x32 inputs: patch 4 (64 tokens), learned positions, mean-pooled tokens, linear head.

    Defaults (width 128, 6 blocks, 4 heads, MLP 256): about 0.8 M parameters, the size the transformer issue asks
    for. Trained with AdamW (`train` switches to it for this class): SGD leaves a ViT this small far behind.
    """

    def __init__(
        self, classes: int, width: int = 128, depth: int = 6, heads: int = 4, mlp: int = 256, channels: int = 1
    ) -> None:
        super().__init__()
        self.embed = nn.Conv2d(channels, width, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 64, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class TextEncoder(nn.Module):
    """A BERT-style sentence embedder: token + position embeddings (Gather), post-norm blocks with separate Q/K/V,
    an additive padding mask, mean pooling over the kept tokens; `forward(ids, mask)` -> [N, width] embeddings.

    `classify` puts a linear head on the embedding for training (classes: the module a docstring comes from); the
    export is the embedder alone, as sentence-embedding models ship.
    """

    def __init__(self, vocab: int, classes: int, width: int = 128, depth: int = 4, heads: int = 4, mlp: int = 256):
        super().__init__()
        self.heads = heads
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(256, width)
        self.norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "q": nn.Linear(width, width),
                    "k": nn.Linear(width, width),
                    "v": nn.Linear(width, width),
                    "o": nn.Linear(width, width),
                    "n1": nn.LayerNorm(width),
                    "fc1": nn.Linear(width, mlp),
                    "fc2": nn.Linear(mlp, width),
                    "n2": nn.LayerNorm(width),
                }
            )
            for _ in range(depth)
        )
        self.classifier = nn.Linear(width, classes)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.norm(self.tokens(ids) + self.positions(torch.arange(n, device=ids.device))[None])
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for blk in self.blocks:
            q, k, v = (self._split(blk[name](x)) for name in "qkv")
            attn = (q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5) + bias).softmax(-1)
            out = (attn @ v).transpose(1, 2).reshape(x.shape)
            x = blk["n1"](x + blk["o"](out))
            x = blk["n2"](x + blk["fc2"](F.gelu(blk["fc1"](x))))
        keep = mask[:, :, None].to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)

    def classify(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward(ids, mask))


ARCHITECTURES = {"resnet20": ResNet, "vgg": VGG, "vggfc": VGGFC, "mobilenetv2": MobileNetV2, "vit": ViT}


def build(arch: str, classes: int, **kw) -> nn.Module:
    return ARCHITECTURES[arch](classes, **kw)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch: int = 64, seed: int = 0) -> float:
    """SGD with Nesterov momentum (AdamW for a ViT), one-cycle schedule, random shifts of up to 2 pixels.

    Returns the seconds spent.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * ((len(x) + batch - 1) // batch)
    if isinstance(model, ViT):
        opt, sched = _adamw(model, steps)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
        return F.cross_entropy(model(torch.roll(xt[idx], shifts=(dy, dx), dims=(2, 3))), yt[idx])

    _epochs(model, len(x), loss, opt, sched, epochs=epochs, batch=batch, gen=gen)
    return time.perf_counter() - start


def _epochs(model: nn.Module, n: int, loss, opt, sched, *, epochs: int, batch: int, gen: torch.Generator) -> None:
    """`epochs` passes over `n` samples in shuffled batches: a step of `opt` and `sched` on `loss(indices)` each."""
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            value = loss(perm[i : i + batch])
            opt.zero_grad()
            value.backward()
            opt.step()
            sched.step()
    model.eval()


def _adamw(model: nn.Module, steps: int):
    """AdamW (weight decay 0.05) with a one-cycle schedule to 2e-3 over `steps`: the transformers' optimiser."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)


def train_text(
    model: TextEncoder, x: np.ndarray, y: np.ndarray, *, epochs: int, batch: int = 64, seed: int = 0
) -> float:
    """AdamW with a one-cycle schedule on (ids, mask) pairs `x` [N, 2, L] and their classes; returns seconds spent."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt, sched = _adamw(model, epochs * ((len(x) + batch - 1) // batch))

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.classify(xt[idx, 0], xt[idx, 1]), yt[idx])

    _epochs(model, len(x), loss, opt, sched, epochs=epochs, batch=batch, gen=gen)
    return time.perf_counter() - start


def export_text(model: TextEncoder, path: os.PathLike, length: int, exporter: str = "torchscript") -> None:
    """The embedder as ONNX: inputs input_ids and attention_mask [batch, seq] int64, output sentence_embedding.

    `exporter` "torchscript" (opset 17) or "dynamo" (opset 18, needs onnxscript; batch and sequence as torch.export
    dims, the sequence up to the position table's length).
    """
    model.eval()
    path = pathlib.Path(path)
    tmp = path.with_suffix(".tmp.onnx")
    ids = torch.ones(2, length, dtype=torch.int64)
    names = {
        "input_names": ["input_ids", "attention_mask"],
        "output_names": ["sentence_embedding"],
    }  # dynamo names a value "embedding"
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=model.positions.num_embeddings)
        dims = {"ids": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}}
        torch.onnx.export(
            model, (ids, torch.ones_like(ids)), str(tmp), dynamic_shapes=dims, opset_version=18, dynamo=True, **names
        )
    else:
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids)),
            str(tmp),
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
            opset_version=17,
            dynamo=False,
            **names,
        )
    os.replace(tmp, path)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(torch.from_numpy(x[i : i + 256])).argmax(1) for i in range(0, len(x), 256)])
    return float((preds.numpy() == y).mean())


def export(model: nn.Module, path: os.PathLike, shape: tuple[int, ...]) -> None:
    """Eval-mode ONNX, opset 17, dynamic batch; input 'image', output 'logits'."""
    model.eval()
    path = pathlib.Path(path)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        (torch.zeros(2, *shape),),
        str(tmp),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    os.replace(tmp, path)


def reestimate_bn(model: nn.Module, x: np.ndarray, batch: int = 64) -> None:
    """Recompute every BatchNorm's running mean/var on `x` (cumulative average), a cheap post-pruning fix."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(torch.from_numpy(x[i : i + batch]))
    model.eval()
