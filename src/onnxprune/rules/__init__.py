"""THE op table: how a channel change enters, passes through, couples at, or stops at each op type.

Every op type onnxprune understands has one builder here, registered with ``@rule("Op")``. A builder looks at
one node and the channel flows reaching it and returns a :class:`Step` (what leaves the node, which constant
axes follow which tensor's channels, which attributes to rewrite) or a ``str``: the reason the node blocks.
Group finding, removal, masking, counting and criteria all read these steps; nothing else branches on
``node.op`` to learn how channels move.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs
from scipy import special

from onnxprune.rules.layouts import GATES, LAYOUTS, const, gemm_bias_error, input_of


class Kind(Enum):
    """What a node does to the channels reaching it."""

    PRODUCER = "producer"  # makes new channels from its weights (Conv, Gemm, MatMul with constant weight)
    PER_CHANNEL = "per_channel"  # one parameter slice per channel (BN, depthwise Conv, per-channel Mul/Add)
    PASS_THROUGH = "pass_through"  # channels go through untouched (activations, pools, Resize, Pad)
    COUPLING = "coupling"  # ties or remaps channels of several tensors (Add, Concat, Split, Reshape...)


@dataclass
class Flow:
    """The channels a tensor carries along `axis`: one channel id per position, and its value when removed.

    ``ids`` may repeat a channel (a Flatten maps one channel to a block of features). ``zero`` is the value
    each position takes everywhere when its channel's producers are masked (NaN: not a known constant).
    """

    axis: int
    rank: int
    ids: np.ndarray
    zero: np.ndarray

    def at_rank(self, rank: int) -> int:
        """The channel axis once broadcast to `rank` dimensions."""
        return self.axis + rank - self.rank


@dataclass(frozen=True)
class ParamSlice:
    """Constant input `index` of a node: axis -> name of the tensor whose kept channels select along it.

    With `blocks`, an axis may also hold several consecutive blocks of those channels (the gates of a recurrent
    layer: LSTM weights are [directions, 4 * hidden, in], gates i, o, f, c one after the other); each block is
    selected alike.
    """

    index: int
    axes: tuple[tuple[int, str], ...]
    blocks: bool = False

    def positions(self, length: int, full: int, channels: np.ndarray) -> np.ndarray | None:
        """Positions along an axis of `length` that hold `channels` (of the `full` a flow carries); None: not sliced.

        Args:
            length: The constant's size along the axis.
            full: Number of channels of the tensor that selects along it.
            channels: Channel positions (0 <= c < full), in order.
        """
        if length == full:
            return np.asarray(channels, dtype=np.int64)
        if not self.blocks or full == 0 or length % full:
            return None
        return (np.arange(length // full)[:, None] * full + np.asarray(channels, dtype=np.int64)[None]).ravel()


FoldFn = Callable[[gs.Node, np.ndarray, np.ndarray, "Walk"], None]


@dataclass(frozen=True)
class Fold:
    """How a consumer takes the constant its removed input channels still carried into its bias.

    ``apply(node, removed_positions, values, walk)`` edits the node before slicing; None when no exact fold
    exists (``why_not`` says why).
    """

    tensor: str
    apply: FoldFn | None
    why_not: str = ""


Rewrite = Callable[[gs.Node, dict[str, np.ndarray], "Walk"], None]


@dataclass
class Step:
    """What the group finder learned about one node."""

    kind: Kind
    outputs: list[Flow | None]
    params: list[ParamSlice] = field(default_factory=list)
    rewrite: Rewrite | None = None
    fold: Fold | None = None
    approximate: str = ""  # why removing channels here is not the same as masking them (empty: it is)


class Walk(Protocol):
    """What a rule may ask of the group finder."""

    opset: int

    def new_ids(self, node: gs.Node, n: int) -> np.ndarray:
        """Fresh channel ids for `n` output channels of producer `node`."""

    def source_ids(self, n: int, reason: str) -> np.ndarray:
        """Ids for channels that come from no producer; their groups are blocked with `reason`."""

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        """Channels at the same positions of `a` and `b` must be removed together."""

    def block(self, ids: np.ndarray, reason: str) -> None:
        """Channels `ids` cannot be removed, for `reason` (which names the node)."""

    def label(self, ids: np.ndarray, unit: str) -> None:
        """Channels `ids` are units of a named kind ("head": an attention head); the report counts them so."""

    def shape(self, tensor: gs.Tensor) -> list[int | None] | None:
        """The tensor's inferred shape (None where a dim is unknown), or None without a rank."""


RuleFn = Callable[[gs.Node, list[Flow | None], Walk], "Step | str"]
_RULES: dict[str, RuleFn] = {}


def rule(*ops: str) -> Callable[[RuleFn], RuleFn]:
    """Register a rule builder for op types `ops` (``"domain::Op"`` for an op outside the default domain)."""

    def register(fn: RuleFn) -> RuleFn:
        for op in ops:
            _RULES[op] = fn
        return fn

    return register


def registered_ops() -> list[str]:
    """Every op type with a rule."""
    return sorted(_RULES)


def rule_for(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    """The node's step, or the reason it blocks the channels reaching it."""
    if node.domain not in (None, "", "ai.onnx"):
        fn = _RULES.get(f"{node.domain}::{node.op}")
        if fn is not None:
            return fn(node, flows, walk)
        if node.domain == "com.microsoft" and node.op in ORT_FUSED:
            return (
                f"onnxruntime's fused {node.domain}::{node.op} has no channel rule (its heads or width cannot be "
                "followed inside it: prune the model before onnxruntime's transformer optimizer fuses it)"
            )
        return f"custom-domain op {node.domain}::{node.op} has no channel rule"
    fn = _RULES.get(node.op)
    if fn is None:
        return f"no channel rule for op {node.op!r}"
    return fn(node, flows, walk)


# --------------------------------------------------------------------------------------------- helpers


def _same(flow: Flow, zero: np.ndarray | None = None, *, axis: int | None = None, rank: int | None = None) -> Flow:
    return Flow(
        flow.axis if axis is None else axis,
        flow.rank if rank is None else rank,
        flow.ids,
        flow.zero if zero is None else zero,
    )


def _spatial_pads(node: gs.Node) -> bool:
    pads = node.attrs.get("pads", [])
    return any(p != 0 for p in pads) or node.attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER")


def _unknown(zero: np.ndarray) -> np.ndarray:
    return np.full_like(zero, np.nan)


# ----------------------------------------------------------------------------------------- producers


def _producer(
    node: gs.Node,
    flows: list[Flow | None],
    walk: Walk,
    *,
    weight: np.ndarray,
    fold: FoldFn | None,
    why_not: str = "",
) -> Step | str:
    """Shared by Conv, ConvTranspose, Gemm and MatMul: new output channels; input channels sliced from W.

    The weight's axes, the bias input and the channel axis are the op's weight layout (``layouts.LAYOUTS``).
    """
    layout = LAYOUTS[node.op]
    out_axis, in_axis = layout.axes(node)
    bias_index, in_channel_axis = layout.bias, layout.channel_axis(node)
    data = flows[0] if flows else None
    out_shape = walk.shape(node.outputs[0])
    rank = len(out_shape) if out_shape is not None else None
    n_out = weight.shape[out_axis]
    if rank is None:  # its channels still form a group: a blocked one, with the reason, never silently untracked
        why = "output shape is unknown (shape inference could not resolve it)"
        walk.block(walk.new_ids(node, n_out), f"{node.op} '{node.name}': {why}")
        return why
    axes: list[tuple[int, str]] = [(out_axis, node.outputs[0].name)]
    folding = None
    if data is not None:
        if in_channel_axis is None or data.at_rank(data.rank) != in_channel_axis % data.rank:
            return f"channels arrive on axis {data.axis}, the op reads them on another axis"
        if len(data.ids) != weight.shape[in_axis]:
            return f"weight has {weight.shape[in_axis]} input channels, the tensor carries {len(data.ids)}"
        axes.append((in_axis, node.inputs[0].name))
        folding = Fold(node.inputs[0].name, fold, why_not)
    params = [ParamSlice(1, tuple(axes))]
    if bias_index is not None:  # sliced on its last axis where it has one entry per output (created by folds too)
        params.append(ParamSlice(bias_index, ((-1, node.outputs[0].name),)))
    out_axis_t = layout.channel_axis(node, rank)
    ids = walk.new_ids(node, n_out)
    return Step(
        Kind.PRODUCER, [Flow(out_axis_t, rank, ids, _masked_output(node, bias_index, n_out))], params, fold=folding
    )


def _masked_output(node: gs.Node, bias_index: int | None, n_out: int) -> np.ndarray:
    """What a removed output channel holds: 0, or beta * b where one bias value broadcasts over every channel."""
    bias = const(node.inputs[bias_index]) if bias_index is not None and input_of(node, bias_index) is not None else None
    if bias is None or bias.shape[-1:] == (n_out,):
        return np.zeros(n_out)
    if bias.size == 1:
        return np.full(n_out, float(bias.ravel()[0]) * float(node.attrs.get("beta", 1.0)))
    return np.full(n_out, np.nan)


def _add_to_bias(node: gs.Node, delta: np.ndarray, walk: Walk, *, scale: float = 1.0) -> None:
    """Bias += delta / scale for Conv/ConvTranspose/Gemm, creating the bias when there is none."""
    dtype = const(node.inputs[1]).dtype
    if len(node.inputs) > 2 and node.inputs[2].name:
        old = const(node.inputs[2]).astype(np.float64)
        new = (np.broadcast_to(old, old.shape[:-1] + delta.shape) if old.shape[-1:] == (1,) else old) + delta / scale
    else:
        new = delta
        while len(node.inputs) < 3:
            node.inputs.append(gs.Variable.empty())
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0
    name = getattr(walk, "fresh_name", lambda base: base)(f"{node.name}/bias")
    node.inputs[2] = gs.Constant(name, np.ascontiguousarray(new, dtype=dtype))


def _fold_conv(node: gs.Node, removed: np.ndarray, values: np.ndarray, walk: Walk) -> None:
    w = const(node.inputs[1]).astype(np.float64)
    per_channel = w[:, removed].reshape(w.shape[0], len(removed), -1).sum(-1)  # [Co, removed]: kernel summed
    _add_to_bias(node, per_channel @ values, walk)


def _fold_conv_transpose(node: gs.Node, removed: np.ndarray, values: np.ndarray, walk: Walk) -> None:
    w = const(node.inputs[1]).astype(np.float64)
    _add_to_bias(node, np.einsum("ro,r->o", w[removed].reshape(len(removed), w.shape[1], -1).sum(-1), values), walk)


def _fold_gemm(node: gs.Node, removed: np.ndarray, values: np.ndarray, walk: Walk) -> None:
    w = const(node.inputs[1]).astype(np.float64)
    rows = w[:, removed].T if node.attrs.get("transB", 0) else w[removed]
    delta = float(node.attrs.get("alpha", 1.0)) * (values @ rows)
    _add_to_bias(node, delta, walk, scale=float(node.attrs.get("beta", 1.0)))


@rule("Conv")
def _conv(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    w = const(node.inputs[1])
    if w is None:
        return f"weight '{node.inputs[1].name}' is computed in the graph, so its channels cannot be sliced"
    group = int(node.attrs.get("group", 1))
    if group == 1:
        exact = not _spatial_pads(node)  # without padding every output position sees a constant channel alike
        return _producer(
            node,
            flows,
            walk,
            weight=w,
            fold=_fold_conv if exact else None,
            why_not="a padded Conv sees a constant channel unevenly",
        )
    if group == w.shape[0] and w.shape[1] == 1 and flows and flows[0] is not None and len(flows[0].ids) == group:
        return _depthwise(node, flows[0], w)
    return f"grouped Conv (group={group}) is not supported"


def _depthwise(node: gs.Node, flow: Flow, w: np.ndarray) -> Step:
    name = node.inputs[0].name
    params = [ParamSlice(1, ((0, name),))]
    bias = const(input_of(node, 2)) if input_of(node, 2) is not None else None
    if bias is not None:
        params.append(ParamSlice(2, ((0, name),)))
    b = bias if bias is not None else np.zeros(w.shape[0])
    if np.all(flow.zero == 0):
        zero = b.astype(np.float64)
    elif _spatial_pads(node):
        zero = _unknown(flow.zero)
    else:
        zero = flow.zero * w.reshape(w.shape[0], -1).sum(1) + b

    def rewrite(node: gs.Node, keeps: dict[str, np.ndarray], walk: Walk) -> None:
        node.attrs["group"] = int(len(keeps[name]))

    return Step(Kind.PER_CHANNEL, [_same(flow, zero)], params, rewrite=rewrite)


@rule("ConvTranspose")
def _conv_transpose(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    w = const(node.inputs[1])
    if w is None:
        return f"weight '{node.inputs[1].name}' is computed in the graph, so its channels cannot be sliced"
    if int(node.attrs.get("group", 1)) != 1:
        return f"grouped ConvTranspose (group={node.attrs['group']}) is not supported"
    exact = all(k == 1 for k in w.shape[2:]) and all(s == 1 for s in node.attrs.get("strides", [1]))
    return _producer(
        node,
        flows,
        walk,
        weight=w,
        fold=_fold_conv_transpose if exact and not _spatial_pads(node) else None,
        why_not="a strided or padded ConvTranspose sees a constant channel unevenly",
    )


@rule("Gemm")
def _gemm(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    w = const(node.inputs[1])
    if w is None:
        return f"weight '{node.inputs[1].name}' is not a constant"
    if node.attrs.get("transA", 0):
        return "Gemm with transA=1 is not supported"
    trans_b = int(node.attrs.get("transB", 0))
    if why := gemm_bias_error(node, w.shape[0 if trans_b else 1]):
        return why
    return _producer(
        node,
        flows,
        walk,
        weight=w,
        fold=_fold_gemm,
    )


@rule("MatMul")
def _matmul(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    w = const(node.inputs[1])
    if w is None and const(node.inputs[0]) is None and any(f is not None for f in flows):
        return _activation_matmul(node, flows, walk)
    if w is None or w.ndim != 2:
        if flows and any(f is not None for f in flows):
            return "MatMul without a constant 2-D weight on the right"
        return Step(Kind.PASS_THROUGH, [None])
    return _producer(
        node,
        flows,
        walk,
        weight=w,
        fold=None,
        why_not="MatMul has no bias to fold into",
    )


def _activation_matmul(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    """A product of two computed tensors (attention's Q K^T and softmax(.) V): channels on a batch axis pass.

    Both operands must carry the same channels on that axis (they are coupled), or the one without them must have
    size 1 there (it broadcasts). Channels on the rows of the left operand or the columns of the right one pass to
    the same axis of the output; channels on the contracted axis pass nowhere, and must reach it on both sides
    (removing them from both equals masking them: their terms of the sum are zero).
    """
    shapes = [walk.shape(t) for t in node.inputs]
    out_shape = walk.shape(node.outputs[0])
    if out_shape is None or any(s is None or len(s) < 2 for s in shapes):
        return "MatMul of computed tensors of unknown (or 1-D) shape"
    rank = len(out_shape)
    axes = [None if f is None else f.at_rank(rank) for f in flows]
    left, right = flows
    if left is not None and right is not None:
        contracted = left.axis == left.rank - 1 and right.axis == right.rank - 2
        if not contracted and (axes[0] != axes[1] or axes[0] >= rank - 2):
            return "MatMul of computed tensors whose channels do not line up"
        if len(left.ids) != len(right.ids):
            return f"MatMul of computed tensors with {len(left.ids)} vs {len(right.ids)} channels"
        walk.unify(left.ids, right.ids)
        if contracted:  # the channels end here
            return Step(Kind.COUPLING, [None])
        zero = np.where((left.zero == 0) | (right.zero == 0), 0.0, np.nan)
        return Step(Kind.COUPLING, [Flow(axes[0], rank, left.ids, zero)])
    i, flow = next((i, f) for i, f in enumerate(flows) if f is not None)
    other = shapes[1 - i]
    if axes[i] < rank - 2:  # a batch axis: the other operand must broadcast over it
        at = axes[i] - (rank - len(other))
        if at >= 0 and other[at] != 1:
            return f"MatMul meets tensor '{node.inputs[1 - i].name}' whose channels come from no tracked producer"
        return Step(Kind.PASS_THROUGH, [Flow(axes[i], rank, flow.ids, _unknown(flow.zero))])
    if (i, axes[i]) in ((0, rank - 2), (1, rank - 1)):  # rows of the left, columns of the right
        zero = np.where(flow.zero == 0, 0.0, np.nan)
        return Step(Kind.PASS_THROUGH, [Flow(axes[i], rank, flow.ids, zero)])
    return f"MatMul contracts the channels with tensor '{node.inputs[1 - i].name}', which carries none"


# ------------------------------------------------------------------------------------------ recurrent

_ZERO_AT_ZERO = {"tanh", "relu", "softsign", "leakyrelu", "elu", "thresholdedrelu"}  # f(0) = 0
# activations after the first (LSTM g and h, GRU h, RNN f): a unit with zero weights and bias then stays at 0
_STATE_ACTIVATIONS = {"LSTM": (1, 2), "GRU": (1,), "RNN": (0,)}


@rule("LSTM", "GRU", "RNN")
def _recurrent(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    """A recurrent layer (ONNX LSTM / GRU / RNN): its hidden units are output channels, its input width is sliced.

    Hidden unit h is the same unit in every direction (`hidden_size` is one attribute): it owns rows h of each gate
    block of W, R and the biases, and column h of R. With its weights and biases zero and a zero initial state the
    unit stays at 0 through time (every gate's pre-activation is 0, so the cell is g(0) = 0 and the output h(0) = 0
    for the default tanh), so removing it equals masking it. Input channels slice W's last axis; a constant they
    still carry folds into the input bias Wb. Source: ONNX operator spec, LSTM / GRU / RNN (opset 7-22).
    """
    gates = GATES[node.op]
    w, r = (const(node.inputs[i]) if input_of(node, i) is not None else None for i in (1, 2))
    if w is None or r is None or w.ndim != 3 or r.ndim != 3:
        return f"{node.op} weights W and R are not constants of rank 3"
    if any(f is not None for f in flows[1:]):
        return f"channels reach an input of the {node.op} other than its sequence"
    names = [str(a).lower() for a in node.attrs.get("activations", [])]
    per_direction = len(names) // max(len(w), 1) if names else 0
    state = [names[d * per_direction + k] for d in range(len(w)) for k in _STATE_ACTIVATIONS[node.op]] if names else []
    if any(a not in _ZERO_AT_ZERO for a in state):
        return f"{node.op} activations {names} do not keep a removed unit at 0"
    hidden = w.shape[1] // gates
    initial = [i for i in ((5, 6) if node.op == "LSTM" else (5,)) if input_of(node, i) is not None]
    computed = [i for i in initial if const(node.inputs[i]) is None]
    for i in computed:
        if not _zero_fill(node.inputs[i]):
            return f"{node.op} initial state '{node.inputs[i].name}' is computed in the graph (not a zero fill)"
    if any(np.any(const(node.inputs[i]) != 0) for i in initial if i not in computed):
        return f"{node.op} initial state is not zero, so a removed unit would not stay at 0"
    outputs = [t for t in node.outputs if t.name]
    y = node.outputs[0].name if node.outputs and node.outputs[0].name else outputs[0].name if outputs else None
    if y is None:
        return Step(Kind.PRODUCER, [None] * len(node.outputs))
    params = [ParamSlice(1, ((1, y),), blocks=True), ParamSlice(2, ((1, y), (2, y)), blocks=True)]
    params += [ParamSlice(i, ((1, y),), blocks=True) for i in (3, 7) if input_of(node, i) is not None]
    params += [ParamSlice(i, ((2, y),)) for i in initial if i not in computed]
    folding = None
    data = flows[0] if flows else None
    if data is not None:
        if data.at_rank(data.rank) != data.rank - 1:
            return f"channels arrive on axis {data.axis}, the {node.op} reads them on the last"
        if len(data.ids) != w.shape[2]:
            return f"W has {w.shape[2]} inputs, the tensor carries {len(data.ids)}"
        params[0] = ParamSlice(1, ((1, y), (2, node.inputs[0].name)), blocks=True)
        folding = Fold(node.inputs[0].name, _fold_recurrent)
    ids = walk.new_ids(node, hidden)
    zero = np.zeros(hidden)
    out = [Flow(3, 4, ids, zero)] + [Flow(2, 3, ids, zero)] * (len(node.outputs) - 1)
    out = [f if t.name else None for f, t in zip(out, node.outputs)]

    def rewrite(node: gs.Node, keeps: dict[str, np.ndarray], walk: Walk) -> None:
        node.attrs["hidden_size"] = len(keeps.get(y, ids))
        for i in computed:  # a zero fill of [D, B, H]: the op's own default, with no shape to rewrite
            node.inputs[i] = gs.Variable.empty()

    return Step(Kind.PRODUCER, out, params, rewrite=rewrite, fold=folding)


def _zero_fill(tensor: gs.Tensor) -> bool:
    """Whether `tensor` is made by a ConstantOfShape of value 0 (how exporters write a zero initial state)."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "ConstantOfShape":
        return False
    value = producer.attrs.get("value")
    return value is None or not np.any(np.asarray(getattr(value, "values", value)))


def _fold_recurrent(node: gs.Node, removed: np.ndarray, values: np.ndarray, walk: Walk) -> None:
    """Input bias Wb [D, gates*H] += W[:, :, removed] @ values (B = [Wb, Rb] per direction; created when absent)."""
    w = const(node.inputs[1]).astype(np.float64)
    delta = w[:, :, removed] @ values  # [D, gates*H]
    dtype = const(node.inputs[1]).dtype
    if input_of(node, 3) is not None:
        bias = const(node.inputs[3]).astype(np.float64).copy()
    else:
        bias = np.zeros((w.shape[0], 2 * w.shape[1]))
        while len(node.inputs) < 4:
            node.inputs.append(gs.Variable.empty())
    bias[:, : w.shape[1]] += delta
    name = getattr(walk, "fresh_name", lambda base: base)(f"{node.name}/bias")
    node.inputs[3] = gs.Constant(name, np.ascontiguousarray(bias, dtype=dtype))


# -------------------------------------------------------------------------------------- per channel


@rule("BatchNormalization")
def _batch_norm(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    values = [const(t) for t in node.inputs[1:5]]
    if any(v is None for v in values):
        return "BatchNormalization parameters are not constants"
    if flow is None:
        return Step(Kind.PER_CHANNEL, [None] * len(node.outputs))
    if flow.axis != 1:
        return "BatchNormalization normalises axis 1, the channels are on another axis"
    scale, bias, mean, var = (v.astype(np.float64) for v in values)
    eps = float(node.attrs.get("epsilon", 1e-5))
    zero = (flow.zero - mean) / np.sqrt(var + eps) * scale + bias
    name = node.inputs[0].name
    return Step(
        Kind.PER_CHANNEL,
        [_same(flow, zero)] + [None] * (len(node.outputs) - 1),
        [ParamSlice(i, ((0, name),)) for i in range(1, 5)],
    )


@rule("InstanceNormalization")
def _instance_norm(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PER_CHANNEL, [None])
    if flow.axis != 1 or const(node.inputs[1]) is None or const(node.inputs[2]) is None:
        return "InstanceNormalization with channels off axis 1 or computed parameters"
    name = node.inputs[0].name
    zero = const(node.inputs[2]).astype(np.float64)
    return Step(Kind.PER_CHANNEL, [_same(flow, zero)], [ParamSlice(i, ((0, name),)) for i in (1, 2)])


@rule("LayerNormalization")
def _layer_norm(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    """Normalising over the channel axis alone: scale and bias slice with the channels.

    The mean and variance are then taken over the kept channels only, so the result is not the masked model's (the
    report says so; the refit after it, with --calib, absorbs the change).
    """
    flow = flows[0]
    if flow is None:
        return Step(Kind.PER_CHANNEL, [None] * len(node.outputs))
    if any(f is not None for f in flows[1:]):
        return "channels reach the scale or bias input"
    axis = int(node.attrs.get("axis", -1)) % flow.rank
    if axis != flow.axis or axis != flow.rank - 1:
        return f"normalises over axes {axis}..{flow.rank - 1}, which mix the channels (axis {flow.axis}) with others"
    if any(input_of(node, i) is not None and const(node.inputs[i]) is None for i in (1, 2)):
        return "LayerNormalization scale or bias is computed in the graph"
    if any(t.outputs for t in node.outputs[1:]):
        return "its mean / inverse deviation outputs are used"
    name = node.inputs[0].name
    params = [ParamSlice(i, ((-1, name),)) for i in (1, 2) if input_of(node, i) is not None]
    why = "mean and variance are now over the kept channels only (not equal to masking; --calib refits after it)"
    return Step(
        Kind.PER_CHANNEL, [_same(flow, _unknown(flow.zero))] + [None] * (len(node.outputs) - 1), params, approximate=why
    )


@rule("PRelu")
def _prelu(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    return _binary(node, flows, walk, lambda x, s: np.where(x < 0, x * s, x))


# ------------------------------------------------------------------------------------- pass through

_UNARY: dict[str, Callable[[gs.Node, np.ndarray], np.ndarray]] = {
    "Relu": lambda n, x: np.maximum(x, 0),
    "LeakyRelu": lambda n, x: np.where(x < 0, x * n.attrs.get("alpha", 0.01), x),
    "Elu": lambda n, x: np.where(x < 0, n.attrs.get("alpha", 1.0) * np.expm1(x), x),
    "Selu": lambda n, x: n.attrs.get("gamma", 1.0507) * np.where(x < 0, n.attrs.get("alpha", 1.6733) * np.expm1(x), x),
    "Sigmoid": lambda n, x: 1 / (1 + np.exp(-x)),
    "HardSigmoid": lambda n, x: np.clip(n.attrs.get("alpha", 0.2) * x + n.attrs.get("beta", 0.5), 0, 1),
    "HardSwish": lambda n, x: x * np.clip(x / 6 + 0.5, 0, 1),
    "Tanh": lambda n, x: np.tanh(x),
    "Softplus": lambda n, x: np.log1p(np.exp(x)),
    "Softsign": lambda n, x: x / (1 + np.abs(x)),
    "Abs": lambda n, x: np.abs(x),
    "Neg": lambda n, x: -x,
    "Identity": lambda n, x: x,
    "Dropout": lambda n, x: x,
    "Cast": lambda n, x: x,
    "Gelu": lambda n, x: _gelu(n, x),
    "Erf": lambda n, x: special.erf(x),
    "Mish": lambda n, x: x * np.tanh(np.log1p(np.exp(x))),
    "Clip": lambda n, x: _clip(n, x),
}


# integer layers of a quantized model (onnxruntime's dynamic and static quantization): left whole, with this reason
QUANTIZED = (
    "ConvInteger",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
    "DynamicQuantizeLSTM",
    "MatMulIntegerToFloat",
)
QUANTIZED_REASON = "quantized layers (integer ops) are not pruned: prune the float model, then quantize it"

CLIPPING = ("Relu", "Clip")  # activations that are the identity between two bounds and constant outside


MOVES_ONLY = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def keeps_class_axis(node: gs.Node, width: int) -> bool:
    """Whether `node` leaves the `width` scores on its input's last axis where they are, on its output's last axis.

    True for ops that only move elements (`MOVES_ONLY`) and keep that axis last and whole, for a Softmax /
    LogSoftmax over it (class scores stay class scores) and for an Add of a constant bias along it (``[width]``,
    leading dims 1). Used to find a model's class-score layer.
    """
    x, out = node.inputs[0], node.outputs[0]
    rank = len(x.shape) if x.shape is not None else None
    if node.op == "Add" and len(node.inputs) == 2:  # a bias per class (MatMul + Add: paddle2onnx's Linear)
        bias = [i for i in node.inputs if isinstance(i, gs.Constant)]
        dims = list(bias[0].shape) if len(bias) == 1 else None
        return dims is not None and all(d == 1 for d in dims[:-1]) and (not dims or dims[-1] in (1, width))
    if node.op in ("Softmax", "LogSoftmax"):
        along = node.attrs.get("axis")
        return rank is not None and ((along is None and rank == 2) or (along is not None and along % rank == rank - 1))
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return rank is not None and perm is not None and perm[-1] == rank - 1
    if node.op == "Reshape":
        target = const(node.inputs[1])
        if target is not None:
            return int(target.reshape(-1)[-1]) in (-1, width)
        if out.shape and out.shape[-1] == width:
            return True
        value = shape_value(node.inputs[1], {})
        return value is not None and value.ndim == 1 and len(value) > 0 and value[-1] in (-1, width)
    return node.op in MOVES_ONLY and bool(out.shape) and out.shape[-1] == width


def may_keep_class_axis(node: gs.Node, width: int) -> bool:
    """`keeps_class_axis`, or what only run time can tell: a Reshape with a computed target, an Add of a constant bias.

    For reading outputs (`runner.sequence_outputs`), where the output's own last axis is checked at run time.
    """
    if node.op == "Reshape" and not isinstance(node.inputs[1], gs.Constant):
        return True
    if node.op == "Add" and any(isinstance(i, gs.Constant) for i in node.inputs):  # MatMul + Add: a Linear
        return True
    return keeps_class_axis(node, width)


def scores_reach(tensor: gs.Tensor, outputs: list[gs.Tensor], width: int, *, at_run_time: bool = False) -> bool:
    """Whether `tensor`'s `width` scores on its last axis reach one of `outputs` still on the last axis.

    Through a chain of single consumers that `keeps_class_axis` (or, with `at_run_time`, `may_keep_class_axis`:
    the caller checks the output it gets).
    """
    keeps = may_keep_class_axis if at_run_time else keeps_class_axis
    t = tensor
    while t not in outputs:
        if len(t.outputs) != 1 or len(t.outputs[0].outputs) != 1 or not keeps(t.outputs[0], width):
            return False
        t = t.outputs[0].outputs[0]
    return True


def clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(lo, hi) of a Relu or a Clip with constant bounds; None for any other op or computed bounds."""
    if node.op not in CLIPPING:
        return None
    lo, hi = (float(v) for v in _UNARY[node.op](node, np.array([-np.inf, np.inf])))
    return None if np.isnan(lo) or np.isnan(hi) else (lo, hi)


def _gelu(node: gs.Node, x: np.ndarray) -> np.ndarray:
    return _gelu_value(x, node.attrs.get("approximate", "none"))


def _gelu_value(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def _clip(node: gs.Node, x: np.ndarray) -> np.ndarray:
    lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
    for i, name in ((1, "lo"), (2, "hi")):
        t = input_of(node, i)
        if t is not None:
            value = const(t)
            if value is None:
                return _unknown(x)
            lo, hi = (float(value), hi) if name == "lo" else (lo, float(value))
    return np.clip(x, lo, hi)


# onnxruntime's transformer optimizer fuses attention, normalisations and embeddings into these (com.microsoft)
ORT_FUSED = (
    "Attention",
    "MultiHeadAttention",
    "PackedAttention",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "EmbedLayerNormalization",
    "SimplifiedLayerNormalization",
    "BiasSplitGelu",
    "BiasAdd",
    "RotaryEmbedding",
    "GroupQueryAttention",
)


@rule("com.microsoft::BiasGelu", "com.microsoft::FastGelu", "com.microsoft::Gelu", "com.microsoft::QuickGelu")
def _contrib_gelu(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    """GELUs of onnxruntime's contrib domain: element-wise, any bias [C] added first (sliced with the channels).

    BiasGelu and FastGelu take an optional bias; FastGelu is the tanh approximation, QuickGelu x * sigmoid(alpha * x).
    """
    if node.op == "QuickGelu":
        alpha = float(node.attrs.get("alpha", 1.702))
        act = lambda x: x / (1 + np.exp(-alpha * x))  # noqa: E731
    else:
        approximate = "tanh" if node.op == "FastGelu" else "none"
        act = lambda x: _gelu_value(x, approximate)  # noqa: E731
    if input_of(node, 1) is None:
        if flows and flows[0] is not None:
            return Step(Kind.PASS_THROUGH, [_same(flows[0], act(flows[0].zero))])
        return Step(Kind.PASS_THROUGH, [None])
    return _binary(node, flows, walk, lambda x, b: act(x + b))


@rule(*_UNARY)
def _unary(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    extra = [f for f in flows[1:] if f is not None]
    if extra:
        return "channels reach a parameter input"
    outputs: list[Flow | None] = [None] * len(node.outputs)
    if flows and flows[0] is not None:
        outputs[0] = _same(flows[0], _UNARY[node.op](node, flows[0].zero))
    return Step(Kind.PASS_THROUGH, outputs)


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None] * len(node.outputs))
    if flow.axis != 1:
        return "pooling expects channels on axis 1"
    zero = flow.zero
    uneven = node.op == "AveragePool" and node.attrs.get("count_include_pad", 0) and _spatial_pads(node)
    if uneven or "Lp" in node.op:
        zero = np.where(zero == 0, 0.0, np.nan)
    return Step(Kind.PASS_THROUGH, [_same(flow, zero)] + [None] * (len(node.outputs) - 1))


@rule("Resize", "Upsample")
def _resize(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    if any(f is not None for f in flows[1:]):
        return "channels reach the scales/sizes input"
    for t in node.inputs[1:]:
        v = const(t)
        if t.name and v is not None and v.size == flow.rank and v[flow.axis] != 1 and v.dtype.kind == "f":
            return "resizes the channel axis"
    shape_in, shape_out = walk.shape(node.inputs[0]), walk.shape(node.outputs[0])
    if shape_out is not None and shape_out[flow.axis] not in (None, len(flow.ids)):
        return "resizes the channel axis"
    if shape_in is None:
        return "input rank is unknown"
    return Step(Kind.PASS_THROUGH, [_same(flow)])


@rule("Pad")
def _pad(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    pads = node.attrs.get("pads")
    if pads is None:
        pads = const(node.inputs[1]) if input_of(node, 1) is not None else None
    if pads is None or input_of(node, 3) is not None:
        return "Pad amounts or axes are computed at run time"
    pads = [int(p) for p in np.asarray(pads).ravel()]
    mode = node.attrs.get("mode", "constant")
    value = node.attrs.get("value", 0.0)
    if input_of(node, 2) is not None:
        v = const(node.inputs[2])
        if v is None:
            return "Pad value is computed at run time"
        value = float(v) if v.size else 0.0
    before, after = pads[flow.axis], pads[flow.axis + flow.rank]
    spatial = any(p != 0 for i, p in enumerate(pads) if i % flow.rank != flow.axis)
    zero = flow.zero if mode != "constant" or not spatial else np.where(flow.zero == value, flow.zero, np.nan)
    if before == 0 and after == 0:
        return Step(Kind.PASS_THROUGH, [_same(flow, zero)])
    if mode != "constant" or before < 0 or after < 0:
        return f"pads the channel axis ({mode} mode)" if mode != "constant" else "crops the channel axis"
    # ResNet option-A shortcut: constant channels before and after; the tensor's own channels are tracked through
    why = f"Pad '{node.name}' fills these channels with the constant {value:g}"
    ids = np.concatenate([walk.source_ids(before, why), flow.ids, walk.source_ids(after, why)])
    zero = np.concatenate([np.full(before, value), zero, np.full(after, value)])
    return Step(Kind.COUPLING, [Flow(flow.axis, flow.rank, ids, zero)])


@rule("Shape", "Size")
def _shape_of(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    """Reads dims only, so channels pass unharmed; but a value that counts the channels changes when they go.

    Cleanup already wrote every value computed from static dims as a constant (Reshape targets, Slice bounds), which
    the rules then rewrite. A `Shape` still here is used at run time: fine where it, or every consumer (`Gather`,
    `Slice` with constant indices), reads other dims than the channel axis; otherwise the node blocks.
    """
    flow = flows[0] if flows else None
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    if node.op == "Size":
        return "Size counts the channels and its value is used at run time (it did not fold to a constant)"
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    read = list(range(flow.rank))[start : None if end is None else int(end)]
    if flow.axis not in read:
        return Step(Kind.PASS_THROUGH, [None])
    for consumer in node.outputs[0].outputs:
        picked = _shape_positions(consumer, len(read))
        if picked is None or read.index(flow.axis) in picked:
            return (
                f"the channel count it reads reaches {consumer.op} '{consumer.name}' at run time (it did not fold to "
                "a constant), and would change when channels go"
            )
    return Step(Kind.PASS_THROUGH, [None])


def _shape_positions(node: gs.Node, n: int) -> list[int] | None:
    """Positions of a 1-D shape value that a Gather/Slice consumer reads (None: another op, or computed indices)."""
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
        idx = const(node.inputs[1])
        return None if idx is None else [int(i) % n for i in np.atleast_1d(idx)]
    if node.op == "Slice" and "starts" not in node.attrs:
        values = [const(node.inputs[i]) if input_of(node, i) is not None else None for i in range(1, 5)]
        if (
            values[0] is None
            or values[1] is None
            or any(input_of(node, i) is not None and values[i - 1] is None for i in (3, 4))
        ):
            return None
        step = int(values[3][0]) if values[3] is not None else 1
        return list(range(n))[slice(int(values[0][0]), int(min(values[1][0], 2**62)), step)]
    return None


@rule("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    new = walk.opset >= 13
    axis = int(node.attrs.get("axis", -1 if new else 1)) % flow.rank
    if axis == flow.axis or (not new and axis <= flow.axis):
        return f"{node.op} normalises over the channel axis"
    return Step(Kind.PASS_THROUGH, [_same(flow, _unknown(flow.zero))])


def _axes(node: gs.Node) -> np.ndarray | list | str | None:
    """The `axes` of a node, from its attribute (old opsets) or its second input; a str when computed at run time."""
    axes = node.attrs.get("axes")
    if axes is None and input_of(node, 1) is not None:
        axes = const(node.inputs[1])
        if axes is None:
            return f"{node.op} axes are computed at run time"
    return axes


@rule("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum")
def _reduce(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    axes = _axes(node)
    if isinstance(axes, str):
        return axes
    if axes is None or len(np.atleast_1d(axes)) == 0:
        return f"{node.op} over all axes mixes the channels"
    axes = sorted(int(a) % flow.rank for a in np.atleast_1d(axes))
    if flow.axis in axes:
        return f"{node.op} reduces over the channel axis"
    zero = flow.zero if node.op != "ReduceSum" else np.where(flow.zero == 0, 0.0, np.nan)
    if node.attrs.get("keepdims", 1):
        return Step(Kind.PASS_THROUGH, [_same(flow, zero)])
    axis = flow.axis - sum(a < flow.axis for a in axes)
    return Step(Kind.PASS_THROUGH, [_same(flow, zero, axis=axis, rank=flow.rank - len(axes))])


@rule("LRN")
def _lrn(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    if flows[0] is None:
        return Step(Kind.PASS_THROUGH, [None])
    return "LRN normalises across neighbouring channels"


# ------------------------------------------------------------------------------------------ coupling

_BINARY: dict[str, Callable[..., np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Max": np.maximum,
    "Min": np.minimum,
    "Sum": np.add,
    "Mean": np.add,
    "Pow": np.power,
}


@rule(*_BINARY)
def _elementwise(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    return _binary(node, flows, walk, _BINARY[node.op])


def _binary(node: gs.Node, flows: list[Flow | None], walk: Walk, op: Callable[..., np.ndarray]) -> Step | str:
    """Element-wise ops: constants per channel are sliced; two tracked tensors are coupled channel by channel."""
    tracked = [(i, f) for i, f in enumerate(flows) if f is not None]
    if not tracked:
        return Step(Kind.PASS_THROUGH, [None])
    out_shape = walk.shape(node.outputs[0])
    if out_shape is None:
        return "output rank is unknown (shape inference failed)"
    rank = len(out_shape)
    first_index, first = max(tracked, key=lambda t: len(t[1].ids))  # the widest: a 1-channel gate broadcasts over it
    first_name = node.inputs[first_index].name
    axis = first.at_rank(rank)
    n = len(first.ids)
    zeros: list[np.ndarray] = []
    params: list[ParamSlice] = []
    kind = Kind.PASS_THROUGH
    for i, tensor in enumerate(node.inputs):
        flow = flows[i]
        if flow is not None:
            if flow.at_rank(rank) != axis or len(flow.ids) not in (n, 1):
                where = (
                    f"axis {flow.at_rank(rank)} vs {axis}" if flow.at_rank(rank) != axis else f"{len(flow.ids)} vs {n}"
                )
                return f"{node.op} of tensors whose channels do not line up ({where})"
            if len(flow.ids) == 1 and n > 1:  # [N,1,H,W] gate over [N,C,H,W]: per channel for the C side
                walk.block(flow.ids, f"{node.op} '{node.name}' broadcasts this single channel over {n} channels")
                zeros.append(np.full(n, np.nan))
                continue
            if flow is not first:
                walk.unify(first.ids, flow.ids)
                kind = Kind.COUPLING
            zeros.append(flow.zero)
            continue
        shape = walk.shape(tensor) if const(tensor) is None else list(const(tensor).shape)
        if shape is None:
            return f"operand '{tensor.name}' has unknown rank"
        a = axis - (rank - len(shape))
        size = shape[a] if a >= 0 else 1
        value = const(tensor)
        if value is None:
            if size != 1:
                return f"meets tensor '{tensor.name}' whose channels come from no tracked producer"
            zeros.append(np.full(n, np.nan))
            continue
        if size == 1:
            zeros.append(
                np.full(n, float(value.ravel()[0])) if np.all(value == value.ravel()[0]) else np.full(n, np.nan)
            )
            continue
        if size != n:
            return f"constant '{tensor.name}' has {size} entries on the channel axis, the tensor carries {n}"
        params.append(ParamSlice(i, ((a, first_name),)))
        kind = Kind.PER_CHANNEL if kind is Kind.PASS_THROUGH else kind
        per = np.moveaxis(value.astype(np.float64), a, 0).reshape(n, -1)
        zeros.append(per[:, 0] if np.all(per == per[:, :1]) else np.full(n, np.nan))
    with np.errstate(all="ignore"):
        zero = zeros[0]
        for z in zeros[1:]:
            zero = op(zero, z)
        if node.op == "Mean":
            zero = zero / len(zeros)
        if node.op == "Mul":  # 0 times anything, even a value known only at run time
            zero = np.where(np.any([z == 0 for z in zeros], axis=0), 0.0, zero)
    return Step(kind, [Flow(axis, rank, first.ids, np.asarray(zero, dtype=np.float64))], params)


def first_input_name(node: gs.Node, flows: list[Flow | None]) -> str:
    """Name of the first input that carries tracked channels."""
    return next(node.inputs[i].name for i, f in enumerate(flows) if f is not None)


@rule("Concat")
def _concat(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    if all(f is None for f in flows):
        return Step(Kind.PASS_THROUGH, [None])
    rank = next(f.rank for f in flows if f is not None)
    axis = int(node.attrs["axis"]) % rank
    tracked = [f for f in flows if f is not None]
    if any(f.axis != axis for f in tracked):
        if any(f is None for f in flows) or any(f.axis != tracked[0].axis for f in tracked):
            return "concatenates along an axis other than the channels"
        for f in tracked[1:]:
            walk.unify(tracked[0].ids, f.ids)
        zero = np.where(np.all([f.zero == tracked[0].zero for f in tracked], axis=0), tracked[0].zero, np.nan)
        return Step(Kind.COUPLING, [_same(tracked[0], zero)])
    ids, zeros = [], []
    for tensor, flow in zip(node.inputs, flows):
        if flow is None:
            shape = walk.shape(tensor) if const(tensor) is None else list(const(tensor).shape)
            if shape is None or shape[axis] is None:
                return f"concatenates '{tensor.name}' of unknown channel count"
            ids.append(walk.source_ids(shape[axis], f"concatenated with '{tensor.name}', which no producer fills"))
            zeros.append(np.full(shape[axis], np.nan))
        else:
            ids.append(flow.ids)
            zeros.append(flow.zero)
    return Step(Kind.COUPLING, [Flow(axis, rank, np.concatenate(ids), np.concatenate(zeros))])


def _split_sizes(node: gs.Node, total: int, n_out: int) -> list[int] | str:
    split = node.attrs.get("split")
    if split is None and input_of(node, 1) is not None:
        split = const(node.inputs[1])
        if split is None:
            return "split sizes are computed at run time"
    if split is None:  # equal parts (opset 18 num_outputs: the last part may be smaller)
        if total % n_out == 0:
            return [total // n_out] * n_out
        part = -(-total // n_out)
        if "num_outputs" not in node.attrs or total - part * (n_out - 1) <= 0:
            return f"equal split of {total} channels into {n_out} is uneven"
        return [part] * (n_out - 1) + [total - part * (n_out - 1)]
    return [int(s) for s in np.atleast_1d(split)]


@rule("Split")
def _split(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None] * len(node.outputs))
    axis = int(node.attrs.get("axis", 0)) % flow.rank
    if axis != flow.axis:
        return Step(Kind.PASS_THROUGH, [_same(flow) for _ in node.outputs])
    sizes = _split_sizes(node, len(flow.ids), len(node.outputs))
    if isinstance(sizes, str):
        return sizes
    bounds = np.cumsum([0] + sizes)
    outs = [Flow(axis, flow.rank, flow.ids[a:b], flow.zero[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    names = [t.name for t in node.outputs]
    opset = walk.opset

    def rewrite(node: gs.Node, keeps: dict[str, np.ndarray], walk: Walk) -> None:
        new = np.array([len(keeps[n]) for n in names], dtype=np.int64)
        node.attrs.pop("num_outputs", None)
        if "split" in node.attrs or (opset < 13 and input_of(node, 1) is None):  # sizes are an attribute before 13
            node.attrs["split"] = [int(s) for s in new]
        else:
            while len(node.inputs) < 2:
                node.inputs.append(gs.Variable.empty())
            _setinput_of(node, 1, new, walk, "split")

    return Step(Kind.COUPLING, outs, rewrite=rewrite)


@rule("Slice")
def _slice(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    if "starts" in node.attrs:
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        values = [const(node.inputs[i]) if input_of(node, i) is not None else None for i in range(1, 5)]
        if any(v is None for v in values[:2]) or any(
            input_of(node, i) is not None and values[i - 1] is None for i in (3, 4)
        ):
            return "Slice bounds are computed at run time"
        starts, ends = list(values[0]), list(values[1])
        axes = list(values[2]) if values[2] is not None else list(range(len(starts)))
        steps = list(values[3]) if values[3] is not None else [1] * len(starts)
    axes = [int(a) % flow.rank for a in axes]
    if flow.axis not in axes:
        return Step(Kind.PASS_THROUGH, [_same(flow)])
    j = axes.index(flow.axis)
    if steps[j] != 1:
        return "Slice with a step on the channel axis"
    lo, hi, _ = slice(int(starts[j]), int(min(ends[j], 2**62))).indices(len(flow.ids))
    src = node.inputs[0].name

    def rewrite(node: gs.Node, keeps: dict[str, np.ndarray], walk: Walk) -> None:
        kept = keeps[src]
        new_lo, new_hi = int(np.sum(kept < lo)), int(np.sum(kept < hi))
        if "starts" in node.attrs:
            node.attrs["starts"] = [*node.attrs["starts"][:j], new_lo, *node.attrs["starts"][j + 1 :]]
            node.attrs["ends"] = [*node.attrs["ends"][:j], new_hi, *node.attrs["ends"][j + 1 :]]
            return
        for i, value in ((1, new_lo), (2, new_hi)):
            arr = const(node.inputs[i]).copy()
            arr[j] = value
            _setinput_of(node, i, arr, walk, "slice")

    return Step(Kind.COUPLING, [Flow(flow.axis, flow.rank, flow.ids[lo:hi], flow.zero[lo:hi])], rewrite=rewrite)


@rule("Transpose")
def _transpose(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    perm = node.attrs.get("perm", list(range(flow.rank))[::-1])
    return Step(Kind.COUPLING, [_same(flow, axis=list(perm).index(flow.axis))])


@rule("Gather")
def _gather(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    """Constant indices along another axis than the channels' (a packed qkv's Q, K and V): channels pass through.

    A scalar index drops its axis; an index array puts its dims there.
    """
    flow = flows[0]
    if len(flows) > 1 and flows[1] is not None:
        return "Gather indices carry channels"
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    indices = const(node.inputs[1])
    if indices is None:
        return "Gather indices are computed at run time"
    axis = int(node.attrs.get("axis", 0)) % flow.rank
    if axis == flow.axis:
        return "Gather picks along the channel axis"
    shift = indices.ndim - 1 if axis < flow.axis else 0
    return Step(Kind.PASS_THROUGH, [_same(flow, axis=flow.axis + shift, rank=flow.rank + indices.ndim - 1)])


@rule("Squeeze", "Unsqueeze")
def _squeeze(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    axes = _axes(node)
    if isinstance(axes, str):
        return axes
    out_shape = walk.shape(node.outputs[0])
    if out_shape is None:
        return "output rank is unknown"
    rank_out = len(out_shape)
    if node.op == "Squeeze":
        if axes is None:
            shape = walk.shape(node.inputs[0])
            if shape is None or any(d is None for d in shape):
                return "Squeeze without axes on a tensor of unknown shape"
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = [int(a) % flow.rank for a in np.atleast_1d(axes)]
        if flow.axis in axes:
            return "squeezes the channel axis"
        axis = flow.axis - sum(a < flow.axis for a in axes)
    else:
        axes = sorted(int(a) % rank_out for a in np.atleast_1d(axes))
        axis = flow.axis
        for a in axes:
            if a <= axis:
                axis += 1
    return Step(Kind.COUPLING, [_same(flow, axis=axis, rank=rank_out)])


@rule("DepthToSpace", "SpaceToDepth")
def _depth_space(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    """Channels moved to and from blocks of pixels (ONNX DepthToSpace / SpaceToDepth, opset 1-13).

    With blocksize b, SpaceToDepth turns channel c of [N, C, H, W] into the b^2 output channels ``k * C + c``
    (k = i b + j, the position in the block): each keeps the input's channel id. DepthToSpace undoes it: output
    channel c reads input channels ``k * C' + c`` (mode DCR) or ``c * b^2 + k`` (CRD), which are then one channel
    and are removed together; the removed ones leave the rest in the same order, so blocksize and mode stay.
    """
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    if flow.rank != 4 or flow.axis != 1:
        return f"{node.op} of a tensor whose channels are not on axis 1 of 4"
    blocks = int(node.attrs.get("blocksize", 0)) ** 2
    if node.op == "SpaceToDepth":
        return Step(Kind.COUPLING, [Flow(1, 4, np.tile(flow.ids, blocks), np.tile(flow.zero, blocks))])
    if blocks == 0 or len(flow.ids) % blocks:
        return f"DepthToSpace of {len(flow.ids)} channels in blocks of {blocks}"
    crd = node.attrs.get("mode", "DCR") == "CRD"
    ids, zero = (a.reshape(-1, blocks).T if crd else a.reshape(blocks, -1) for a in (flow.ids, flow.zero))
    for k in range(1, blocks):
        walk.unify(ids[0], ids[k])
    same = np.all((zero == zero[0]) | (np.isnan(zero) & np.isnan(zero[0])), axis=0)
    return Step(Kind.COUPLING, [Flow(1, 4, ids[0].copy(), np.where(same, zero[0], np.nan))])


@rule("Flatten")
def _flatten(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    at = int(node.attrs.get("axis", 1)) % max(flow.rank, 1)
    if flow.axis < at:
        return "Flatten merges the channel axis into the leading dimension"
    shape = walk.shape(node.inputs[0])
    if shape is None or any(d is None for d in shape[at:]):
        return "Flatten of a tensor whose trailing dims are not static"
    return Step(Kind.COUPLING, [_merge(flow, shape, at, len(shape), out_axis=1, rank=2)])


def _merge(flow: Flow, shape: list, start: int, stop: int, *, out_axis: int, rank: int) -> Flow:
    """Channels of `flow` once dims start..stop-1 are merged into one: each channel becomes a block."""
    inner = int(np.prod(shape[flow.axis + 1 : stop], dtype=np.int64))
    outer = int(np.prod(shape[start : flow.axis], dtype=np.int64))
    ids = np.tile(np.repeat(flow.ids, inner), outer)
    zero = np.tile(np.repeat(flow.zero, inner), outer)
    return Flow(out_axis, rank, ids, zero)


RUN_TIME_DIM = (
    999_983  # a symbolic dim beside the channels, in a Reshape's mapping: a prime no real dim is a multiple of
)


@rule("Reshape")
def _reshape(node: gs.Node, flows: list[Flow | None], walk: Walk) -> Step | str:
    flow = flows[0]
    if flow is None:
        return Step(Kind.PASS_THROUGH, [None])
    in_shape = walk.shape(node.inputs[0])
    target = const(node.inputs[1])
    # dims the target copies (0) may stay unknown, as the batch may: a time-major [T, N, D, H] -> [0, 0, -1]
    copied = set() if target is None or node.attrs.get("allowzero", 0) else set(np.flatnonzero(target == 0).tolist())
    if in_shape is None or walk.shape(node.outputs[0]) is None:
        return "Reshape of a tensor whose shape is not known"
    if target is None:
        return "Reshape target is computed at run time, so it cannot be rewritten"
    # copied dims go through as they are; another symbolic dim (a recogniser's width in [N, C, 1, W] -> [0, C, -1])
    # is taken as a prime no real dim is a multiple of: the mapping found holds for any size unless it lands in the
    # channels' output dim, which is refused below
    in_shape = [(1 if i in copied or not i else RUN_TIME_DIM) if d is None else d for i, d in enumerate(in_shape)]
    resolved = _resolve_target(list(target), in_shape)
    if resolved is None:
        return "Reshape target does not resolve"
    if flow.axis < 1:
        return "Reshape moves the batch axis"
    found = _reshape_merge(flow, in_shape, resolved) or _reshape_split(node, flow, in_shape, resolved, walk)
    if found is None:
        return "Reshape splits the channel axis"
    pos, out = found
    if resolved[pos] % RUN_TIME_DIM == 0:
        return "Reshape merges a dim whose size is known only at run time into the channels"
    name = node.outputs[0].name

    def rewrite(node: gs.Node, keeps: dict[str, np.ndarray], walk: Walk) -> None:
        t = const(node.inputs[1]).copy()
        if t[pos] > 0:
            t[pos] = len(keeps[name])
            _setinput_of(node, 1, t, walk, "shape")

    return Step(Kind.COUPLING, [out], rewrite=rewrite)


def _prod(dims) -> int:
    return int(np.prod([int(d) for d in dims], dtype=np.int64))


def _reshape_merge(flow: Flow, in_shape: list, resolved: list[int]) -> tuple[int, Flow] | None:
    """The channel axis kept whole, or merged with its neighbours into one output axis: (output axis, flow).

    Flatten's block mapping, and the NHWC flatten too, where H and W come before C.
    """
    a = flow.axis
    for j in range(1, len(resolved)):
        lead_out, size = _prod(resolved[1:j]), resolved[j]
        for start in range(1, a + 1):  # input dims start..stop-1 (start <= a < stop) become output dim j
            if _prod(in_shape[1:start]) != lead_out:
                continue
            stop, merged = a + 1, _prod(in_shape[start : a + 1])
            while stop < len(in_shape) and merged < size:
                merged *= int(in_shape[stop])
                stop += 1
            if merged != size:
                continue
            if start == a and stop == a + 1:
                return j, _same(flow, axis=j, rank=len(resolved))
            return j, _merge(flow, in_shape, start, stop, out_axis=j, rank=len(resolved))
    return None


def _reshape_split(
    node: gs.Node, flow: Flow, in_shape: list, resolved: list[int], walk: Walk
) -> tuple[int, Flow] | None:
    """Features on the last axis split into several output dims, one of them the channels: (output axis, flow).

    Linear -> view(-1, C, h, w), or the NHWC un-flatten before a Transpose: each channel is the block of features
    that lands on it, coupled.
    """
    a = flow.axis
    if a != flow.rank - 1:
        return None
    lead_in, n = _prod(in_shape[1:a]), len(flow.ids)
    for j in range(1, len(resolved)):
        if _prod(resolved[1:j]) != lead_in:
            continue
        stop = next((e for e in range(j + 2, len(resolved) + 1) if _prod(resolved[j:e]) == n), None)
        if stop is None:
            continue
        k = _split_channel_axis(node.outputs[0].outputs, j, stop)
        inner, size = _prod(resolved[k + 1 : stop]), resolved[k]
        heads = k == stop - 2  # features split into [..., heads, head dim]: a channel is a head
        channel = (np.arange(n) // inner) % size
        ids, zero = np.empty(size, dtype=np.int64), np.empty(size)
        for c in range(size):
            members = flow.ids[channel == c]
            walk.unify(np.repeat(members[:1], len(members)), members)
            values = flow.zero[channel == c]
            ids[c], zero[c] = members[0], values[0] if np.all(values == values[0]) else np.nan
        if heads:
            walk.label(ids, "head")
        return k, Flow(k, len(resolved), ids, zero)
    return None


def _split_channel_axis(consumers: list[gs.Node], j: int, stop: int) -> int:
    """Which of the output dims j..stop-1 that the features split into becomes the channel axis.

    The last (NHWC un-flatten) when every consumer is a Transpose that moves it to axis 1; the one before the last
    when every consumer is a Transpose that does not (attention: features split into [heads, head dim], or
    [3, heads, head dim] from a packed qkv projection, transposed to [N, heads, L, dim]; a channel is then a head,
    all its features together); otherwise dim 1 when the split starts there (Linear -> view(-1, C, h, w)), else the
    last.
    """
    perms = [list(c.attrs.get("perm", [])) for c in consumers if c.op == "Transpose"]
    if perms and len(perms) == len(consumers):
        if all(p[1:2] == [stop - 1] for p in perms):
            return stop - 1
        if stop - 2 >= j and not any(p[1:2] == [stop - 1] for p in perms):
            return stop - 2
    return 1 if j <= 1 < stop else stop - 1


def _resolve_target(target: list[int], in_shape: list) -> list[int] | None:
    """Concrete output dims of a Reshape, with the batch (and any unknown dim) taken as 1."""
    dims = [int(d) for d in target]
    for i, d in enumerate(dims):
        if d == 0:
            dims[i] = 1 if i >= len(in_shape) or in_shape[i] is None else int(in_shape[i])
    if dims.count(-1) > 1:
        return None
    total = int(np.prod([1 if d is None else int(d) for d in in_shape], dtype=np.int64))
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
        if known == 0 or total % known:
            return None
        dims[dims.index(-1)] = total // known
    return dims if int(np.prod(dims, dtype=np.int64)) == total else None


def _setinput_of(node: gs.Node, i: int, value: np.ndarray, walk: Walk, what: str) -> None:
    name = getattr(walk, "fresh_name", lambda base: base)(f"{node.name}/{what}")
    node.inputs[i] = gs.Constant(name, np.asarray(value, dtype=np.int64))


# ------------------------------------------------------------------ shape arithmetic (Shape -> Gather -> ...)
#
# Exporters compute Reshape targets and Slice bounds from `Shape` (`x.view(x.size(0), -1)`, `chunk`). Where every
# dim such a value reads is static, or the only unknown is the batch that a Reshape target copies, the value is
# known before run time: `shape_value` evaluates it so that cleanup can write it as a constant, which the rules
# above then track and rewrite like any other. Entries are ints, or a str naming the symbolic dim they copy.

ShapeValue = np.ndarray  # 1-D or 0-D object array of int | str
UNKNOWN = "?"
_SHAPE_OPS: dict[str, Callable[[gs.Node, list[ShapeValue]], ShapeValue | None]] = {}


def _shape_op(*ops: str):
    def register(fn):
        for op in ops:
            _SHAPE_OPS[op] = fn
        return fn

    return register


def shape_value(tensor: gs.Tensor, cache: dict[str, ShapeValue | None]) -> ShapeValue | None:
    """The value of an integer tensor computed from `Shape`s and constants, or None when it is not one."""
    if tensor.name in cache:
        return cache[tensor.name]
    cache[tensor.name] = None  # guards against cycles
    value = None
    if isinstance(tensor, gs.Constant):
        v = np.asarray(tensor.values)
        if v.dtype.kind in "iu" and v.size <= 64:
            value = v.astype(object)
    elif len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        fn = _SHAPE_OPS.get(node.op)
        if fn is not None and node.domain in (None, "", "ai.onnx") and len(node.outputs) == 1:
            if node.op == "Shape":
                args = []
            else:
                args = [shape_value(t, cache) if t.name else None for t in node.inputs]
            if node.op == "Shape" or (args and args[0] is not None):
                value = fn(node, args)
    cache[tensor.name] = value
    return value


def known(value: ShapeValue | None) -> bool:
    """True when every entry of a shape value is a concrete int."""
    return value is not None and all(isinstance(v, (int, np.integer)) for v in value.ravel())


@_shape_op("Shape")
def _sv_shape(node: gs.Node, args: list) -> ShapeValue | None:
    shape = node.inputs[0].shape
    if shape is None:
        return None
    dims = [
        int(d) if isinstance(d, (int, np.integer)) and d >= 0 else (d if isinstance(d, str) and d else UNKNOWN)
        for d in shape
    ]
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    dims = dims[start:] if end is None else dims[start : int(end)]
    return np.array(dims, dtype=object)


@_shape_op("Size")
def _sv_size(node: gs.Node, args: list) -> ShapeValue | None:
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return np.array(int(np.prod(shape, dtype=np.int64)), dtype=object)


def _int_arg(args: list, i: int) -> np.ndarray | None:
    v = args[i] if i < len(args) else None
    return np.asarray(v.astype(np.int64)) if known(v) else None


@_shape_op("Gather")
def _sv_gather(node: gs.Node, args: list) -> ShapeValue | None:
    data, idx = args[0], _int_arg(args, 1)
    if idx is None or data.ndim != 1 or int(node.attrs.get("axis", 0)) != 0:
        return None
    return np.asarray(data[idx % len(data)], dtype=object) if len(data) else None


@_shape_op("Unsqueeze", "Squeeze")
def _sv_unsqueeze(node: gs.Node, args: list) -> ShapeValue | None:
    axes = node.attrs.get("axes")
    if axes is None:
        axes = _int_arg(args, 1)
    data = args[0]
    if node.op == "Unsqueeze":
        if axes is None:
            return None
        return np.expand_dims(data, tuple(int(a) for a in np.atleast_1d(axes)))
    return np.squeeze(data, None if axes is None else tuple(int(a) for a in np.atleast_1d(axes)))


@_shape_op("Concat")
def _sv_concat(node: gs.Node, args: list) -> ShapeValue | None:
    if any(a is None or a.ndim != 1 for a in args) or int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    return np.concatenate(args)


@_shape_op("Slice")
def _sv_slice(node: gs.Node, args: list) -> ShapeValue | None:
    data = args[0]
    if data.ndim != 1:
        return None
    if "starts" in node.attrs:
        starts, ends, steps = node.attrs["starts"], node.attrs["ends"], [1]
    else:
        starts, ends, steps = _int_arg(args, 1), _int_arg(args, 2), _int_arg(args, 4)
        if starts is None or ends is None or (len(args) > 4 and node.inputs[4].name and steps is None):
            return None
        steps = [1] if steps is None else steps
    return data[slice(int(starts[0]), int(min(ends[0], 2**62)), int(steps[0]))]


@_shape_op("Cast", "Identity")
def _sv_identity(node: gs.Node, args: list) -> ShapeValue | None:
    to = node.attrs.get("to")
    return args[0] if to is None or to in (6, 7) else None  # int32, int64


_ARITH = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b, "Div": lambda a, b: a // b}


@_shape_op(*_ARITH)
def _sv_arith(node: gs.Node, args: list) -> ShapeValue | None:
    if len(args) != 2 or args[1] is None:
        return None
    a, b = np.broadcast_arrays(args[0], args[1])
    fn = _ARITH[node.op]
    out = [_sv_entry(node.op, fn, x, y) for x, y in zip(a.ravel(), b.ravel())]
    return np.array(out, dtype=object).reshape(a.shape)


def _sv_entry(op: str, fn: Callable, x, y):
    """One entry of shape arithmetic: ints computed; a symbolic dim times 1 (or plus 0, ...) stays that dim."""
    ints = isinstance(x, (int, np.integer)), isinstance(y, (int, np.integer))
    if all(ints):
        return fn(int(x), int(y)) if op != "Div" or (y != 0 and x >= 0 and y > 0) else UNKNOWN
    identity = 1 if op in ("Mul", "Div") else 0
    if ints[1] and int(y) == identity:
        return x
    if ints[0] and int(x) == identity and op in ("Mul", "Add"):
        return y
    return UNKNOWN


def reshape_target(node: gs.Node, value: ShapeValue | None) -> np.ndarray | None:
    """A Reshape target computed from `Shape`, written as a constant with the same meaning, or None.

    An entry that is its input's own symbolic dim at the same position becomes 0 (copy that dim); when one entry is
    still unknown (``N * T`` of a ``[N, T, C] -> [N*T, C]`` flatten) and every other one is known, it becomes -1:
    the product of the dims is the same at run time, so -1 resolves to the value the graph computed.

    With ``allowzero=1`` (the dynamo exporter writes it) a 0 in the target is a literal zero; copying a dim gives the
    same output whichever way a 0 is read, so the target is written the same way when none of its known entries is
    0, and the caller sets ``allowzero`` to 0 (ONNX Reshape, opset 14).
    """
    if node.op != "Reshape" or value is None or value.ndim != 1 or not len(value):
        return None
    if node.attrs.get("allowzero", 0) and any(isinstance(v, (int, np.integer)) and v == 0 for v in value):
        return None
    shape = node.inputs[0].shape or []
    out: list[int | None] = []
    for i, v in enumerate(value):
        if isinstance(v, (int, np.integer)):
            out.append(int(v))
        elif isinstance(v, str) and v != UNKNOWN and i < len(shape) and shape[i] == v:
            out.append(0)
        else:
            out.append(None)
    if out.count(None) > 1 or (None in out and -1 in out):
        return None
    return np.array([-1 if v is None else v for v in out], dtype=np.int64)
