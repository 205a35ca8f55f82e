"""Transformer encoders as torch's exporters write them: heads and MLP units go whole, removal equals masking.

A small BERT-style encoder (token and position embeddings, padding mask, masked mean pooling) is exported by the
TorchScript exporter (opsets 13-20: LayerNorm decomposed below 17, GELU as Erf, tanh chain or `Gelu`) and by the dynamo
exporter (opsets 18 and 20: Reshape with ``allowzero``, targets computed from `Shape` of the dynamic sequence, scaled
dot-product attention decomposed with ``k.transpose`` written as Reshape/Transpose/Reshape), with Q/K/V separate,
packed (reshape to [3, heads, dim]) or packed and chunked (Split or Slice on the features), pre- and post-norm.
onnxruntime's transformer optimizer output (fused contrib ops) is covered too.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.graph import to_graph
from onnxprune.passes.cleanup import cleanup
from onnxprune.passes.groups import find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.testing import apply_pass, assert_outputs_close, every_other_channel, mask_channels, ort_run

torch = pytest.importorskip("torch", reason="exporting the encoders needs torch: pip install '.[bench]'")
nn, F = torch.nn, torch.nn.functional

WIDTH, HEADS, VOCAB, MAX_LEN = 16, 4, 30, 24


class Block(nn.Module):
    def __init__(self, qkv: str, pre_norm: bool, gelu: str, sdpa: bool):
        super().__init__()
        self.qkv_layout, self.pre_norm, self.sdpa = qkv, pre_norm, sdpa
        if qkv != "separate":
            self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        else:
            self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.out = nn.Linear(WIDTH, WIDTH)
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.up, self.down, self.act = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH), nn.GELU(gelu)

    def attention(self, x, bias):
        n, length, _ = x.shape
        dim = WIDTH // HEADS
        if self.qkv_layout == "packed":  # timm
            q, k, v = self.qkv(x).reshape(n, length, 3, HEADS, dim).permute(2, 0, 3, 1, 4).unbind(0)
        elif self.qkv_layout == "chunk":  # vit-pytorch, GPT-2: Split (or Slice) on the features, then the heads
            q, k, v = (t.view(n, length, HEADS, dim).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        else:  # BERT
            q, k, v = (p(x).view(n, length, HEADS, dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            y = ((q @ k.transpose(-2, -1)) / dim**0.5 + bias).softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(n, length, WIDTH))

    def forward(self, x, bias):
        if self.pre_norm:
            x = x + self.attention(self.norm1(x), bias)
            return x + self.down(self.act(self.up(self.norm2(x))))
        x = self.norm1(x + self.attention(x, bias))
        return self.norm2(x + self.down(self.act(self.up(x))))


class Encoder(nn.Module):
    """Token + position embeddings, two blocks, mean over the unpadded tokens: [N, L] ids and mask -> [N, WIDTH]."""

    def __init__(self, **block):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, WIDTH), nn.Embedding(MAX_LEN, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.blocks = nn.ModuleList([Block(**block) for _ in range(2)])

    def forward(self, ids, mask):
        x = self.norm(self.tokens(ids) + self.positions(torch.arange(ids.shape[1]).unsqueeze(0)))
        bias = (1.0 - mask[:, None, None, :].float()) * -1e4  # BERT's extended attention mask
        for block in self.blocks:
            x = block(x, bias)
        m = mask.unsqueeze(-1).float()
        return (x * m).sum(1) / m.sum(1).clamp(min=1e-6)


def export(*, dynamo: bool, opset: int, **block) -> onnx.ModelProto:
    torch.manual_seed(opset)
    model = Encoder(**block).eval()
    args = (torch.randint(0, VOCAB, (2, 7)), torch.ones(2, 7, dtype=torch.int64))
    f = io.BytesIO()
    names = {"input_names": ["ids", "mask"], "output_names": ["pooled"], "opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=MAX_LEN)
            dims = {"ids": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}}
            torch.onnx.export(model, args, f, dynamo=True, dynamic_shapes=dims, verbose=False, **names)
        else:
            axes = {"ids": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}}
            torch.onnx.export(model, args, f, dynamo=False, dynamic_axes=axes, **names)
    return onnx.load_from_string(f.getvalue())


def feeds(batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, length), np.int64)
    mask[-1, length // 2 :] = 0  # the last sequence padded
    return {"ids": rng.integers(0, VOCAB, (batch, length)), "mask": mask}


def assert_removal_equals_masking(model: onnx.ModelProto, plan: dict[str, np.ndarray]) -> onnx.ModelProto:
    pruned, _ = apply_pass(model, remove_channels, plan=plan)
    onnx.checker.check_model(pruned, full_check=True)
    reference = mask_channels(model, plan)
    for batch, length in ((1, 5), (3, 9), (2, MAX_LEN)):
        x = feeds(batch, length, seed=length)
        assert_outputs_close(ort_run(pruned, x), ort_run(reference, x), rtol=1e-4, atol=1e-5)
    assert [i.name for i in pruned.graph.input] == ["ids", "mask"]
    assert [d.dim_param for d in pruned.graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    return pruned


EXPORTS = [  # (exporter, opset, Q/K/V layout, pre-norm, GELU, scaled_dot_product_attention)
    ("torchscript", 13, "separate", False, "none", False),  # LayerNorm decomposed (ReduceMean/Sub/Pow/Sqrt/Div)
    ("torchscript", 13, "chunk", True, "none", False),  # chunk as Slice with bounds from Shape
    ("torchscript", 14, "packed", True, "tanh", True),
    ("torchscript", 17, "separate", True, "tanh", True),
    ("torchscript", 20, "packed", False, "none", False),  # Gelu op
    ("dynamo", 18, "separate", True, "tanh", True),
    ("dynamo", 18, "packed", False, "none", False),
    ("dynamo", 18, "chunk", True, "tanh", False),  # chunk as Split
    ("dynamo", 20, "packed", True, "none", True),
]


@pytest.mark.parametrize(
    ("exporter", "opset", "qkv", "pre_norm", "gelu", "sdpa"), EXPORTS, ids=lambda v: str(v).lower()
)
def test_exported_encoder_loses_whole_heads_and_units(exporter, opset, qkv, pre_norm, gelu, sdpa):
    """In every block, one group of 4 classes (the heads: Q, K, V columns and output-projection rows) and one of 32
    (the MLP units), neither blocked; the hidden width stays whole (LayerNorm and residuals); removing every other
    head and unit equals masking them, at several batch sizes and sequence lengths with a padded sequence."""
    model = export(dynamo=exporter == "dynamo", opset=opset, qkv=qkv, pre_norm=pre_norm, gelu=gelu, sdpa=sdpa)
    packed = qkv != "separate"
    model = apply_pass(model, cleanup)[0]
    analysis = find_channel_groups(to_graph(model))
    free = sorted(len(g.classes) for g in analysis.groups if not g.blocked)
    assert free == [HEADS, HEADS, 2 * WIDTH, 2 * WIDTH], (free, analysis.blockers[:4])
    heads = [g for g in analysis.groups if not g.blocked and len(g.classes) == HEADS]
    assert all(len(g.producers) == (1 if packed else 3) for g in heads), [g.producers for g in heads]
    plan = every_other_channel(analysis)
    pruned = assert_removal_equals_masking(model, plan)
    weights = sorted(t.dims[-1] for t in pruned.graph.initializer if len(t.dims) == 2 and t.dims[0] == WIDTH)
    assert weights.count(WIDTH) >= 2  # the output projections' columns: the hidden width is kept
    assert weights.count(WIDTH // 2 * (3 if packed else 1)) == (2 if packed else 6)  # half the heads' Q, K, V


def test_onnxruntime_fused_encoder_loses_units_and_names_the_fused_ops():
    """After onnxruntime's transformer optimizer (Attention, SkipLayerNormalization, BiasGelu...): shapes come from
    onnxruntime's symbolic inference, the MLP units go through BiasGelu, and the fused ops that hide the heads are
    named with what to do."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    model = export(dynamo=False, opset=17, qkv="separate", pre_norm=False, gelu="none", sdpa=False)
    fused = optimizer.optimize_by_fusion(model, model_type="bert", num_heads=HEADS, hidden_size=WIDTH).model
    ops = {(n.domain, n.op_type) for n in fused.graph.node}
    assert ("com.microsoft", "BiasGelu") in ops and ("com.microsoft", "SkipLayerNormalization") in ops, ops
    analysis = find_channel_groups(to_graph(apply_pass(fused, cleanup)[0]))
    assert sorted(len(g.classes) for g in analysis.groups if not g.blocked) == [2 * WIDTH, 2 * WIDTH]
    assert any("fused com.microsoft::SkipLayerNormalization" in why and "before" in why for _, why in analysis.blockers)
    assert_removal_equals_masking(fused, every_other_channel(analysis))


@pytest.mark.parametrize("restores", [True, False])
def test_reshape_transpose_reshape_round_trip_becomes_one_transpose(restores):
    """[N, 4, L, 3] -> [N*4, L, 3] -> [N*4, 3, L] -> [N, 4, 3, L] with both targets computed from `Shape` of a dynamic
    N and L (as the dynamo exporter writes ``k.transpose(-2, -1)``) is one Transpose; the same chain that does not
    give the leading dims back ([N, 2, 6, L]) is left alone. Either way the outputs are the original's."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, "l", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    lead = ["n_4"] if restores else ["n", "two"]
    nodes = [
        helper.make_node("Shape", ["x"], ["n"], start=0, end=1),
        helper.make_node("Shape", ["x"], ["n_4"], start=0, end=2),
        helper.make_node("Shape", ["x"], ["l"], start=2, end=3),
        helper.make_node("Concat", ["minus_one", "l", "three"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["turned"], perm=[0, 2, 1]),
        helper.make_node("Concat", [*lead, "three" if restores else "six", "l"], ["back_shape"], axis=0),
        helper.make_node("Reshape", ["turned", "back_shape"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array([v], np.int64), k)
        for k, v in (("minus_one", -1), ("two", 2), ("three", 3), ("six", 6))
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    cleaned, report = apply_pass(model, cleanup)
    ops = [n.op_type for n in cleaned.graph.node]
    assert (ops == ["Transpose"]) == restores, ops
    assert report.counts.get("transpose_round_trips_merged", 0) == int(restores)
    rng = np.random.default_rng(0)
    for n, length in ((1, 2), (3, 5)):
        feed = {"x": rng.standard_normal((n, 4, length, 3)).astype(np.float32)}
        assert_outputs_close(ort_run(cleaned, feed), ort_run(model, feed), rtol=0, atol=0)


def test_channel_method_counts_attention_heads_in_heads(tmp_path):
    """`--method channel` on the exported encoder removes whole heads; the report counts them as heads (of 4 per
    block), the MLP units as channels, and the result is valid with a dynamic sequence."""
    import onnxprune

    model = export(dynamo=True, opset=18, qkv="separate", pre_norm=False, gelu="none", sdpa=True)
    rng = np.random.default_rng(1)
    calib = {"ids": rng.integers(0, VOCAB, (64, 12)), "mask": np.ones((64, 12), np.int64)}
    pruned, report = onnxprune.prune(model, ratio=0.3, calib=calib, method="channel", force=True, latency_batch=0)
    kinds = [r for r in report.facts["removed"].values() if r["removed"]]
    heads = [r for r in kinds if r["kind"] == "head"]
    assert heads and all(r["of"] == HEADS and r["removed"] < HEADS for r in heads), kinds
    assert {r["kind"] for r in kinds} <= {"head", "channel"}
    from onnxprune.cli import _kinds  # the summary line says how many heads of how many went

    assert report.facts["attention_heads"] == 2 * HEADS
    assert f"{sum(r['removed'] for r in heads)} of {2 * HEADS} attention heads" in _kinds(report.facts)
    onnx.checker.check_model(pruned, full_check=True)
    for batch, length in ((1, 5), (3, 17)):
        assert ort_run(pruned, feeds(batch, length, seed=batch))["pooled"].shape == (batch, WIDTH)


def test_heads_and_units_share_one_knapsack_and_heads_are_not_rounded():
    """With heads in the graph the channel allocation is the knapsack over the output energy each head and unit
    feeds its readers; kept counts rounded to 8 apply to the MLP units, not to the 4 heads of a block (rounded up
    to 8, a block of 4 heads would never lose one)."""
    import onnxprune

    model = export(dynamo=False, opset=17, qkv="packed", pre_norm=True, gelu="none", sdpa=False)
    rng = np.random.default_rng(2)
    calib = {"ids": rng.integers(0, VOCAB, (64, 12)), "mask": np.ones((64, 12), np.int64)}
    _, report = onnxprune.prune(model, ratio=0.4, calib=calib, method="channel", force=True, round_to=8)
    assert "knapsack" in report.facts["plan_source"]
    removed = [r for r in report.facts["removed"].values() if r["removed"]]
    assert any(r["kind"] == "head" for r in removed), removed
    units = [r for r in removed if r["kind"] == "channel"]
    assert units and all((r["of"] - r["removed"]) % 8 == 0 for r in units), units


def test_an_unreachable_request_names_channels_and_heads_not_bases():
    """The heads-and-units knapsack refuses a ratio out of reach in its own words (it splits no layer)."""
    import onnxprune

    model = export(dynamo=False, opset=17, qkv="separate", pre_norm=False, gelu="none", sdpa=False)
    rng = np.random.default_rng(3)
    calib = {"ids": rng.integers(0, VOCAB, (32, 8)), "mask": np.ones((32, 8), np.int64)}
    with pytest.raises(onnxprune.BudgetError, match="keeping fewer channels or heads in the") as caught:
        onnxprune.prune(model, ratio=0.9, calib=calib, method="channel", force=True, latency_batch=0)
    assert "bases" not in str(caught.value) and caught.value.reachable < 0.9


def test_parameters_are_counted_on_the_model_as_written_whatever_the_shapes_for_macs():
    """A position table gathered by arange(seq) counts whole (MAX_LEN rows) when MACs are counted at 5 tokens; with
    the inputs fixed first it folded to the 5 rows that length reads (a new user's summary was 1.5 % short)."""
    from onnxprune.budget import count

    model = export(dynamo=False, opset=17, qkv="separate", pre_norm=False, gelu="none", sdpa=False)
    free, at_five = count(model), count(model, shapes={"ids": [1, 5], "mask": [1, 5]})
    assert at_five[0] == free[0] and at_five[1] > free[1]
    tables = (VOCAB + MAX_LEN) * WIDTH
    assert free[0] >= tables + 2 * (4 * WIDTH * WIDTH + 2 * WIDTH * 2 * WIDTH)
