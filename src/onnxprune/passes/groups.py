"""find_channel_groups(): walk the graph once with the op table; channels that must go together form groups."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune import rules
from onnxprune.rules import Flow, Step


@dataclass
class Group:
    """Channels of a set of producers that are removed together; one entry of `classes` per channel."""

    name: str
    producers: list[str]
    classes: np.ndarray
    blocked: dict[int, str] = field(default_factory=dict)  # class -> reason, for classes that cannot go
    unit: str = "channel"  # what one class is: "channel", or "head" (an attention head, its Q, K, V columns together)

    @property
    def removable(self) -> np.ndarray:
        """Classes of this group that may be removed."""
        return np.array([c for c in self.classes if c not in self.blocked], dtype=np.int64)


@dataclass
class ChannelGraph:
    """Everything the group finder learned: per-node steps, per-tensor flows, channel classes and groups."""

    steps: dict[str, Step]
    flows: dict[str, Flow]
    class_of: np.ndarray  # channel id -> class index
    owner: list[tuple[str, int]]  # channel id -> (producer node, output channel); ("", -1) for sources
    groups: list[Group]
    blockers: list[tuple[str, str]]  # (node, reason) for every node that stopped channels

    @property
    def n_classes(self) -> int:
        """Number of independent channel classes."""
        return int(self.class_of.max()) + 1 if len(self.class_of) else 0

    def classes(self, tensor: str) -> np.ndarray:
        """Class of each position of a tracked tensor's channel axis.

        Args:
            tensor: Name of a tracked tensor (a key of ``flows``).

        Returns:
            ``[channels]`` int64 class ids, in the order of the positions.
        """
        return self.class_of[self.flows[tensor].ids]

    def alive(self, plan: dict[str, np.ndarray]) -> np.ndarray:
        """Boolean per class: False for the classes `plan` removes (plan: group name -> kept indices).

        Args:
            plan: Group name -> kept indices into that group's ``classes`` (0 .. len - 1; others are ignored).

        Returns:
            ``[n_classes]`` bool, True for every class kept.

        Raises:
            KeyError: `plan` names a group that is not in ``groups``.
            ValueError: `plan` removes a blocked class of a group.
        """
        alive = np.ones(self.n_classes, dtype=bool)
        by_name = {g.name: g for g in self.groups}
        for name, keep in plan.items():
            if name not in by_name:
                raise KeyError(f"plan names unknown group {name!r}")
            group = by_name[name]
            gone = np.setdiff1d(np.arange(len(group.classes)), np.asarray(keep, dtype=np.int64))
            bad = [group.blocked[c] for c in group.classes[gone] if c in group.blocked]
            if bad:
                raise ValueError(f"plan removes blocked channels of group {name!r}: {bad[0]}")
            alive[group.classes[gone]] = False
        return alive

    def keep(self, tensor: str, alive: np.ndarray) -> np.ndarray:
        """Positions of `tensor`'s channel axis that stay.

        Args:
            tensor: Name of a tracked tensor.
            alive: ``[n_classes]`` bool, True for a kept class (as `alive` returns it).

        Returns:
            Ascending int64 positions whose class is kept.
        """
        return np.flatnonzero(alive[self.classes(tensor)]).astype(np.int64)


class _Walker:
    """The rules' view of the walk: id allocation, coupling (union-find), shapes."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.parent: list[int] = []
        self.owner: list[tuple[str, int]] = []
        self.blocked: dict[int, str] = {}
        self.units: dict[int, str] = {}

    def new_ids(self, node: gs.Node, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.owner.extend((node.name, c) for c in range(n))
        return np.arange(start, start + n, dtype=np.int64)

    def source_ids(self, n: int, reason: str) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.owner.extend(("", -1) for _ in range(n))
        ids = np.arange(start, start + n, dtype=np.int64)
        self.block(ids, reason)
        return ids

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def block(self, ids: np.ndarray, reason: str) -> None:
        for i in np.unique(ids).tolist():
            self.blocked.setdefault(i, reason)

    def label(self, ids: np.ndarray, unit: str) -> None:
        for i in np.unique(ids).tolist():
            self.units.setdefault(i, unit)

    def shape(self, tensor: gs.Tensor) -> list[int | None] | None:
        if isinstance(tensor, gs.Constant):
            return list(tensor.values.shape)
        if tensor.shape is None:
            return None
        return [d if isinstance(d, int) and d >= 0 else None for d in tensor.shape]


def find_channel_groups(graph: gs.Graph) -> ChannelGraph:
    """Walk `graph` (topologically sorted) once and group the channels that must be removed together.

    A group that reaches a graph output, an op without a rule or a node that mixes channels is blocked and
    keeps the first reason found; nothing is guessed.

    Args:
        graph: Topologically sorted graph (the rules read its inferred shapes).

    Returns:
        The analysis: a step per node that has a rule, a flow per tracked tensor, the class of every channel id, and
        the groups (one per set of producer nodes, ordered by the lowest channel id of their first class), each with
        its blocked classes and why; ``blockers`` lists the nodes that stopped tracked channels.
    """
    walker = _Walker(_opset(graph))
    steps: dict[str, Step] = {}
    flows: dict[str, Flow] = {}
    blockers: list[tuple[str, str]] = []
    for node in graph.nodes:
        incoming = [flows.get(t.name) for t in node.inputs]
        outer = _outer_names(node)
        result: Step | str
        if outer:
            result = f"{node.op} has subgraphs; channels that cross them are not tracked"
            incoming += [flows[n] for n in outer if n in flows]
        else:
            result = rules.rule_for(node, incoming, walker)
        if isinstance(result, str):
            reason = f"{node.op} '{node.name}': {result}"
            for flow in incoming:
                if flow is not None:
                    walker.block(flow.ids, reason)
            if any(f is not None for f in incoming):
                blockers.append((node.name, result))
            continue
        steps[node.name] = result
        for tensor, flow in zip(node.outputs, result.outputs):
            if flow is not None:
                flows[tensor.name] = flow
    _couple_shared_constants(graph, steps, flows, walker)
    for out in graph.outputs:
        if out.name in flows:
            walker.block(flows[out.name].ids, f"reaches graph output '{out.name}'")
    return _finish(walker, steps, flows, blockers)


def _couple_shared_constants(graph: gs.Graph, steps: dict[str, Step], flows: dict[str, Flow], walker: _Walker) -> None:
    """A constant several nodes read is sliced once and stays shared: a channel goes from every use or from none.

    The tensors that select along each axis of it are coupled across its uses; where one use cannot slice it (its
    node blocks, or reads it whole), the channels of the others along that constant are blocked.
    """
    uses: dict[str, list[tuple[gs.Node, int]]] = {}
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and tensor.values.ndim > 0 and tensor.values.size > 1:
                uses.setdefault(tensor.name, []).append((node, i))
    for name, readers in uses.items():
        if len(readers) < 2:
            continue
        ndim = readers[0][0].inputs[readers[0][1]].values.ndim
        axes_per_use = []
        for node, i in readers:
            step = steps.get(node.name)
            found = [ps for ps in step.params if ps.index == i] if step is not None else []
            axes_per_use.append({axis % ndim: t for ps in found for axis, t in ps.axes if t in flows})
        sliced = [a for a in axes_per_use if a]
        if not sliced:
            continue
        axes = set().union(*sliced)
        for axis in axes:
            tensors = [a.get(axis) for a in axes_per_use]
            present = [t for t in tensors if t is not None]
            if len(present) < len(tensors):
                missing = next(node.name for (node, _), t in zip(readers, tensors) if t is None)
                reason = f"weight '{name}' is shared with '{missing}', which cannot slice it along axis {axis}"
                for t in present:
                    walker.block(flows[t].ids, reason)
                continue
            if len({len(flows[t].ids) for t in present}) > 1:
                for t in present:
                    walker.block(flows[t].ids, f"weight '{name}' is shared by uses whose channels do not line up")
                continue
            for t in present[1:]:
                walker.unify(flows[present[0]].ids, flows[t].ids)


def _finish(
    walker: _Walker, steps: dict[str, Step], flows: dict[str, Flow], blockers: list[tuple[str, str]]
) -> ChannelGraph:
    roots = np.array([walker.find(i) for i in range(len(walker.parent))], dtype=np.int64)
    _, class_of = np.unique(roots, return_inverse=True) if len(roots) else (None, np.zeros(0, dtype=np.int64))
    class_of = class_of.astype(np.int64)
    n = int(class_of.max()) + 1 if len(class_of) else 0
    blocked = {}
    for i, reason in sorted(walker.blocked.items()):
        blocked.setdefault(int(class_of[i]), reason)
    members: list[list[int]] = [[] for _ in range(n)]
    for i, c in enumerate(class_of.tolist()):
        members[c].append(i)
    order = {name: k for k, name in enumerate(steps)}
    by_key: dict[tuple[str, ...], list[int]] = {}
    for c in range(n):
        producers = sorted(
            {walker.owner[i][0] for i in members[c] if walker.owner[i][0]}, key=lambda p: order.get(p, -1)
        )
        if producers:
            by_key.setdefault(tuple(producers), []).append(c)
    units = {int(class_of[i]): unit for i, unit in walker.units.items()}
    groups = [
        Group(
            "+".join(key),
            list(key),
            np.array(cs, dtype=np.int64),
            {c: blocked[c] for c in cs if c in blocked},
            next((units[c] for c in cs if c in units), "channel"),
        )
        for key, cs in sorted(by_key.items(), key=lambda kv: min(members[kv[1][0]]))
    ]
    return ChannelGraph(steps, flows, class_of, walker.owner, groups, blockers)


def _opset(graph: gs.Graph) -> int:
    opset = graph.opset
    imports = getattr(graph, "import_domains", None) or []
    for domain in imports:
        if domain.domain in ("", "ai.onnx"):
            opset = domain.version
    return int(opset)


def _outer_names(node: gs.Node) -> list[str]:
    """Names a node's subgraphs read from the enclosing graph (empty when it has no subgraphs)."""
    names: list[str] = []
    for value in node.attrs.values():
        subgraphs = value if isinstance(value, list) else [value]
        for sub in subgraphs:
            if isinstance(sub, gs.Graph):
                local = {t.name for n in sub.nodes for t in n.outputs} | {t.name for t in sub.inputs}
                names += [t.name for n in sub.nodes for t in n.inputs if t.name and t.name not in local]
                names.append("<subgraph>")
    return names
