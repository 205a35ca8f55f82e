"""Weight layouts: where each weighted op keeps its weight and bias, and that weight seen as an [out, in] matrix.

One entry per op type (``LAYOUTS``), the companion of the channel rules in ``onnxprune.rules``: a producer's rule
reads its weight axes here, and the basis split, its merge, the refit's patch rows, the MAC count, the latency
model and the criteria ask the entry instead of branching on the op. A weighted op the rules know but no entry
describes (or a node the entry cannot read: a computed or grouped weight) is counted by its rule and left whole by
everything that needs a matrix. Adding a weighted op is one entry here plus its channel rule.

Sources: ONNX operator specs Conv, ConvTranspose, Gemm, MatMul (opset 1-22), LSTM / GRU / RNN (opset 7-22).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}  # blocks of hidden units in W [D, gates*H, I], R [D, gates*H, H]


@dataclass(frozen=True)
class Rows:
    """The map from an input batch to the rows [positions, K] that a layer's [out, K] matrix multiplies.

    Call it as ``rows(x)`` for every row, or ``rows(x, pick)`` for the rows at flat positions `pick` only (computed
    for those alone: a refit keeps 128 rows per sample of the thousands a feature map has). Rows come as float64.

    Attributes:
        count: Input batch -> how many rows it has (samples times output positions).
        take: (input batch, positions or None) -> the rows.
    """

    count: Callable[[np.ndarray], int]
    take: Callable[[np.ndarray, np.ndarray | None], np.ndarray]

    def __call__(self, x: np.ndarray, pick: np.ndarray | None = None) -> np.ndarray:
        """The rows of batch `x` (all, or those at flat positions `pick`), float64 [positions, K]."""
        return self.take(x, pick)

    @classmethod
    def channels(cls, axis: int | None) -> Rows:
        """The rows of a layer that mixes channels position by position: channel axis `axis` (None: the last)."""

        def at(x: np.ndarray) -> int:
            return x.ndim - 1 if axis is None else axis

        return cls(lambda x: x.size // max(x.shape[at(x)], 1), lambda x, pick: channels_last(x, at(x), pick))


def const(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant input, or None."""
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def input_of(node: gs.Node, i: int) -> gs.Tensor | None:
    """Input `i` of `node`, or None when it is absent or omitted (an empty name)."""
    if i >= len(node.inputs) or node.inputs[i].name == "":
        return None
    return node.inputs[i]


def gemm_bias_error(node: gs.Node, n_out: int) -> str | None:
    """Why a Gemm's bias C is not one value per output channel (None when it is, or broadcasts one value)."""
    bias = const(node.inputs[2]) if input_of(node, 2) is not None else None
    if bias is None:
        return None if input_of(node, 2) is None else "Gemm bias is computed in the graph"
    if bias.size == 1 or (bias.ndim <= 2 and bias.shape[-1] == n_out and bias.size == n_out):
        return None
    return f"Gemm bias of shape {list(bias.shape)} varies over the rows, not only the output channels"


def channels_last(x: np.ndarray, axis: int = 1, pick: np.ndarray | None = None) -> np.ndarray:
    """[..., C, ...] -> [positions, C] float64: every spatial position (and sample) becomes a row.

    With `pick`, only the rows at those flat positions (converted to float64 after the pick).
    """
    rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    return (rows if pick is None else rows[pick]).astype(np.float64)


def im2col(
    x: np.ndarray,
    kernel: list[int],
    *,
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    pick: np.ndarray | None = None,
) -> np.ndarray:
    """[N, C, H, W] -> [positions, C*kh*kw]: the input patch each output position of a 2-D Conv sees.

    Positions run over (sample, output row, output column); with `pick`, only the patches at those flat positions
    are gathered.
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    pt, pl, pb, pr = pads[0], pads[1], pads[2], pads[3]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ho, wo = conv_output_size(x.shape, kernel, strides=strides, pads=pads, dilations=dilations)
    if pick is not None:
        sample, rest = np.divmod(np.asarray(pick, dtype=np.int64), ho * wo)
        row, col = np.divmod(rest, wo)
        out = np.empty((len(sample), c, kh, kw), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):  # [P, C]: the advanced indices, split by the slice, come first
                rows, cols = row * strides[0] + i * dilations[0], col * strides[1] + j * dilations[1]
                out[:, :, i, j] = xp[sample, :, rows, cols]
        return out.reshape(len(sample), c * kh * kw)
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            hi, wj = i * dilations[0], j * dilations[1]
            cols[:, :, i, j] = xp[:, :, hi : hi + strides[0] * ho : strides[0], wj : wj + strides[1] * wo : strides[1]]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * kh * kw)


def conv_output_size(
    shape: tuple[int, ...], kernel: list[int], *, strides: list[int], pads: list[int], dilations: list[int]
) -> tuple[int, int]:
    """(H_out, W_out) of a 2-D Conv on an input of `shape` [N, C, H, W] (ONNX Conv, explicit pads)."""
    h, w = shape[2], shape[3]
    ho = (h + pads[0] + pads[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    wo = (w + pads[1] + pads[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    return ho, wo


@dataclass(frozen=True)
class Linear:
    """A node as one matrix applied to its data input, the view a tensor-train rewrite replaces.

    Attributes:
        matrix: ``[out, in]`` float64, alpha applied. For a lookup, the table ``[rows, width]`` itself.
        bias: ``[out]`` float64 added to every output row (beta applied), or None.
        data: Input index of the data (a lookup: of the indices).
        lookup: True for a table lookup ``y = matrix[ids]`` (Gather on axis 0), False for ``y = x matrix^T + bias``
            on the last axis of x.
        transposed: The data input is given transposed, ``[in, rows]`` (Gemm with transA).
    """

    matrix: np.ndarray
    bias: np.ndarray | None
    data: int = 0
    lookup: bool = False
    transposed: bool = False


class Layout:
    """A weighted op's layout. The defaults describe an op with weights but no matrix view (not split, not refitted).

    Attributes:
        weights: Input indices holding weights (parameters counted, MACs per weight element).
        bias: Input index of a bias added per output channel (None: the op has none).
        split: Whether a basis split (DESIGN §2) applies to the op.
        whiten: Whether a split may follow a whitened basis from input-patch covariances (measured on Conv only).
        scaling_ops: Ops that may follow a basis op of this kind as its scaling op.
    """

    weights: tuple[int, ...] = (1,)
    bias: int | None = None
    split: bool = False
    whiten: bool = False
    scaling_ops: tuple[str, ...] = ()

    def axes(self, node: gs.Node) -> tuple[int, int] | None:
        """(output-channel axis, input-channel axis) of the weight.

        None where the attributes mix them (grouped ConvTranspose, Gemm with transA).
        """
        return None

    def channel_axis(self, node: gs.Node, rank: int | None = None) -> int:
        """Axis of the output that carries the channels.

        1 in N, C, ... layouts; for MatMul the last: -1, or ``rank - 1`` counted from the front when `rank` is given.
        """
        return 1

    def matrix(self, node: gs.Node) -> np.ndarray | None:
        """The constant weight as an [out, in] matrix (alpha not applied); None where it is not one."""
        return None

    def from_matrix(self, node: gs.Node, matrix: np.ndarray) -> tuple[np.ndarray, dict]:
        """Inverse of `matrix` for `node`'s layout: (weight, attributes to set so that alpha = beta = 1)."""
        raise NotImplementedError(node.op)

    def affine(self, node: gs.Node) -> tuple[np.ndarray, np.ndarray | None]:
        """The op as y = W x + b along its channel axis: W [out, in] float64, b [out] (None: no bias)."""
        present = self.bias is not None and input_of(node, self.bias) is not None
        return self.matrix(node).astype(np.float64), const(node.inputs[self.bias]).astype(
            np.float64
        ) if present else None

    def basis_matrix(self, node: gs.Node) -> np.ndarray | None:
        """The weight as the [out, in] matrix a basis split factors (`matrix`, unless the layout says otherwise)."""
        return self.matrix(node)

    def basis_layer(self, node: gs.Node, rows: np.ndarray) -> tuple[str, dict, np.ndarray]:
        """(op, attributes, weight) of the basis op applying `rows` [r, in] to `node`'s input."""
        return "MatMul", {}, rows.T

    def scaling_layer(self, node: gs.Node, scaling: np.ndarray) -> tuple[str, dict, np.ndarray]:
        """(op, attributes, weight) of the scaling op applying `scaling` [out, r] to the basis op's output."""
        return "MatMul", {}, scaling.T

    def merged_layer(self, basis: gs.Node, scaling: gs.Node, product: np.ndarray) -> tuple[str, dict, np.ndarray]:
        """(op, attributes, weight) of the one op equal to basis op `basis` then `scaling` (`product` [out, in])."""
        return scaling.op, layout_of(scaling).untransposed(scaling), product.T

    def untransposed(self, node: gs.Node) -> dict:
        """`node`'s attributes for a weight written [in, out], scale factors kept (a merge writes the product)."""
        return dict(node.attrs)

    def mid_shape(self, out_shape: list, rank: int) -> list:
        """Shape of the tensor between basis and scaling op, from the layer's output shape."""
        return list(out_shape[:-1]) + [rank]

    def pointwise(self, node: gs.Node) -> bool:
        """Whether the weight applies to each position alone (a scaling op: a matrix on the channel axis)."""
        return self.matrix(node) is not None

    def projectable(self, node: gs.Node) -> bool:
        """Whether a pointwise op on `node`'s input channels (`scaling_layer`) may go before it: a Tucker-2 form.

        Only where that op runs at `node`'s own positions and the weight mixes all input channels with several taps
        (a k x k Conv, group 1, stride 1; at stride 2 it would run at 4x the positions, and a Tucker rank that pays
        for them leaves the layer far under the weights it was given): elsewhere the split keeps as many directions
        for its weights.
        """
        return False

    def patches(self, node: gs.Node) -> Rows | None:
        """The map from an input batch to the rows [positions, K] the [out, K] matrix multiplies; None: not known."""
        return None

    def macs_per_weight(self, node: gs.Node, out_dims: list[int]) -> int:
        """Multiply-accumulates per sample for each weight element, given the output's dims (unknown ones as 1)."""
        return 0

    def product_macs(self, node: gs.Node, left_dims: list[int], out_dims: list[int]) -> int:
        """Multiply-accumulates per sample when `node` multiplies two computed tensors (no weight); 0 otherwise."""
        return 0

    def linear(self, node: gs.Node) -> Linear | None:
        """`node` as one constant matrix applied to its data input (`Linear`); None where it is not one."""
        return None

    def timing(self, node: gs.Node, k: int, co: int) -> tuple[str, list[int]] | None:
        """(op, dense weight shape) to time a split layer whose basis op is `node` (K inputs, Co outputs) dense.

        The layer model of ``latency.py``; None: no timing model, such a layer stays dense.
        """
        return None

    def channel_timing(self, node: gs.Node) -> tuple[str, list[int], dict, int | None, int] | None:
        """`node` as the layer model ``latency.channel_latency`` times: (op, weight shape, attributes, ins, outs).

        ins and outs are its input and output channels. "Conv" (weight [Co, Ci / group, k...], grouped included) or
        "MatMul" (weight [K, N], input [..., K]); ins is None for a grouped Conv (each output reads its own group:
        timed whole, scaled with its outputs). None where the node has no timing model (its time is left out of a
        latency knapsack's costs).
        """
        return None


class _ConvLayout(Layout):
    weights, bias, split, whiten, scaling_ops = (1,), 2, True, True, ("Conv",)

    def axes(self, node):
        return 0, 1

    def matrix(self, node):
        w = const(input_of(node, 1))
        if w is None or w.ndim < 3 or int(node.attrs.get("group", 1)) != 1:
            return None
        return w.reshape(w.shape[0], -1)

    def from_matrix(self, node, matrix):  # [out, in * kernel] -> [out, in, *kernel], the kernel it replaces
        return matrix.reshape(matrix.shape[0], -1, *const(node.inputs[1]).shape[2:]), {}

    def basis_layer(self, node, rows):
        return "Conv", {**node.attrs, "group": 1}, rows.reshape((len(rows),) + const(node.inputs[1]).shape[1:])

    def scaling_layer(self, node, scaling):
        spatial = const(node.inputs[1]).ndim - 2
        return "Conv", {"kernel_shape": [1] * spatial}, scaling.reshape(scaling.shape + (1,) * spatial)

    def merged_layer(self, basis, scaling, product):
        return "Conv", dict(basis.attrs), product.reshape((len(product),) + const(basis.inputs[1]).shape[1:])

    def mid_shape(self, out_shape, rank):
        return list(out_shape[:1]) + [rank] + list(out_shape[2:])

    def projectable(self, node):
        w = const(input_of(node, 1))
        if w is None or w.ndim < 3 or int(node.attrs.get("group", 1)) != 1 or int(np.prod(w.shape[2:])) == 1:
            return False
        return all(v == 1 for v in node.attrs.get("strides", [1])) and self.matrix(node) is not None

    def pointwise(self, node):
        w = self.matrix(node)
        if w is None:
            return False
        kernel = const(node.inputs[1]).shape[2:]
        plain = all(v == 1 for v in node.attrs.get("strides", [1])) and not any(node.attrs.get("pads", [0]))
        return all(k == 1 for k in kernel) and plain and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")

    def patches(self, node):
        w = const(input_of(node, 1))
        if self.matrix(node) is None or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return None
        if w.ndim == 4:
            kernel = list(w.shape[2:])
            pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
            strides = list(node.attrs.get("strides", [1, 1]))
            dilations = list(node.attrs.get("dilations", [1, 1]))
            geometry = {"strides": strides, "pads": pads, "dilations": dilations}
            return Rows(
                lambda x: len(x) * int(np.prod(conv_output_size(x.shape, kernel, **geometry))),
                lambda x, pick: im2col(x, kernel, **geometry, pick=pick).astype(np.float64),
            )
        return Rows.channels(1) if self.pointwise(node) else None

    def macs_per_weight(self, node, out_dims):
        return int(np.prod(out_dims[2:], dtype=np.int64))

    def timing(self, node, k, co):
        return "Conv", [co, *const(node.inputs[1]).shape[1:]]

    def channel_timing(self, node):
        w = const(input_of(node, 1))
        if w is None or w.ndim < 3:
            return None
        grouped = int(node.attrs.get("group", 1)) != 1
        return "Conv", list(w.shape), dict(node.attrs), None if grouped else int(w.shape[1]), int(w.shape[0])


class _ConvTransposeLayout(Layout):
    """W [Ci, Co, k...]; as a matrix for the basis split, [Co, Ci * k...] (no refit: its patches are not rows)."""

    weights, bias, split, scaling_ops = (1,), 2, True, ("Conv",)

    def axes(self, node):
        return (1, 0) if int(node.attrs.get("group", 1)) == 1 else None

    def basis_matrix(self, node):
        w = const(input_of(node, 1))
        if w is None or w.ndim < 3 or int(node.attrs.get("group", 1)) != 1:
            return None
        return np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)  # output co gets the sum over ci and taps of W[ci, co]

    def basis_layer(self, node, rows):  # [Ci, r, k...]: a ConvTranspose to r channels, same strides, pads, taps
        w = const(node.inputs[1])
        return "ConvTranspose", dict(node.attrs), np.moveaxis(rows.reshape((len(rows), w.shape[0]) + w.shape[2:]), 0, 1)

    scaling_layer = _ConvLayout.scaling_layer
    mid_shape = _ConvLayout.mid_shape

    def merged_layer(self, basis, scaling, product):
        bw = const(basis.inputs[1])
        shape = (len(product), bw.shape[0]) + bw.shape[2:]
        return "ConvTranspose", dict(basis.attrs), np.moveaxis(product.reshape(shape), 0, 1)

    def macs_per_weight(self, node, out_dims):  # each weight multiplies every input position once
        x = node.inputs[0].shape
        if x is None or len(x) != len(out_dims):
            return 0
        return int(np.prod([d if isinstance(d, int) and d >= 0 else 1 for d in x[2:]], dtype=np.int64))


class _GemmLayout(Layout):
    """Y = alpha A B + beta C with B [in, out] (transB 0) or [out, in]; split as MatMul basis + Gemm scaling."""

    weights, bias, split, scaling_ops = (1,), 2, True, ("Gemm",)

    def axes(self, node):
        if node.attrs.get("transA", 0):
            return None
        return (0, 1) if node.attrs.get("transB", 0) else (1, 0)

    def matrix(self, node):
        w = const(input_of(node, 1))
        if w is None or w.ndim != 2 or node.attrs.get("transA", 0):
            return None
        matrix = w if node.attrs.get("transB", 0) else w.T
        return None if gemm_bias_error(node, matrix.shape[0]) else matrix  # a bias varying over rows: no W x + b

    def from_matrix(self, node, matrix):
        return matrix.T, {"alpha": 1.0, "beta": 1.0, "transB": 0}

    def affine(self, node):
        w, bias = super().affine(node)
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        return alpha * w, None if bias is None else beta * np.broadcast_to(bias.reshape(-1), (w.shape[0],))

    def untransposed(self, node):
        return {**node.attrs, "transB": 0}

    def linear(self, node):
        w = const(input_of(node, 1))
        if w is None or w.ndim != 2:
            return None
        matrix = (w if node.attrs.get("transB", 0) else w.T).astype(np.float64)
        if gemm_bias_error(node, matrix.shape[0]) or (input_of(node, 2) is not None and const(node.inputs[2]) is None):
            return None
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        bias = const(input_of(node, 2)) if input_of(node, 2) is not None else None
        if bias is not None:
            bias = beta * np.broadcast_to(bias.astype(np.float64).reshape(-1), (matrix.shape[0],)).copy()
        return Linear(alpha * matrix, bias, transposed=bool(node.attrs.get("transA", 0)))

    def scaling_layer(self, node, scaling):
        return "Gemm", {k: v for k, v in node.attrs.items() if k in ("alpha", "beta")}, scaling.T

    def mid_shape(self, out_shape, rank):
        return list(out_shape[:1]) + [rank]

    def patches(self, node):
        return Rows.channels(1) if self.matrix(node) is not None else None

    def macs_per_weight(self, node, out_dims):
        return 1

    def channel_timing(self, node):  # as the MatMul it computes: x [N, in] times [in, out]
        matrix = self.matrix(node)
        if matrix is None:
            return None
        return "MatMul", [matrix.shape[1], matrix.shape[0]], {}, int(matrix.shape[1]), int(matrix.shape[0])


class _MatMulLayout(Layout):
    """Y = A B with a constant B [in, out]: channels on the last axis; no bias."""

    weights, bias, split, scaling_ops = (1,), None, True, ("MatMul", "Gemm")

    def axes(self, node):
        return 1, 0

    def channel_axis(self, node, rank=None):
        return -1 if rank is None else rank - 1

    def matrix(self, node):
        w = const(input_of(node, 1))
        return w.T if w is not None and w.ndim == 2 else None

    def from_matrix(self, node, matrix):
        return matrix.T, {}

    def linear(self, node):
        w, x = self.matrix(node), node.inputs[0].shape
        if w is None or x is None or len(x) < 2:  # a 1-D data input has no rows
            return None
        return Linear(w.astype(np.float64), None)

    def patches(self, node):
        return Rows.channels(None) if self.matrix(node) is not None else None

    def macs_per_weight(self, node, out_dims):
        return int(np.prod(out_dims[1:-1], dtype=np.int64)) if len(out_dims) >= 2 else 0

    def product_macs(self, node, left_dims, out_dims):  # attention's Q K^T and softmax(.) V
        if any(const(t) is not None for t in node.inputs[:2]):
            return 0
        return int(np.prod(out_dims[1:], dtype=np.int64)) * left_dims[-1]

    def timing(self, node, k, co):
        return "MatMul", [k, co]

    def channel_timing(self, node):
        w = const(input_of(node, 1))
        return None if w is None or w.ndim != 2 else ("MatMul", list(w.shape), {}, int(w.shape[0]), int(w.shape[1]))


class _RecurrentLayout(Layout):
    """W [D, gates*H, I] and R [D, gates*H, H], each element used once per time step.

    Y is [T, D, B, H] (layout 1: [B, T, D, H]). The bias B [D, 2*gates*H] is sliced by the channel rule; it is not
    a per-output bias here.
    """

    weights = (1, 2)

    def macs_per_weight(self, node, out_dims):
        if len(out_dims) != 4:
            return 0
        return out_dims[1] if node.attrs.get("layout", 0) else out_dims[0]


class _GatherLayout(Layout):
    """Gather of a constant table [rows, width] on axis 0: an embedding lookup. No weight for the channel rules."""

    weights = ()

    def linear(self, node):
        table = const(input_of(node, 0))
        if table is None or table.ndim != 2 or int(node.attrs.get("axis", 0)) not in (0, -2):
            return None
        return Linear(table.astype(np.float64), None, data=1, lookup=True)


LAYOUTS: dict[str, Layout] = {
    "Conv": _ConvLayout(),
    "ConvTranspose": _ConvTransposeLayout(),
    "Gemm": _GemmLayout(),
    "MatMul": _MatMulLayout(),
    "Gather": _GatherLayout(),
    **{op: _RecurrentLayout() for op in GATES},
}


def layout_of(node: gs.Node) -> Layout | None:
    """The weight layout of `node` (standard ONNX domain only), or None for an op without weights."""
    return LAYOUTS.get(node.op) if node.domain in (None, "", "ai.onnx") else None


def weight_matrix(node: gs.Node) -> np.ndarray | None:
    """The constant weight of a Conv (group 1), Gemm (transA 0) or MatMul as an [out, in] matrix; alpha not applied.

    Returns:
        The matrix, or None when the node has no such weight (another op, a computed or grouped weight).
    """
    layout = layout_of(node)
    return None if layout is None else layout.matrix(node)


def basis_matrix(node: gs.Node) -> np.ndarray | None:
    """The weight a basis split factors, as an [out, in] matrix; None when the op is not split."""
    layout = layout_of(node)
    return layout.basis_matrix(node) if layout is not None and layout.split else None


def unsplit_reason(node: gs.Node) -> str:
    """Why `basis_matrix` gives no matrix for `node`, in the words of the report's skipped layers."""
    if node.attrs.get("transA", 0):
        return f"{node.op} with transA=1 (its input transposed) is not split"
    return f"{node.op} without a constant weight that can be split (grouped, or computed)"


def affine(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """The op as y = W x + b along its channel axis: W [out, in] with alpha applied, b with beta (None: no bias).

    Raises:
        KeyError: `node` has no weight layout; AttributeError when its weight is not a matrix (check
            `weight_matrix` first).
    """
    return LAYOUTS[node.op].affine(node)


def bias_input(node: gs.Node) -> int | None:
    """Input index of `node`'s per-output-channel bias, or None when its op has none."""
    layout = layout_of(node)
    return None if layout is None else layout.bias


def weight_out_axis(node: gs.Node) -> int | None:
    """Axis of the constant weight that holds the output channels (None: not a plain producer)."""
    layout = layout_of(node)
    axes = None if layout is None else layout.axes(node)
    return None if axes is None else axes[0]


def output_channel_axis(node: gs.Node, rank: int | None = None) -> int:
    """Axis of a producer's output that carries its channels (see `Layout.channel_axis`)."""
    layout = layout_of(node)
    return 1 if layout is None else layout.channel_axis(node, rank)


def macs_per_weight(node: gs.Node, out_shape: list | None) -> int:
    """Multiply-accumulates per sample for each weight element of `node` (0 for ops without weights).

    Args:
        node: The node.
        out_shape: Its output's dims (None: unknown, gives 0; a None dim counts as 1).
    """
    layout = layout_of(node)
    if layout is None or out_shape is None:
        return 0
    return layout.macs_per_weight(node, [1 if d is None else int(d) for d in out_shape])


def linear(node: gs.Node) -> Linear | None:
    """`node` as one constant matrix applied to its data input (Gemm, MatMul, Gather of a table); None otherwise."""
    layout = layout_of(node)
    return None if layout is None else layout.linear(node)


def product_macs(node: gs.Node, left_shape: list | None, out_shape: list | None) -> int:
    """Multiply-accumulates per sample of a MatMul of two computed tensors (attention's Q K^T and softmax(.) V).

    Args:
        node: The node (0 for any other op, or a MatMul with a constant operand: its weight counts them).
        left_shape: Dims of its left operand (the contracted length is its last).
        out_shape: Dims of its output; the first is the batch (a None dim counts as 1).

    Returns:
        ``prod(out_shape[1:]) * left_shape[-1]``, or 0.
    """
    layout = layout_of(node)
    if layout is None or not left_shape or not out_shape:
        return 0
    return layout.product_macs(
        node, [1 if d is None else int(d) for d in left_shape], [1 if d is None else int(d) for d in out_shape]
    )


def weight_inputs(node: gs.Node) -> tuple[int, ...]:
    """Input indices of `node` that hold weights (empty for ops without)."""
    layout = layout_of(node)
    return () if layout is None else layout.weights
