"""The tools a user would pick instead of onnxprune, run without fine-tuning on the same trained models.

* Torch-Pruning (magnitude, BN-scale and Taylor importance; global or uniform), optionally followed by BatchNorm
  statistics re-estimated on the calibration data;
* plain truncated SVD of every Conv (one rank fraction for all layers, data-free);
* onnxsim's structured Wanda pruning on the ONNX graph, with the same calibration data.

Each takes a parameter-removal target and searches its own knob by bisection until the exported ONNX model's
parameter count (counted by the same function for every row) is within one point of it.
"""

from __future__ import annotations

import copy
import tempfile

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.measure import bisect
from benchmarks.nets import export, reestimate_bn
from onnxprune.budget import count


def torch_params(model: nn.Module) -> int:
    """Parameters of the ONNX export: conv weights plus one bias per output channel (BN folds into it), linears."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += m.weight.numel() + m.out_channels
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return total


def onnx_of(model: nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        export(model, f"{tmp}/m.onnx", shape)
        return onnx.load(f"{tmp}/m.onnx")


def torch_pruning(
    model: nn.Module,
    calib: np.ndarray,
    target: float,
    *,
    importance: str,
    global_pruning: bool,
    reestimate: bool,
) -> tuple[onnx.ModelProto, dict]:
    """Torch-Pruning's MetaPruner at the channel ratio that removes `target` of the parameters."""
    import torch_pruning as tp

    shape = tuple(calib.shape[1:])
    example = torch.from_numpy(calib[:2])
    before = torch_params(model)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        pseudo = model(torch.from_numpy(calib)).argmax(1)  # no labels: the model's own predictions, as onnxprune

    def make(ratio: float):
        m = copy.deepcopy(model)
        imp = {
            "magnitude": tp.importance.MagnitudeImportance(p=1),
            "bn": tp.importance.BNScaleImportance(),
            "taylor": tp.importance.TaylorImportance(),
        }[importance]
        pruner = tp.pruner.MetaPruner(
            m,
            example,
            importance=imp,
            global_pruning=global_pruning,
            pruning_ratio=ratio,
            max_pruning_ratio=0.95,
            ignored_layers=[head],
        )
        if importance == "taylor":
            m.zero_grad()
            for i in range(0, len(calib), 128):
                F.cross_entropy(m(torch.from_numpy(calib[i : i + 128])), pseudo[i : i + 128]).backward()
        pruner.step()
        return m, 1 - torch_params(m) / before

    pruned, _, knob = bisect(make, target)
    if reestimate:
        reestimate_bn(pruned, calib)
    return onnx_of(pruned, shape), {"knob": "pruning_ratio", "value": knob}


def _attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """`nets.Attention.forward` with the head dim and width read from the weights (what Torch-Pruning's ViT example
    patches into timm's attention): a pruned model keeps running whatever heads and widths are left."""
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.qkv.out_features // (3 * self.heads)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


def torch_pruning_vit(model: nn.Module, calib: np.ndarray, target: float) -> tuple[onnx.ModelProto, dict]:
    """Torch-Pruning's MetaPruner on a `nets.ViT`: heads (``num_heads``) and MLP units, L2 magnitude, the same ratio
    in every layer; the embedding (residual) width and the classifier kept whole; bisected to remove `target` of the
    parameters."""
    import types

    import torch_pruning as tp

    shape = tuple(calib.shape[1:])
    example = torch.from_numpy(calib[:2])
    before = count(onnx_of(model, shape))[0]

    def make(ratio: float):
        m = copy.deepcopy(model)
        attention = [block.attn for block in m.blocks]
        for attn in attention:
            attn.forward = types.MethodType(_attention_forward, attn)
        pruner = tp.pruner.MetaPruner(
            m,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            max_pruning_ratio=0.95,
            ignored_layers=[m.head, m.embed],  # the embedding (residual) width stays whole, as onnxprune's does
            num_heads={attn.qkv: attn.heads for attn in attention},
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
        )
        pruner.step()
        for attn in attention:
            attn.heads = pruner.num_heads[attn.qkv]
        return m, 1 - count(onnx_of(m, shape))[0] / before  # LayerNorms and positions count too

    pruned, _, knob = bisect(make, target)
    return onnx_of(pruned, shape), {"knob": "pruning_ratio", "value": knob}


class LowRankConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        self.basis = nn.Conv2d(
            conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False
        )
        self.basis.weight.data = vt[:rank].reshape(rank, *conv.weight.shape[1:]).clone()
        self.scale = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
        self.scale.weight.data = (u[:, :rank] * s[:rank]).reshape(conv.out_channels, rank, 1, 1).clone()
        if conv.bias is not None:
            self.scale.bias.data = conv.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.basis(x))


def plain_svd(model: nn.Module, calib: np.ndarray, target: float) -> tuple[onnx.ModelProto, dict]:
    """Every group-1 Conv replaced by its rank-r truncated SVD, r a fixed fraction of its full rank (data-free)."""
    shape = tuple(calib.shape[1:])
    before = torch_params(model)

    def make(cut: float):
        m = copy.deepcopy(model)
        for parent in list(m.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv2d) and child.groups == 1:
                    cin = child.in_channels * child.kernel_size[0] * child.kernel_size[1]
                    full = min(child.out_channels, cin)
                    rank = max(1, int(round(full * (1 - cut))))
                    if rank * (cin + child.out_channels) < child.out_channels * cin:
                        setattr(parent, name, LowRankConv(child, rank))
        return m, 1 - torch_params(m) / before

    pruned, _, knob = bisect(make, target)
    return onnx_of(pruned, shape), {"knob": "rank cut", "value": knob}


def onnxsim_wanda(model: onnx.ModelProto, calib: np.ndarray, target: float) -> tuple[onnx.ModelProto, dict]:
    """onnxsim.pruning.apply_structured_wanda_pruning with global sparsity and the calibration batches."""
    from onnxsim import pruning

    before = count(model)[0]
    name = model.graph.input[0].name
    batches = [{name: calib[i : i + 64]} for i in range(0, len(calib), 64)]

    def make(sparsity: float):
        out = pruning.apply_structured_wanda_pruning(
            model, calibration_data=batches, sparsity=sparsity, global_sparsity=True
        )
        return out, 1 - count(out)[0] / before

    pruned, _, knob = bisect(make, target, hi=0.99)
    return pruned, {"knob": "sparsity", "value": knob}


def onnxsim_transformer(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], target: float, *, heads: int, width: int
) -> tuple[onnx.ModelProto, dict]:
    """onnxsim's calibrated attention-head pruning, then its structured Wanda pruning (the MLP units), at one sparsity.

    onnxsim matches attention as onnxruntime's transformer optimizer fuses it (`com.microsoft::Attention`), so the
    model goes through that optimizer first, as onnxsim's documentation has it (given the `heads` and hidden `width`,
    which it fails to detect on these exports); on the raw exports it removes nothing.
    `apply_attention_head_wanda_pruning` ranks each block's heads by weight norm times the activation norm at the
    output projection's input; `apply_structured_wanda_pruning` then removes MLP units (MatMul -> GELU -> MatMul
    chains) by the same kind of score. The shared sparsity is bisected until the
    parameter count is within a point of `target`. `feeds`: input name -> the calibration samples.
    """
    import onnxsim
    from onnxruntime.transformers import optimizer

    before = count(model)[0]
    model = optimizer.optimize_by_fusion(model, model_type="bert", num_heads=heads, hidden_size=width).model
    n = len(next(iter(feeds.values())))
    batches = [{k: v[i : i + 64] for k, v in feeds.items()} for i in range(0, n, 64)]

    def make(sparsity: float):
        out = onnxsim.apply_attention_head_wanda_pruning(
            model, calibration_data=batches, num_samples=len(batches), sparsity=sparsity
        )
        out = onnxsim.apply_structured_wanda_pruning(
            out, calibration_data=batches, num_samples=len(batches), sparsity=sparsity
        )
        if not any(o.domain == "com.microsoft" for o in out.opset_import):  # onnxsim drops the fused ops' domain
            out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        return out, 1 - count(out)[0] / before

    pruned, _, knob = bisect(make, target, hi=0.95)
    return pruned, {"knob": "sparsity (heads and MLP units)", "value": knob}


def _text_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`nets.TextEncoder.forward` with each block's head count in ``self.block_heads`` and its widths read from the
    weights: a model Torch-Pruning has cut keeps running whatever heads and units are left."""
    n = ids.shape[1]
    x = self.norm(self.tokens(ids) + self.positions(torch.arange(n, device=ids.device))[None])
    bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
    for blk, heads in zip(self.blocks, self.block_heads):
        b, length, _ = x.shape
        q, k, v = (blk[name](x).view(b, length, heads, -1).transpose(1, 2) for name in "qkv")
        attn = (q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5) + bias).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, length, -1)
        x = blk["n1"](x + blk["o"](out))
        x = blk["n2"](x + blk["fc2"](F.gelu(blk["fc1"](x))))
    keep = mask[:, :, None].to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def torch_pruning_text(model: nn.Module, feeds: dict[str, np.ndarray], target: float) -> tuple[onnx.ModelProto, dict]:
    """Torch-Pruning's MetaPruner on a `nets.TextEncoder`: heads (``num_heads`` on Q, K and V) and MLP units, L2
    magnitude, the same ratio in every layer; the hidden width (embeddings, LayerNorms) and the classifier kept whole;
    bisected to remove `target` of the exported embedder's parameters. `feeds`: input_ids and attention_mask."""
    import types

    import torch_pruning as tp

    from benchmarks.nets import export_text

    ids, mask = (torch.from_numpy(feeds[k][:2]) for k in ("input_ids", "attention_mask"))

    def onnx_text(m: nn.Module) -> onnx.ModelProto:
        with tempfile.TemporaryDirectory() as tmp:
            export_text(m, f"{tmp}/m.onnx", ids.shape[1])
            return onnx.load(f"{tmp}/m.onnx")

    before = count(onnx_text(model))[0]

    def make(ratio: float):
        m = copy.deepcopy(model)
        m.block_heads = [m.heads] * len(m.blocks)
        m.forward = types.MethodType(_text_forward, m)
        linears = [blk[name] for blk in m.blocks for name in "qkv"]
        pruner = tp.pruner.MetaPruner(
            m,
            (ids, mask),
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            max_pruning_ratio=0.95,
            ignored_layers=[m.classifier, m.tokens, m.positions],  # the hidden width stays whole, as onnxprune's does
            num_heads={lin: m.heads for lin in linears},
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
        )
        pruner.step()
        m.block_heads = [pruner.num_heads[blk["q"]] for blk in m.blocks]
        return m, 1 - count(onnx_text(m))[0] / before

    pruned, _, knob = bisect(make, target)
    return onnx_text(pruned), {"knob": "pruning_ratio", "value": knob}
