"""Tucker-2 form of a split k x k convolution: an input projection, a small k x k core, the scaling op.

A Conv weight W [Co, Ci, k...] split at rank r (basis op [r, Ci, k...], scaling op [Co, r]) costs r (Ci k + Co)
weights, where k is the number of kernel taps. The Tucker-2 decomposition (Tucker 1966; for convolutions Kim et al.
2016, "Compression of deep convolutional neural networks for fast and low power mobile applications", ICLR)
factors both channel modes instead:

    W[o, i, :] = sum_{a, b} U[o, a] G[a, b, :] P[b, i]

written as a 1 x 1 Conv P [t, Ci] (the projection), the k x k basis op G [t, t, k...] and the 1 x 1 scaling op
U [Co, t]: t Ci + t^2 k + t Co weights. At the same count t is larger than r: at one basis vector of a 64 -> 64
3 x 3 layer (640 weights) t is 3, and the layer's output keeps 3 directions instead of 1. P is the leading left
singular vectors of W's input-channel unfolding (the HOSVD factor); G and U are the rank-t SVD of W projected on
them, so the pair (G, U) is again a basis op (orthonormal filters) feeding its scaling op, and the refit solves it
in the data norm on the projected inputs as it does any split pair.

On the chars ResNet-20 at 0.9 (a helper's prototype, the same sequential least-squares refit for both): 96.0 %
test accuracy against 86.3 % for the rank-r splits at 8 % fewer weights; without any refit 85.3 % against 59.4 %.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph import unique_name
from onnxprune.passes.basis import BasisPair
from onnxprune.result import PassResult, Report
from onnxprune.rules.layouts import const, layout_of

PROJECTION = "_projection"  # suffix of the projection node's name: `<layer>_projection`


def tucker_rank(ci: int, co: int, taps: int, rank: int) -> int:
    """The largest t whose Tucker-2 form costs no more weights than the rank-`rank` split (nor MACs, at stride 1).

    Args:
        ci: The layer's input channels.
        co: Its output channels.
        taps: Kernel taps (k_h k_w).
        rank: The split's kept rank r.

    Returns:
        t in [0, min(Ci, Co)] with ``t Ci + t^2 taps + t Co <= r (Ci taps + Co)``.
    """
    budget = rank * (ci * taps + co)
    t = min(ci, co)
    while t > 0 and t * ci + t * t * taps + t * co > budget:
        t -= 1
    return t


def tucker_factors(weight: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HOSVD projection and rank-t core of a Conv weight.

    Args:
        weight: W [Co, Ci, k...].
        t: The Tucker rank of both channel modes.

    Returns:
        (P [t, Ci] with orthonormal rows, G [t, t, k...] with orthonormal rows as [t, t k], U [Co, t]), float64,
        with ``W ~ U G P`` (exact when t reaches both channel ranks).
    """
    w = weight.astype(np.float64)
    co, ci = w.shape[:2]
    taps = w.shape[2:]
    unfolded = np.moveaxis(w, 1, 0).reshape(ci, -1)  # [Ci, Co k]
    left, _, _ = np.linalg.svd(unfolded, full_matrices=False)
    p = left[:, :t].T  # [t, Ci]
    projected = np.einsum("oi...,ti->ot...", w, p).reshape(co, -1)  # [Co, t k]
    u, s, vt = np.linalg.svd(projected, full_matrices=False)
    t_core = min(t, len(s))
    core = np.zeros((t, t * int(np.prod(taps, dtype=np.int64))))
    core[:t_core] = vt[:t_core]
    scaling = np.zeros((co, t))
    scaling[:, :t_core] = u[:, :t_core] * s[:t_core]
    return p, core.reshape((t, t) + taps), scaling


def to_tucker(
    graph: gs.Graph,
    *,
    pairs: list[BasisPair],
    kept: dict[str, np.ndarray] | None = None,
    round_to: int = 1,
    keeps_speed: Callable[[gs.Node, tuple[int, ...], int, int], bool] | None = None,
) -> PassResult:
    """Write, in place, each split k x k Conv whose Tucker-2 form is closer to its layer as that form.

    A pair qualifies when it is still split, its layout allows a projection before it (`Layout.projectable`: a
    k x k Conv, stride 1, group 1), the weight of the layer it was split from is known (`BasisPair.original`; sliced
    to the channels `kept` when they were removed after the split), and a Tucker rank t above r fits its weights
    (`tucker_rank`). It is rewritten only where ``||W - U G P||_F`` is below the split's ``||W - S B||_F``.

    Args:
        graph: Graph to edit in place.
        pairs: The split pairs of this run.
        kept: Tensor name -> original channel positions that stay, for tensors whose channels were removed.
        round_to: t is a multiple of this (the ranks' rounding: onnxruntime's blocked layout runs channel counts
            off the vector width through reorders).
        keeps_speed: (basis op, dense weight shape, r, t) -> whether the Tucker-2 form runs no slower than the
            split; a layer for which it says False stays split (``report.counts["tucker_slower"]``). None: not
            asked (a plan made without a latency budget).

    Returns:
        The result: per layer rewritten, ``report.layers[<layer>_projection]`` (op "projection", its rank t and
        weight dims) and the basis and scaling ops' entries (rank t, weight dims); ``report.counts["tucker"]``
        counts them.
    """
    report = Report()
    nodes = {n.name: n for n in graph.nodes}
    kept = kept or {}
    for pair in pairs:
        basis, scaling = nodes.get(pair.basis), nodes.get(pair.scaling)
        if basis is None or scaling is None or basis.outputs[0].name != pair.mid or pair.original is None:
            continue
        layout = layout_of(basis)
        if layout is None or not layout.projectable(basis) or layout_of(scaling) is not layout:
            continue
        b_w, s_w = const(basis.inputs[1]), const(scaling.inputs[1])
        w = np.asarray(pair.original.weight.values)
        if s_w is None or not layout.pointwise(scaling) or w.ndim != b_w.ndim:
            continue
        x, y = basis.inputs[0], scaling.outputs[0]
        r, ci = b_w.shape[:2]
        co = s_w.shape[0]
        # channels removed after the split (in the same stage): the split layer's weight had them all
        if w.shape[1] != ci and x.name in kept and len(kept[x.name]) == ci and kept[x.name].max() < w.shape[1]:
            w = w[:, kept[x.name]]
        if w.shape[0] != co and y.name in kept and len(kept[y.name]) == co and kept[y.name].max() < w.shape[0]:
            w = w[kept[y.name]]
        taps = int(np.prod(w.shape[2:], dtype=np.int64))
        if w.shape[:2] != (co, ci) or b_w.shape[2:] != w.shape[2:]:  # (a layer not this pair's: not rewritten)
            continue
        t = tucker_rank(ci, co, taps, r)
        t -= t % max(round_to, 1)
        if t <= r or t >= ci:  # no more directions than the split keeps, or nothing to project away
            continue
        p, core, u = tucker_factors(w, t)
        matrix = w.reshape(co, -1).astype(np.float64)
        split_error = np.linalg.norm(matrix - s_w.reshape(co, r) @ b_w.reshape(r, -1))
        made = u @ core.reshape(t, -1)  # [Co, t k]: the layer on the projected input
        tucker_error = np.linalg.norm(
            matrix - np.einsum("ot...,ti->oi...", made.reshape((co, t) + w.shape[2:]), p).reshape(co, -1)
        )
        if tucker_error >= split_error:
            continue
        if keeps_speed is not None and not keeps_speed(basis, w.shape, r, t):
            report.counts["tucker_slower"] += 1
            continue
        dtype = b_w.dtype
        name = unique_name(graph, pair.basis.removesuffix("_basis") + PROJECTION)
        op, attrs, p_w = layout.scaling_layer(basis, p)  # the same kind of pointwise op, before the core
        shape = None if x.shape is None else layout.mid_shape(list(x.shape), t)
        projected = gs.Variable(unique_name(graph, f"{name}_out"), dtype=x.dtype, shape=shape)
        weight = gs.Constant(unique_name(graph, f"{name}/weight"), p_w.astype(dtype))
        graph.nodes.append(gs.Node(op, name, attrs=attrs, inputs=[x, weight], outputs=[projected]))
        basis.inputs[0] = projected
        basis.inputs[1] = gs.Constant(unique_name(graph, f"{pair.basis}/weight"), core.astype(dtype))
        s_w = layout.scaling_layer(basis, u)[2].astype(dtype)
        scaling.inputs[1] = gs.Constant(unique_name(graph, f"{pair.scaling}/weight"), s_w)
        mid = basis.outputs[0]
        if mid.shape is not None:
            mid.shape = layout.mid_shape(list(mid.shape), t)
        report.layers[name] = {"op": "projection", "rank": t, "after": list(p_w.shape)}
        report.layers.setdefault(pair.basis, {"op": "basis"}).update(rank=t, after=list(core.shape))
        report.layers.setdefault(pair.scaling, {"op": scaling.op}).update(rank=t, after=list(s_w.shape))
        report.counts["tucker"] += 1
    graph.cleanup().toposort()
    return PassResult(graph, modified=bool(report.counts.get("tucker")), report=report)
