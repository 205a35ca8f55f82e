"""Importance criteria: one registry; each maps the same context to one score per channel class."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import CalibrationError
from onnxprune.passes.basis import BasisPair
from onnxprune.passes.groups import ChannelGraph
from onnxprune.progress import steps
from onnxprune.rules import Kind, const, layouts

Criterion = Callable[["Context"], np.ndarray]
_CRITERIA: dict[str, Criterion] = {}


@dataclass
class Context:
    """What criteria may read: the graph, its channel analysis, and BN scales seen before folding."""

    graph: gs.Graph
    analysis: ChannelGraph
    bn_gamma: dict[str, np.ndarray] = field(default_factory=dict)
    pairs: list[BasisPair] = field(default_factory=list)
    energy: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> E[x_c^2] on calibration data
    pooled: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> [N, C] spatially averaged channels
    labels: np.ndarray | None = None  # [N] class of each calibration sample (the user's, or the model's top-1)
    seed: int = 0  # seed of any sampling a criterion does (cmi's sample of CMI_SAMPLES)
    covariances: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> [C, C] channel covariance
    curves: dict | None = None  # `reconstruction_curves`, once made


LABEL_CRITERIA = ("cmi", "discriminant")  # criteria that read pooled features and labels
DATA_CRITERIA = ("energy", "reconstruction", *LABEL_CRITERIA)  # criteria that need calibration data


def criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Register a criterion under `name`.

    Args:
        name: The name `importance` and ``--criterion`` take; a later registration under it replaces this one.

    Returns:
        A decorator that registers the function it is given and returns it unchanged.
    """

    def register(fn: Criterion) -> Criterion:
        _CRITERIA[name] = fn
        return fn

    return register


def names() -> list[str]:
    """Registered criteria.

    Returns:
        Their names, sorted.
    """
    return sorted(_CRITERIA)


def importance(name: str, context: Context) -> np.ndarray:
    """Per-class importance under criterion `name` (larger means keep).

    Bases of a split layer always score by their scaling factor: the norm of the scaling op's input column,
    which is the singular value s_k for a fresh split (the basis filters themselves all have norm 1), times the
    RMS response of the basis filter on calibration data when there is some; s_k^2 E[z_k^2] is then exactly the
    output error its removal causes.

    Args:
        name: A registered criterion (`names`).
        context: What the criterion reads.

    Returns:
        ``[n_classes]`` float64 scores.

    Raises:
        CalibrationError: The criterion needs calibration data the context lacks ("energy": ``energy``; "cmi" and
            "discriminant": ``pooled`` and ``labels``).
    """
    scores = _CRITERIA[name](context)
    nodes = {n.name: n for n in context.graph.nodes}
    by_producer = {tuple(g.producers): g for g in context.analysis.groups}
    for pair in context.pairs:
        group = by_producer.get((pair.basis,))
        step = context.analysis.steps.get(pair.scaling)
        if group is None or step is None:
            continue
        axis = next(a for a, t in step.params[0].axes if t == pair.mid)
        w = const(nodes[pair.scaling].inputs[1]).astype(np.float64)
        columns = np.sqrt((np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) ** 2).sum(1))
        if pair.mid in context.energy:
            columns = columns * np.sqrt(context.energy[pair.mid])
        scores[group.classes] = columns[: len(group.classes)]
    return scores


def _per_producer_channel(context: Context, fn: Callable[[gs.Node, np.ndarray, int], np.ndarray | None]) -> np.ndarray:
    """Sum fn(node, weight, out_axis) (one value per output channel) over each class's producer channels."""
    analysis = context.analysis
    scores = np.zeros(analysis.n_classes)
    nodes = {n.name: n for n in context.graph.nodes}
    for name, step in analysis.steps.items():
        if step.kind is not Kind.PRODUCER:
            continue
        node = nodes[name]
        out = node.outputs[0].name
        axis = next(a for a, t in step.params[0].axes if t == out)
        values = fn(node, const(node.inputs[step.params[0].index]).astype(np.float64), axis)
        if values is None:
            continue
        classes = analysis.classes(out)
        if len(values) != len(classes) and step.params[0].blocks:  # gate blocks of a recurrent layer: summed
            values = values.reshape(-1, len(classes)).sum(0)
        np.add.at(scores, classes, values)
    return scores


@criterion("l1")
def _l1(context: Context) -> np.ndarray:
    """Sum of |w| of each channel's filters."""
    return _per_producer_channel(context, lambda n, w, a: np.abs(np.moveaxis(w, a, 0)).reshape(w.shape[a], -1).sum(1))


@criterion("l2")
def _l2(context: Context) -> np.ndarray:
    """Euclidean norm of each channel's filters (summed in square over coupled producers)."""
    sq = _per_producer_channel(context, lambda n, w, a: (np.moveaxis(w, a, 0).reshape(w.shape[a], -1) ** 2).sum(1))
    return np.sqrt(sq)


@criterion("bn")
def _bn(context: Context) -> np.ndarray:
    """|gamma| of the BatchNormalization after each producer (AdaPruner); l2 for groups with no BN."""

    def gamma(node: gs.Node, w: np.ndarray, axis: int) -> np.ndarray | None:
        g = context.bn_gamma.get(node.name)
        return None if g is None or g.size != w.shape[axis] else np.abs(g)

    bn = _per_producer_channel(context, gamma)
    fallback = _l2(context)
    for group in context.analysis.groups:
        if not np.any(bn[group.classes]):
            bn[group.classes] = fallback[group.classes]
    return bn


@criterion("energy")
def _energy(context: Context) -> np.ndarray:
    """RMS of each channel at its producers' outputs on calibration data: the error of zeroing it there."""
    scores = np.zeros(context.analysis.n_classes)  # (without --calib the options check refused energy already)
    if not context.energy:  # nothing measured: no tracked channel (a quantized model has none)
        return scores
    for tensor, classes in _producer_outputs(context.analysis):
        if tensor in context.energy:
            np.add.at(scores, classes, context.energy[tensor])
    return np.sqrt(scores)


def _producer_outputs(analysis: ChannelGraph):
    """(tensor name, class of each of its channels) for every producer's output."""
    for step in analysis.steps.values():
        out = step.outputs[0]
        if step.kind is Kind.PRODUCER and out is not None:
            yield _tensor_of(analysis, out), analysis.class_of[out.ids]


def _class_features(context: Context, name: str) -> np.ndarray:
    """[N, classes] pooled features: each class's producer channels summed (coupled channels add in residuals)."""
    if not context.pooled or context.labels is None:
        raise CalibrationError(f"criterion '{name}' needs calibration data (--calib)")
    features = np.zeros((len(context.labels), context.analysis.n_classes))
    for tensor, classes in _producer_outputs(context.analysis):
        if tensor in context.pooled:
            np.add.at(features.T, classes, context.pooled[tensor].T)
    return features


@criterion("discriminant")
def _discriminant(context: Context) -> np.ndarray:
    """Fisher's ratio of each channel's pooled feature: between-class over within-class variance (LDA, 1-D)."""
    x = _class_features(context, "discriminant")
    labels = context.labels
    mean = x.mean(0)
    between = np.zeros(x.shape[1])
    within = np.zeros(x.shape[1])
    for k in np.unique(labels):
        xk = x[labels == k]
        between += len(xk) * (xk.mean(0) - mean) ** 2
        within += ((xk - xk.mean(0)) ** 2).sum(0)
    return between / (within + 1e-12 * (between + within).max() + 1e-30)


CMI_SATURATED = 1e-6  # bits: a greedy CMI step whose best gain is below this adds nothing (the search starts over)
CMI_SAMPLES = 256  # Gram matrices are N x N; a sub-sample keeps the greedy search in seconds


def _gram(x: np.ndarray) -> np.ndarray:
    """Normalised RBF Gram matrix (trace 1) of one feature over the samples, bandwidth by Silverman's rule."""
    x = (x - x.mean()) / (x.std() + 1e-12)
    sigma = 1.06 * len(x) ** (-1 / 5)
    k = np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * sigma**2))
    return k / np.trace(k)


def _renyi(a: np.ndarray) -> float:
    """Matrix-based Renyi entropy of order 2 of a trace-1 Gram matrix: -log2 tr(A^2), no eigen-decomposition."""
    return float(-np.log2(max(np.sum(a * a), 1e-300)))


def _joint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    h = a * b
    return h / np.trace(h)


@criterion("cmi")
def _cmi(context: Context) -> np.ndarray:
    """Greedy conditional mutual information with the labels (matrix-based Renyi entropy of Gram matrices).

    Within each channel group, repeatedly keep the channel whose pooled feature adds the most information about
    the labels given the channels kept so far: I(f; y | S) = H(f, S) + H(y, S) - H(f, y, S) - H(S). The score is
    the order of selection (first chosen scores highest), so a loud but uninformative or redundant channel ranks low.
    """
    x = _class_features(context, "cmi")
    labels = context.labels
    pick = np.random.default_rng(context.seed).permutation(len(labels))[:CMI_SAMPLES]
    x, labels = x[pick], labels[pick]
    y = (labels[:, None] == labels[None, :]).astype(np.float64)
    y /= np.trace(y)
    scores = np.zeros(context.analysis.n_classes)
    bases = {p.basis for p in context.pairs}  # their bases score by s_k rms(z_k) whatever the criterion
    scored = [g for g in context.analysis.groups if not set(g.producers) <= bases]
    # its own step: a real MobileNetV3-style classifier (1,104 channels in 14 groups) spent 89 s of a 150 s prune here
    for group in steps(scored, "channel scores (cmi)"):
        classes = list(group.classes)
        for position, c in enumerate(_greedy_cmi(np.stack([_gram(x[:, c]) for c in classes]), y)):
            scores[classes[c]] = len(classes) - position
    return scores


_CMI_ORDERS: dict[bytes, list[int]] = {}  # digest of (grams, y) -> order: `--method best` scores the same groups
CMI_REMEMBERED = 256  # ...for each channel result it makes; the oldest orders are forgotten past this many


def _greedy_cmi(grams: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices into `grams` [C, n, n] in the order the greedy search keeps them (see `_cmi`); remembered by content."""
    digest = hashlib.sha1(np.ascontiguousarray(grams).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    key = digest.digest()
    if key not in _CMI_ORDERS:
        if len(_CMI_ORDERS) >= CMI_REMEMBERED:
            del _CMI_ORDERS[next(iter(_CMI_ORDERS))]
        _CMI_ORDERS[key] = _greedy_cmi_search(grams, y)
    return list(_CMI_ORDERS[key])


def _greedy_cmi_search(grams: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices into `grams` [C, n, n] in the order the greedy search keeps them (see `_cmi`).

    Every candidate is scored at once: with K the kept Gram matrix, the Renyi entropy of the joint G_c*K/tr needs
    sum((G_c K)^2) = <G_c^2, K^2> and tr(G_c K) = <diag G_c, diag K>, and likewise with y, so one step is one
    product of the stacked squared Grams with two vectors instead of C Hadamard products of n x n matrices (the
    search went from minutes to seconds on a 576-channel group). The Grams are symmetric: the squares are stored
    for i <= j only, the off-diagonal ones counted twice through the vectors (half the memory and the time).

    Once the kept channels tell every sample apart, H(S) is log2(n) and no channel adds information: the gains are
    zero up to rounding (n = 256 samples: after 10-20 channels). From there (`CMI_SATURATED`) the channels left
    follow in their index order, which in a trained layer is no order at all. Two orders with a reason were
    measured against it (session 23, channel removal with measured sensitivity, refit on): starting the search over
    from nothing among the channels left made the chars ResNet-20 / VGG / MobileNetV2 at 0.7 better by 5 / 3 / 4 of
    2 400 test images, but the handed digits ResNet-20 (0.8 and 0.9, seeds 0-2) worse by 2-4 of 360 in 4 of 5
    runs (better by 3 in the fifth), and without the refit (the bundled example at 0.12) 75 % held-out agreement
    against 96 %; the channels' RMS, largest first, did best without the refit (100 %) and on VGG (+12 images) but
    refused ResNet-20 at 0.7 and lost 1-4 digits images in each of 4 runs. The packed products and the end of the search
    at saturation made the chars MobileNetV2's cmi step (channel removal at 0.7) 36 s -> 4 s, the prune 46 s -> 10 s.
    """
    count, n = grams.shape[0], grams.shape[1]
    upper = np.triu_indices(n)
    twice = np.where(upper[0] == upper[1], 1.0, 2.0)  # each off-diagonal entry stands for itself and its mirror
    y_squared = y[upper] ** 2
    ids = np.arange(count)  # the channels whose rows `squares` and `diagonals` still hold
    squares = grams[:, upper[0], upper[1]] ** 2
    diagonals = np.einsum("cii->ci", grams)
    left = np.ones(count, dtype=bool)  # per row held: not yet in the order
    kept = np.full_like(y, 1.0 / len(y))  # the Gram matrix of nothing: every sample alike
    h_s, h_ys = _renyi(kept), _renyi(_joint(y, kept))
    order: list[int] = []
    while len(order) < count:
        k2 = kept[upper] ** 2 * twice
        with_c, with_cy = (squares @ np.stack([k2, k2 * y_squared], axis=1)).T
        trace, trace_y = diagonals @ np.diag(kept), diagonals @ np.diag(kept * y)
        h_cs, h_cys = (
            -np.log2(np.maximum(with_c / trace**2, 1e-300)),
            -np.log2(np.maximum(with_cy / trace_y**2, 1e-300)),
        )
        gain = np.where(left, h_cs + h_ys - h_cys - h_s, -np.inf)
        if order and gain.max() < CMI_SATURATED:  # the samples are told apart: the rest in index order
            return order + [int(c) for c in ids[left]]
        row = int(np.argmax(gain))
        order.append(int(ids[row]))
        left[row] = False
        kept = _joint(grams[ids[row]], kept)
        h_s, h_ys = _renyi(kept), _renyi(_joint(y, kept))
        if 4 * (len(left) - left.sum()) >= len(left):  # drop the rows of the channels taken (the products read less)
            ids, squares, diagonals, left = ids[left], squares[left], diagonals[left], left[left]
    return order


def _tensor_of(analysis: ChannelGraph, flow) -> str | None:
    return next((t for t, f in analysis.flows.items() if f is flow), None)


def energy_tensors(analysis: ChannelGraph) -> dict[str, int]:
    """Tensor -> channel axis of every producer output: what the energy criterion measures.

    Args:
        analysis: The channel analysis of the graph.

    Returns:
        Tensor name -> its channel axis (``Flow.axis``), for every tracked output of a producer step.
    """
    made = {id(s.outputs[0]) for s in analysis.steps.values() if s.kind is Kind.PRODUCER}
    return {t: f.axis for t, f in analysis.flows.items() if id(f) in made}


def consumer_inputs(graph: gs.Graph, analysis: ChannelGraph) -> dict[str, int]:
    """Tensor -> channel axis of every tracked tensor a matrix op (Conv, Gemm, MatMul) reads (for `consumer_energy`).

    Args:
        graph: The graph.
        analysis: Its channel analysis.

    Returns:
        Tensor name -> its channel axis (``Flow.axis``), for each tracked data input of a node with a constant
        weight matrix (``layouts.weight_matrix``).
    """
    found = {}
    for node in graph.nodes:
        if layouts.weight_matrix(node) is not None and node.inputs[0].name in analysis.flows:
            found[node.inputs[0].name] = analysis.flows[node.inputs[0].name].axis
    return found


def consumer_energy(context: Context) -> np.ndarray:
    """Per class, the output energy its channel contributes to the layers that read it: sum ||W[:, j]||^2 E[x_j^2].

    Removing input channel j of a layer y = W x changes its output by W[:, j] x_j; with channels taken as
    uncorrelated (the diagonal of E[x x^T], as in OBD-style saliencies; LeCun et al. 1990) the expected squared
    change is ||W[:, j]||^2 E[x_j^2], summed over the kernel taps of a Conv. A split layer is read through its
    scaling op (W = S B), so the singular values weigh the columns. Zero for classes no matrix op reads, or where
    the input's energy was not measured (`consumer_inputs`).

    Args:
        context: The graph, its analysis, its basis pairs and ``energy`` (E[x_c^2] of the tensors `consumer_inputs`
            lists).

    Returns:
        [n_classes] scores, in output-energy units (their sum over a group is that of its readers' outputs, about).
    """
    scores = np.zeros(context.analysis.n_classes)
    scaling_of = {p.basis: p.scaling for p in context.pairs}
    nodes = {n.name: n for n in context.graph.nodes}
    for node in context.graph.nodes:
        w = layouts.weight_matrix(node)
        source = node.inputs[0].name if node.inputs else None
        if w is None or source not in context.energy or source not in context.analysis.flows:
            continue
        w = w.astype(np.float64)
        if node.name in scaling_of and layouts.weight_matrix(nodes[scaling_of[node.name]]) is not None:
            w = layouts.weight_matrix(nodes[scaling_of[node.name]]).astype(np.float64) @ w
        energy = context.energy[source]
        if w.shape[1] % len(energy):
            continue
        columns = (w * w).sum(0).reshape(len(energy), -1).sum(1)
        np.add.at(scores, context.analysis.classes(source), columns * energy)
    return scores


def collect_bn_gamma(graph: gs.Graph) -> dict[str, np.ndarray]:
    """BN scale per producer it directly follows, read before BN is folded away.

    Args:
        graph: The graph, before BatchNormalization is folded.

    Returns:
        Node name -> gamma (float64 ``[C]``) of the BatchNormalization that reads its output, for each one with a
        constant scale whose data input is made by a node (of any op; not a graph input).
    """
    found = {}
    for node in graph.nodes:
        if node.op != "BatchNormalization" or const(node.inputs[1]) is None:
            continue
        x = node.inputs[0]
        if len(x.inputs) == 1:
            found[x.inputs[0].name] = const(node.inputs[1]).astype(np.float64)
    return found


RECONSTRUCTION_STEPS = 128  # greedy steps per group at most: a wider group picks len / 128 channels a step
RECONSTRUCTION_RIDGE = 1e-6  # added to each covariance's diagonal, times its mean diagonal


def reconstruction_curves(context: Context) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per channel group: its classes in the order they are best kept in, and the error of keeping the first k.

    The error is that of the layers reading the group once its removed channels are predicted from those kept and
    the readers refitted (least squares, as ``refit.refit`` does next): for a reader y = W x of channels x with
    covariance C, keeping the set S leaves ``tr(Q (C - C[:, S] C[S, S]^-1 C[S, :]))``, Q = sum over the kernel taps
    of W_tap^T W_tap, the kernel's taps taken as seeing uncorrelated positions. Channels are picked greedily, each
    step the one whose keeping removes most of that error summed over the tensors the group flows through (forward
    selection for column subset selection with a Schur-complement update; the channel-pruning reconstruction of He
    et al. 2017, "Channel Pruning for Accelerating Very Deep Neural Networks", and ThiNet, Luo et al. 2017, with the
    compensation of the refit inside the choice). Unlike per-channel saliencies, a channel that its neighbours
    predict well is cheap to remove however much energy it carries.

    Args:
        context: The graph, its analysis, its basis pairs (a split reader is read through its scaling op) and
            ``covariances`` (`runner.channel_covariances` of the tensors `consumer_inputs` lists).

    Returns:
        Group name -> (class ids, best kept first; ``[n + 1]`` relative error of keeping the first k, 0 at k = 0
        which stands for the group whole, as ``budget.Choice`` options count) for each unblocked group of channels
        (not heads) whose every class is at most one channel of each tensor read; others are left out.
    """
    if context.curves is not None:
        return context.curves
    analysis, covariances = context.analysis, context.covariances
    scaling_of = {p.basis: p.scaling for p in context.pairs}
    nodes = {n.name: n for n in context.graph.nodes}
    taps: dict[str, np.ndarray] = {}
    for node in context.graph.nodes:
        w = layouts.weight_matrix(node)
        source = node.inputs[0].name if node.inputs else None
        if w is None or source not in covariances:
            continue
        w = w.astype(np.float64)
        if node.name in scaling_of and layouts.weight_matrix(nodes[scaling_of[node.name]]) is not None:
            w = layouts.weight_matrix(nodes[scaling_of[node.name]]).astype(np.float64) @ w
        c = len(covariances[source])
        if w.shape[1] % c:
            continue
        columns = w.reshape(w.shape[0], c, -1).transpose(2, 0, 1).reshape(-1, c)  # [taps x out, C]
        taps[source] = taps.get(source, 0) + columns.T @ columns
    curves = {}
    for group in steps(analysis.groups, "channel scores (reconstruction)"):
        if group.unit != "channel" or group.blocked or len(group.classes) < 2:
            continue
        position = {int(c): i for i, c in enumerate(group.classes)}
        parts = []
        for tensor, q in taps.items():
            where = [(j, position[int(c)]) for j, c in enumerate(analysis.classes(tensor)) if int(c) in position]
            if not where:
                continue
            idx, pos = (np.array(v, dtype=np.int64) for v in zip(*where))
            if len(set(pos.tolist())) != len(pos):  # a class of several channels here: not this model
                parts = []
                break
            parts.append((pos, covariances[tensor][np.ix_(idx, idx)], q[np.ix_(idx, idx)]))
        if parts:
            order, error = _greedy_reconstruction(len(group.classes), parts)
            curves[group.name] = (group.classes[order], error)
    context.curves = curves
    return curves


def _greedy_reconstruction(n: int, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Forward selection of `n` positions; parts: (positions, covariance, Q) per tensor (`reconstruction_curves`).

    Each part keeps the Schur complement G of its covariance on the positions not yet picked (picked ones are zero
    in it and dropped) and the diagonal of H = G Q G, the output energy each position would explain; the columns of
    H for a step's picks are made from G when needed, so a step costs O(m^2 s) for m positions left and s picks.
    """
    state = []
    for pos, cov, q in parts:
        g = cov + np.eye(len(pos)) * RECONSTRUCTION_RIDGE * max(float(np.mean(np.diag(cov))), 1e-300)
        state.append([pos.copy(), g, q, np.sum((g @ q) * g, axis=1)])
    total = sum(float(np.sum(q * g)) for _, g, q, _ in state)
    left = np.ones(n, dtype=bool)
    order: list[int] = []
    residual = [total]
    step = max(1, -(-n // RECONSTRUCTION_STEPS))
    while left.any():
        gains = np.zeros(n)
        for pos, g, _, dh in state:
            d = np.diag(g)
            gains[pos] += np.where(d > 0, dh / np.where(d > 0, d, 1.0), 0.0)
        candidates = np.flatnonzero(left)
        pick = candidates[np.argsort(-gains[candidates], kind="stable")[:step]]
        for part in state:
            pos, g, q, dh = part
            sel = np.flatnonzero(np.isin(pos, pick))
            if len(sel) == 0:
                continue
            sel = sel[np.diag(g)[sel] > 0]
            if len(sel):
                gs = g[:, sel]
                d = gs[sel] + np.eye(len(sel)) * 1e-12 * max(float(np.max(np.diag(g))), 1e-300)
                k = np.linalg.solve(d, gs.T)
                hs = g @ (q @ gs)
                dh = dh - 2.0 * np.sum(hs * k.T, axis=1) + np.sum(k * (hs[sel] @ k), axis=0)
                g = g - gs @ k
            keep = ~np.isin(pos, pick)
            part[:] = [pos[keep], g[np.ix_(keep, keep)], q[np.ix_(keep, keep)], dh[keep]]
        left[pick] = False
        order.extend(pick.tolist())
        after = max(sum(float(np.sum(q * g)) for _, g, q, _ in state), 0.0)
        residual.extend(np.linspace(residual[-1], after, len(pick) + 1)[1:].tolist())
    error = np.clip(np.array(residual) / total, 0.0, 1.0) if total > 0 else np.zeros(n + 1)
    error = np.minimum.accumulate(error)
    error[0] = 0.0
    return np.array(order, dtype=np.int64), error


@criterion("reconstruction")
def _reconstruction(context: Context) -> np.ndarray:
    """Output error each class's removal leaves once the readers are refitted (`reconstruction_curves`).

    Groups with a curve score each class by the error its step of the greedy order removes (non-increasing along
    the order, so ranking by score gives the order); the others by `consumer_energy`, on the same scale.
    """
    if not context.covariances:
        raise CalibrationError("criterion reconstruction needs channel covariances from calibration data")
    scores = consumer_energy(context) if context.energy else np.zeros(context.analysis.n_classes)
    for group_name, (classes, error) in reconstruction_curves(context).items():
        group = next(g for g in context.analysis.groups if g.name == group_name)
        total = max(float(scores[group.classes].sum()), 1e-300)
        drop = -np.diff(np.concatenate([[1.0], error[1:]]))
        drop = np.maximum.accumulate(np.maximum(drop, 0.0)[::-1])[::-1]  # non-increasing along the order
        scores[classes] = (drop + 1e-12) * total
    return scores
