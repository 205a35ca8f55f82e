"""Tensor-train (TT, also MPS) factorisation of large Gemm/MatMul weights and Gather tables, written as ONNX.

A weight matrix W [M, N] with M = m_1...m_d and N = n_1...n_d is read as the order-d tensor with modes
(m_k n_k) (the TT-matrix format of Oseledets 2011, "Tensor-train decomposition", SIAM J. Sci. Comput. 33(5);
Novikov et al. 2015, "Tensorizing neural networks"):

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_d[:, i_d, j_d, :]

with cores G_k [r_{k-1}, m_k, n_k, r_k], r_0 = r_d = 1. The bond dimensions r_k are what compression removes: TT-SVD
(`tt_svd`) takes the SVD of each unfolding in turn, and at full bond dimension the product is W exactly. Truncating
bond k to r_k drops its smallest singular values; the squared error is at most the sum of the squares dropped over
all bonds (Oseledets, Theorem 2.2), so each bond's singular values play the part of a basis split's bases
(`allocate_bonds`). The seed of the project (Qing et al., "Compressing neural network by tensor network with
exponentially fewer variational parameters", ../shared/seeds/adtn-tensor-network.txt) trains such networks end to
end; this is the post-training analogue: TT-SVD, then a least-squares refit on calibration data.

`write_tt` replaces a node by the contraction of its input with the cores, one core at a time (Reshape, Transpose,
MatMul; the input's leading dims stay symbolic), the bias kept; a Gather of a table becomes a TT-embedding that
reconstructs only the gathered rows.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from scipy import linalg

from onnxprune.errors import BudgetError
from onnxprune.graph import unique_name
from onnxprune.passes.basis import GRAM_SVD_MIN_SIZE
from onnxprune.progress import steps
from onnxprune.result import PassResult, Report
from onnxprune.rules.layouts import Linear, const, linear

TT_MIN_WEIGHTS = 1 << 16  # layers with fewer weights are left dense: their cores would not be smaller
TT_ORDER = 3  # cores per layer where both sizes factor so; 2 otherwise


def _factors(n: int, parts: int) -> tuple[int, ...] | None:
    """`n` as `parts` factors as equal as can be (largest primes first into the smallest part); None if a part is 1."""
    primes, k, m = [], 2, n
    while k * k <= m:
        while m % k == 0:
            primes.append(k)
            m //= k
        k += 1
    if m > 1:
        primes.append(m)
    buckets = [1] * parts
    for p in sorted(primes, reverse=True):
        buckets[int(np.argmin(buckets))] *= p
    return None if min(buckets) < 2 else tuple(sorted(buckets, reverse=True))


ORDERINGS = ("interleaved", "plain")


def tt_modes(
    out_size: int, in_size: int, ordering: str = "interleaved"
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The modes (m_1..m_d), (n_1..n_d) a [out_size, in_size] matrix is read with, or None where none fits.

    Order `TT_ORDER` where both sizes split into that many factors of at least 2 each, else order 2. Within the
    order the factors are as equal as the primes allow; the output modes go large to small and the input modes small
    to large, so the two outer cores (m_1 n_1, m_d n_d) are alike in size.

    ``ordering="interleaved"`` is the TT-matrix format: core k holds output mode m_k and input mode n_k.
    ``"plain"`` reads the matrix as the tensor [n_1..n_d, m_1..m_d]: 2d cores, the first d contract the input modes
    (their m is 1), the last d expand the output modes (their n is 1); the bond between them is the matrix rank, so
    a plain train is a rank-r split whose two factors are trains themselves.

    Args:
        out_size: M, the rows of the [M, N] matrix.
        in_size: N, its columns.
        ordering: One of `ORDERINGS`.

    Returns:
        ((m_1..m_d), (n_1..n_d)) with prod m = M and prod n = N, or None when M or N has no split in two.
    """
    for order in (TT_ORDER, 2):
        m, n = _factors(out_size, order), _factors(in_size, order)
        if m is not None and n is not None:
            n = tuple(reversed(n))
            return ((1,) * order + m, n + (1,) * order) if ordering == "plain" else (m, n)
    return None


def _as_tensor(matrix: np.ndarray, out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> np.ndarray:
    """[M, N] -> [m_1 n_1, ..., m_d n_d] (the TT-matrix ordering)."""
    d = len(out_modes)
    t = matrix.reshape(*out_modes, *in_modes)
    t = t.transpose([a for k in range(d) for a in (k, d + k)])
    return t.reshape([m * n for m, n in zip(out_modes, in_modes, strict=True)])


def tt_svd(
    matrix: np.ndarray,
    out_modes: tuple[int, ...],
    in_modes: tuple[int, ...],
    ranks: tuple[int, ...] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """TT-SVD of an [M, N] matrix (Oseledets 2011, Algorithm 1) with bond dimensions `ranks` (None: full).

    Args:
        matrix: ``[M, N]``, M = prod(out_modes), N = prod(in_modes).
        out_modes: (m_1..m_d).
        in_modes: (n_1..n_d).
        ranks: (r_1..r_{d-1}), each at least 1 (one larger than the bond's full dimension is clipped); None keeps
            every bond whole, down to its numerical rank (`RANK_RTOL`), which reproduces `matrix` up to rounding.

    Returns:
        (cores, spectra): cores ``[r_{k-1}, m_k, n_k, r_k]`` float64, and for each bond the singular values of the
        unfolding it was cut from (descending; before truncation, so the bond's "bases").

    Raises:
        ValueError: The modes do not multiply to the matrix's sizes, or `ranks` has the wrong length.
    """
    d = len(out_modes)
    if matrix.shape != (int(np.prod(out_modes)), int(np.prod(in_modes))) or len(in_modes) != d:
        raise ValueError(f"modes {out_modes} x {in_modes} do not fit a matrix of shape {list(matrix.shape)}")
    if ranks is not None and len(ranks) != d - 1:
        raise ValueError(f"{d} cores have {d - 1} bonds, got {len(ranks)} ranks")
    rest = _as_tensor(matrix.astype(np.float64), out_modes, in_modes)
    cores, spectra, r = [], [], 1
    for k in range(d - 1):
        unfolding = rest.reshape(r * out_modes[k] * in_modes[k], -1)
        basis, s = _column_basis(unfolding)
        keep = len(s) if ranks is None else max(1, min(int(ranks[k]), len(s)))
        cores.append(basis[:, :keep].reshape(r, out_modes[k], in_modes[k], keep))
        spectra.append(s)
        rest = basis[:, :keep].T @ unfolding  # the projection: what the dropped directions leave is the error
        r = keep
    cores.append(rest.reshape(r, out_modes[-1], in_modes[-1], 1))
    return cores, spectra


RANK_RTOL = 1e-7  # singular values under this share of the largest are numerically zero: no bond dimension


def _column_basis(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q [rows, k] orthonormal, s [k]): the left singular vectors and values of `a` down to its numerical rank.

    Through the eigendecomposition of the smaller Gram matrix for large unfoldings (a full-rank TT of a 4096 x 9216
    layer has unfoldings of 10^8 entries; a rank-deficient one, e.g. a constant weight, made the dense SVD that
    `thin_svd` falls back to take over 10 minutes). Q is exactly orthonormal (eigenvectors, or a QR of `a V` for a
    tall `a`), and the caller keeps ``Q^T a``, so a truncation's error is exactly the part of `a` outside Q.
    """
    rows, cols = a.shape
    if rows * cols < GRAM_SVD_MIN_SIZE:
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        k = max(1, int(np.sum(s > RANK_RTOL * s[0]))) if s.size and s[0] > 0 else 1
        return u[:, :k], s[:k]
    gram = a @ a.T if rows <= cols else a.T @ a
    lam, vec = linalg.eigh(gram, driver="evd", check_finite=False)
    lam, vec = np.clip(lam[::-1], 0.0, None), vec[:, ::-1]
    s = np.sqrt(lam)
    k = max(1, int(np.sum(s > RANK_RTOL * s[0]))) if s[0] > 0 else 1
    if rows <= cols:
        return vec[:, :k], s[:k]
    q, _ = np.linalg.qr(a @ vec[:, :k])
    return q, s[:k]


def tt_matrix(cores: list[np.ndarray]) -> np.ndarray:
    """The [M, N] matrix the cores ``[r_{k-1}, m_k, n_k, r_k]`` stand for (the inverse of `tt_svd`)."""
    t = cores[0][0]  # [m_1, n_1, r_1]
    for core in cores[1:]:
        t = np.tensordot(t, core, axes=([-1], [0]))
    t = t[..., 0]  # [m_1, n_1, ..., m_d, n_d]
    d = len(cores)
    t = t.transpose([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])
    return t.reshape(int(np.prod([c.shape[1] for c in cores])), -1)


def capped(ranks: tuple[int, ...], out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> tuple[int, ...]:
    """`ranks` with each bond at most what its neighbours can feed: r_k <= r_{k-1} m_k n_k and r_{k+1} m_{k+1} n_{k+1}.

    A bond above either is no use (the train has that rank at most there), but its cores would hold the weights.
    """
    r = [1, *ranks, 1]
    sizes = [m * n for m, n in zip(out_modes, in_modes, strict=True)]
    for k in range(1, len(r) - 1):
        r[k] = min(r[k], r[k - 1] * sizes[k - 1])
    for k in range(len(r) - 2, 0, -1):
        r[k] = min(r[k], r[k + 1] * sizes[k])
    return tuple(r[1:-1])


def tt_params(ranks: tuple[int, ...], out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> int:
    """Weights held by cores of bond dimensions `ranks` (`capped` first): sum_k r_{k-1} m_k n_k r_k."""
    r = (1, *capped(tuple(ranks), out_modes, in_modes), 1)
    return int(sum(r[k] * m * n * r[k + 1] for k, (m, n) in enumerate(zip(out_modes, in_modes, strict=True))))


def tt_macs(ranks: tuple[int, ...], out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> int:
    """Multiply-adds per input row of the contraction `write_tt` emits for a product (`capped` ranks first).

    Core k takes the state of (n_k..n_d)(m_1..m_{k-1}) r_{k-1} values to rows of r_{k-1} n_k and multiplies each by
    its [r_{k-1} n_k, m_k r_k] matrix: (n_k..n_d)(m_1..m_{k-1}) r_{k-1} m_k r_k multiply-adds. The dense layer does
    M N. The TT-matrix ordering at high bond dimensions does far more (a 2048 x 1024 layer at bonds [128, 118]:
    241x): the allocation keeps each train at or under its dense layer's count.
    """
    r = (1, *capped(tuple(ranks), out_modes, in_modes), 1)
    total = 0
    for k, m in enumerate(out_modes):
        total += int(np.prod(in_modes[k:])) * int(np.prod(out_modes[:k])) * r[k] * m * r[k + 1]
    return total


@dataclass
class TTLayer:
    """A layer a TT may replace, with the singular values of its bonds at full dimension.

    Attributes:
        node: The node's name.
        linear: The node as a matrix (`rules.layouts.Linear`); ``matrix`` [M, N].
        out_modes: (m_1..m_d).
        in_modes: (n_1..n_d).
        spectra: Per bond, its singular values.
        ordering: How the modes were laid out (`tt_modes`).
    """

    node: str
    linear: Linear
    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    spectra: list[np.ndarray]
    ordering: str = "interleaved"

    @property
    def dense(self) -> int:
        """Weights of the dense matrix."""
        return int(self.linear.matrix.size)

    @property
    def full_ranks(self) -> tuple[int, ...]:
        """Bond dimensions of the exact train."""
        return tuple(len(s) for s in self.spectra)

    def params(self, ranks: tuple[int, ...]) -> int:
        """Weights the cores hold at bond dimensions `ranks`."""
        return tt_params(ranks, self.out_modes, self.in_modes)

    def macs(self, ranks: tuple[int, ...]) -> int | None:
        """Multiply-adds per input row of the train at `ranks`; None for a lookup (the dense one does none)."""
        return None if self.linear.lookup else tt_macs(ranks, self.out_modes, self.in_modes)

    def bound(self, ranks: tuple[int, ...]) -> float:
        """Relative squared error bound of `ranks`: the dropped squared singular values over ||W||^2 (Oseledets)."""
        total = float(np.sum(self.spectra[0] ** 2)) or 1.0
        return float(sum(np.sum(s[r:] ** 2) for s, r in zip(self.spectra, ranks, strict=True))) / total


def tt_layers(graph: gs.Graph, *, remove: int = 0, min_weights: int = TT_MIN_WEIGHTS) -> tuple[list[TTLayer], Report]:
    """The layers of `graph` a TT may replace, with their bond spectra, and a report naming those left out and why.

    A layer qualifies when its op's layout reads it as a matrix (`rules.layouts.linear`: Gemm, MatMul with a constant
    2-D weight, Gather of a constant table), its weight is not shared, holds at least `min_weights` values, and both
    sizes factor (`tt_modes`). Of the two orderings, each layer takes the one whose bound (`TTLayer.bound`) is the
    smaller when the layer alone removes its share of `remove` (measured on the trained VGG-FC: plain wins there, by
    far; interleaved is the classic TT-matrix, and wins on weights that are a Kronecker-like product).

    Args:
        graph: The graph; not modified.
        remove: Weights the trains are to remove in all; each layer's share of it chooses its ordering.
        min_weights: Least weight count of a layer considered.

    Returns:
        (layers in node order, report with ``skipped`` for the matrices left dense).
    """
    report, found = Report(), []
    for node in graph.nodes:
        view = linear(node)
        if view is None or view.matrix.size < min_weights:
            continue
        weight = node.inputs[0 if view.lookup else 1]
        if len(weight.outputs) > 1:
            report.skip(node, f"weight '{weight.name}' is shared by {len(weight.outputs)} nodes: left dense")
            continue
        if not view.lookup and view.transposed is False and node.inputs[view.data].shape is None:
            report.skip(node, "the rank of its input is not known")
            continue
        if view.lookup and node.inputs[1].shape is None:
            report.skip(node, "the rank of its indices is not known")
            continue
        if tt_modes(*view.matrix.shape) is None:
            report.skip(node, f"matrix {list(view.matrix.shape)} has a prime size: no tensor-train modes")
            continue
        found.append((node, view))
    share = min(1.0, remove / max(1, sum(view.matrix.size for _, view in found)))
    chosen = []
    for node, view in steps(found, "tensor-train spectra"):
        options, deepest = [], []
        for ordering in ORDERINGS:
            modes = tt_modes(*view.matrix.shape, ordering)
            layer = TTLayer(node.name, view, *modes, spectra=bond_spectra(view.matrix, *modes), ordering=ordering)
            deepest.append((layer.params(tuple([1] * len(layer.spectra))), len(deepest), layer))
            try:
                ranks = allocate_bonds([layer], int(share * layer.dense)).get(layer.node, layer.full_ranks)
            except BudgetError:
                continue
            options.append((layer.bound(ranks) if ranks else 0.0, len(options), layer))
        # a share no train of this layer removes alone (the request is near or past what the eligible layers hold):
        # the ordering that removes the most, and the allocation over all layers says how far they get
        chosen.append(min(options)[2] if options else min(deepest)[2])
    return chosen, report


SPECTRA_REMEMBERED = 64  # the bond spectra of this many (matrix, modes) pairs are kept: the guard's retries and
_SPECTRA: dict[bytes, list[np.ndarray]] = {}  # bisection decompose the same layers again (VGG-19's FC: 20 s each)


def bond_spectra(matrix: np.ndarray, out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> list[np.ndarray]:
    """The singular values of each bond of the full TT-SVD of `matrix` (`tt_svd`), remembered by content.

    Args:
        matrix: ``[M, N]``.
        out_modes: (m_1..m_d).
        in_modes: (n_1..n_d).

    Returns:
        Per bond, its singular values (descending), as ``tt_svd(matrix, out_modes, in_modes)[1]``.
    """
    key = hashlib.sha1(np.ascontiguousarray(matrix).tobytes())
    key.update(repr((matrix.shape, matrix.dtype.str, out_modes, in_modes)).encode())
    digest = key.digest()
    if digest not in _SPECTRA:
        if len(_SPECTRA) >= SPECTRA_REMEMBERED:
            del _SPECTRA[next(iter(_SPECTRA))]
        _SPECTRA[digest] = tt_svd(matrix, out_modes, in_modes)[1]
    return [s.copy() for s in _SPECTRA[digest]]


def allocate_bonds(layers: list[TTLayer], remove: int) -> dict[str, tuple[int, ...]]:
    """Bond dimensions that remove at least `remove` weights at the least error, greedily over every bond.

    Each step lowers the bond whose next cut costs the least relative squared error (its dropped singular values
    squared over the layer's ||W||^2, Oseledets' bound) per weight saved; a layer counts as removed only by what its
    cores hold less than its dense matrix. Steps are 1/32 of a bond's dimension (at least 1). A Gemm/MatMul train
    that would do more multiply-adds than its dense layer (`tt_macs`) is then cut until it does not, so a small
    request may remove more than asked. Then every train the request does not need (the others remove enough
    without it) stays dense, least accurate first (then largest).

    Args:
        layers: The candidates (`tt_layers`).
        remove: Weights to remove, summed over the layers.

    Returns:
        Node name -> ranks (r_1..r_{d-1}) for the layers written as a TT; those not listed stay dense.

    Raises:
        BudgetError: Even bond dimension 1 everywhere removes less than `remove`.
    """
    ranks = {layer.node: list(layer.full_ranks) for layer in layers}
    by_name = {layer.node: layer for layer in layers}
    version = dict.fromkeys(ranks, 0)
    heap: list = []

    def saved(layer: TTLayer) -> int:
        return max(0, layer.dense - layer.params(tuple(ranks[layer.node])))

    def push(layer: TTLayer) -> None:
        for price, b, step in _cuts(layer, ranks[layer.node], layer.params):
            heapq.heappush(heap, (price, layer.node, version[layer.node], b, step))

    best = sum(max(0, layer.dense - layer.params(tuple([1] * len(layer.spectra)))) for layer in layers)
    if best < remove:
        raise BudgetError(
            f"tensor-train factorisation of the {len(layers)} eligible layers removes at most {best:,} weights, "
            f"{remove:,} asked"
        )
    for layer in layers:
        push(layer)
    done = sum(saved(layer) for layer in layers)
    while done < remove and heap:
        _, name, seen, b, step = heapq.heappop(heap)
        if seen != version[name]:
            continue
        layer = by_name[name]
        before = saved(layer)
        ranks[name][b] -= step
        version[name] += 1
        done += saved(layer) - before
        push(layer)
    for layer in layers:  # a product's train does no more MACs than its dense layer: cut deeper where it would
        if saved(layer) > 0 and _cut_to_dense_macs(layer, ranks[layer.node]):
            done = sum(saved(other) for other in layers)
    chosen = {name for name in ranks if saved(by_name[name]) > 0}
    # a layer the others' cuts do not need stays dense (rank-deficient weights save much at full bond dimension):
    # the least accurate trains go first, of equally accurate ones (exact trains) the one that overshoots most
    for name in sorted(chosen, key=lambda n: (-round(by_name[n].bound(tuple(ranks[n])), 9), -saved(by_name[n]))):
        if done - saved(by_name[name]) >= remove:
            done -= saved(by_name[name])
            chosen.discard(name)
    return {name: capped(tuple(ranks[name]), by_name[name].out_modes, by_name[name].in_modes) for name in chosen}


def _cut_to_dense_macs(layer: TTLayer, ranks: list[int]) -> bool:
    """Lower `ranks` (in place) until the train does no more MACs than the dense layer; whether any bond was lowered.

    Each step cuts the bond whose next step costs the least error per multiply-add saved. Lookups are left as they
    are (the dense lookup does none).
    """
    dense = int(layer.linear.matrix.size)
    lowered = False
    while not layer.linear.lookup and layer.macs(tuple(ranks)) > dense:
        cuts = list(_cuts(layer, ranks, layer.macs))
        if not cuts:
            break
        _, b, step = min(cuts)
        ranks[b] -= step
        lowered = True
    return lowered


def _cuts(layer: TTLayer, ranks: list[int], size):
    """Per bond above 1, its next cut: (error per unit saved, bond, step); steps are 1/32 of a bond, at least 1.

    The error is the relative squared error the cut drops (Oseledets' bound); `size` maps bond dimensions to the
    quantity saved (weights, or MACs).
    """
    now = size(tuple(ranks))
    total = float(np.sum(layer.spectra[0] ** 2)) or 1.0
    for b, s in enumerate(layer.spectra):
        if ranks[b] <= 1:
            continue
        step = max(1, ranks[b] // 32)
        gain = now - size(tuple(ranks[:b] + [ranks[b] - step] + ranks[b + 1 :]))
        yield float(np.sum(s[ranks[b] - step : ranks[b]] ** 2)) / total / max(gain, 1), b, step


def decompose_tt(graph: gs.Graph, layers: list[TTLayer], ranks: dict[str, tuple[int, ...]]) -> PassResult:
    """Replace, in place, each layer named in `ranks` by its tensor train at those bond dimensions.

    Args:
        graph: The graph holding the layers; edited in place.
        layers: The candidates (`tt_layers`).
        ranks: Node name -> bond dimensions (`allocate_bonds`).

    Returns:
        The result: ``report.layers[node]`` has ``op`` "tensor-train", ``modes``, ``ranks``, ``full_ranks``, weights
        ``dense`` and ``kept``, ``relative_error`` (exact: ||W - TT||_F / ||W||_F), and for the refit ``last_core``
        (the MatMul by the last core) and ``output`` (the layer's output tensor);
        ``report.counts["tensor_trains"]`` counts them.
    """
    report = Report()
    nodes = {n.name: n for n in graph.nodes}
    for layer in steps(layers, "tensor trains"):
        if layer.node not in ranks or layer.node not in nodes:
            continue
        target = layer.linear.matrix
        cores, _ = tt_svd(target, layer.out_modes, layer.in_modes, ranks[layer.node])
        error = np.linalg.norm(target - tt_matrix(cores)) / max(np.linalg.norm(target), 1e-30)
        output = nodes[layer.node].outputs[0].name
        last = write_tt(graph, nodes[layer.node], cores)
        report.layers[layer.node] = {
            "last_core": last,
            "output": output,
            "op": "tensor-train",
            "modes": [list(layer.out_modes), list(layer.in_modes)],
            "ordering": layer.ordering,
            "ranks": [c.shape[-1] for c in cores[:-1]],
            "full_ranks": list(layer.full_ranks),
            "dense": layer.dense,
            "kept": layer.params(tuple(c.shape[-1] for c in cores[:-1])),
            "relative_error": float(error),
        }
        report.counts["tensor_trains"] += 1
    graph.cleanup().toposort()
    return PassResult(graph, modified=bool(report.layers), report=report)


def write_tt(graph: gs.Graph, node: gs.Node, cores: list[np.ndarray]) -> str:
    """Replace `node` (a `Linear` of its layout) in place by the contraction of its input with `cores`.

    A product ``y = x W^T + b`` (x [..., N], the leading dims kept as they are, symbolic or not) becomes: Reshape of
    x to [..., n_1, N/n_1, 1], then per core k a Transpose bringing (r_{k-1}, n_k) last,
    Reshape [..., -1, r_{k-1} n_k], MatMul by the core as a [r_{k-1} n_k, m_k r_k] matrix, Reshape to the next input
    mode; the last gives [..., M], and the bias is added. A lookup ``y = T[ids]`` becomes per core a Gather of the
    core's slice for digit k of the (wrapped) index, multiplied along the bonds.

    Args:
        graph: The graph holding `node`.
        node: A node whose layout gives a `Linear` view.
        cores: ``[r_{k-1}, m_k, n_k, r_k]`` float64 of the matrix (`tt_svd`).

    Returns:
        The name of the MatMul by the last core (a product; its input is [..., rest, r_{d-1} n_d] and its output,
        reshaped, the layer's output before the bias), or "" for a lookup.
    """
    view = linear(node)
    dtype = const(node.inputs[0 if view.lookup else 1]).dtype
    namer = _Namer(graph, node.name)
    out, x = node.outputs[0], node.inputs[view.data]
    node.inputs.clear()
    node.outputs.clear()
    last = ""
    if view.lookup:
        _lookup(namer, x, cores, dtype)
    else:
        _product(namer, x, view, cores, dtype)
        last = graph.nodes[-2].name  # the MatMul before the last Reshape
    if view.bias is not None:
        namer.node("Add", [graph.nodes[-1].outputs[0], namer.const("bias", view.bias.astype(dtype))])
    graph.nodes[-1].outputs = [out]  # the last node made gives the layer's output, and takes the layer's name
    graph.nodes[-1].name, node.name = node.name, unique_name(graph, f"{node.name}_dense")
    return last


class _Namer:
    """Makes the nodes and constants of one rewrite, named after the node they replace."""

    def __init__(self, graph: gs.Graph, base: str) -> None:
        self.graph, self.base = graph, base

    def const(self, what: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(unique_name(self.graph, f"{self.base}_tt/{what}"), np.ascontiguousarray(values))

    def shape(self, values: list[int]) -> gs.Constant:
        return self.const("shape", np.array(values, dtype=np.int64))

    def node(self, op: str, inputs: list, attrs: dict | None = None) -> gs.Variable:
        name = unique_name(self.graph, f"{self.base}_tt_{op.lower()}")
        y = gs.Variable(f"{name}_out", dtype=None)
        self.graph.nodes.append(gs.Node(op, name, attrs=attrs or {}, inputs=inputs, outputs=[y]))
        return y


def _product(
    namer: _Namer,
    x: gs.Tensor,
    view: Linear,
    cores: list[np.ndarray],
    dtype: np.dtype,
) -> gs.Variable:
    lead = 1 if view.transposed else len(x.shape) - 1  # dims kept as they are
    if view.transposed:
        x = namer.node("Transpose", [x], {"perm": [1, 0]})
    keep = [0] * lead
    in_modes = [c.shape[2] for c in cores]
    state = namer.node("Reshape", [x, namer.shape(keep + [in_modes[0], -1, 1])])  # [..., n_1, rest, r_0]
    perm = list(range(lead)) + [lead + 1, lead + 2, lead]
    for k, core in enumerate(cores):
        r0, m, n, r1 = core.shape
        state = namer.node("Transpose", [state], {"perm": perm})  # [..., rest, r_{k-1}, n_k]
        state = namer.node("Reshape", [state, namer.shape(keep + [-1, r0 * n])])
        weight = core.transpose(0, 2, 1, 3).reshape(r0 * n, m * r1).astype(dtype)
        state = namer.node("MatMul", [state, namer.const(f"core{k + 1}", weight)])  # [..., rest, m_k r_k]
        target = keep + ([in_modes[k + 1], -1, r1] if k + 1 < len(cores) else [-1])
        state = namer.node("Reshape", [state, namer.shape(target)])
    return state


def _lookup(namer: _Namer, ids: gs.Tensor, cores: list[np.ndarray], dtype: np.dtype) -> gs.Variable:
    lead = len(ids.shape)
    keep = [0] * lead
    rows = [c.shape[1] for c in cores]
    index = namer.node("Cast", [ids], {"to": 7})  # int64
    index = namer.node("Mod", [index, namer.const("rows", np.array(int(np.prod(rows)), dtype=np.int64))])
    state, width = None, 1
    for k, core in enumerate(cores):
        r0, m, n, r1 = core.shape
        stride = int(np.prod(rows[k + 1 :]))
        digit = namer.node("Div", [index, namer.const("stride", np.array(stride, dtype=np.int64))])
        digit = namer.node("Mod", [digit, namer.const("mode", np.array(m, dtype=np.int64))])
        table = core.transpose(1, 0, 2, 3).reshape(m, r0, n * r1).astype(dtype)  # [m_k, r_{k-1}, n_k r_k]
        piece = namer.node("Gather", [namer.const(f"core{k + 1}", table), digit], {"axis": 0})
        state = piece if state is None else namer.node("MatMul", [state, piece])  # [..., width, n_k r_k]
        width *= n
        state = namer.node("Reshape", [state, namer.shape(keep + ([width, r1] if k + 1 < len(cores) else [-1]))])
    return state
