"""Frontier: a graph's tensors on calibration samples, computed segment by segment and kept while they are needed.

A sequential refit (DESIGN §3, Compensation) fits layer after layer on the inputs that the already-refitted layers
before it produce. Run naively, every layer re-runs the whole model on every sample: for a ResNet-50 that is about 50
full passes per stage, and most of a prune's time (profiled: one layer's refit took 2 minutes on 2 cores).

A `Frontier` runs each node once per sample. Asked for tensors, it runs only the nodes not yet run that those
tensors depend on (one small onnxruntime model per request, its inputs the kept tensors), and keeps, for every
batch, each computed tensor that a node not yet run still consumes (the live frontier: one or two activations in a
chain or a residual network). A node's weights are read when it runs, so a layer refitted before anything asked
for its output contributes its new weights downstream, which is exactly the sequential order.

Memory is the live frontier times the number of samples. Past `CACHE_BYTES` (or for graphs whose control-flow
subgraphs read outer tensors) it falls back to replaying the whole current graph for every request: the old cost,
with memory flat in the number of samples.

A pruned graph computes what the original does up to its first pruned layer. Given the original's frontier on the
same samples as its `source`, a frontier borrows those tensors instead of computing them again: the part of the
network before the first change runs once, not once per model (light ResNet-50 pruned from its third stage on:
about half of the pruned model's passes).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.calibration.data import Samples, as_samples
from onnxprune.graph import session, to_model

log = logging.getLogger(__name__)

CACHE_BYTES = 4 << 30  # kept activations (all samples, all live tensors) beyond which a frontier replays instead


class Frontier:
    """Tensors of `graph` on `data`, computed once per node and kept while a node not yet run consumes them.

    The graph may be edited between requests, but only at nodes that have not run yet (a refit writes the weights
    of a layer before anything asks for its output); nodes that have run are never run again.

    Args:
        graph: The graph to run (its nodes in topological order, as exported models have them).
        template: Model whose opsets and metadata exports take.
        data: The samples; batches as `Samples.batches` makes them.
        batch_size: Samples per batch when the model's batch dim is dynamic.
        cache_bytes: Memory for kept activations before falling back to replaying the whole graph per request.
        source: A frontier of another graph on the same samples and batch size (the unpruned one), from which the
            tensors both graphs compute alike (`shared_tensors`) are borrowed rather than computed here.
    """

    def __init__(
        self,
        graph: gs.Graph,
        template: onnx.ModelProto,
        data: Samples | dict[str, np.ndarray],
        *,
        batch_size: int = 32,
        cache_bytes: int = CACHE_BYTES,
        source: Frontier | None = None,
    ) -> None:
        self.graph, self.template = graph, template
        self.data, self.batch_size = as_samples(data), batch_size
        self.cache_bytes = cache_bytes
        feeds = list(self.data.batches(batch_size))
        self._batches = len(feeds)
        self._values: dict[str, list[np.ndarray]] = {
            t.name: [f[t.name] for f in feeds] for t in graph.inputs if feeds and t.name in feeds[0]
        }
        self._done: set[int] = set()
        self.replaying = _has_subgraphs(graph)
        self.runs = 0  # onnxruntime models built (segments, or whole-graph replays)
        self.borrowed = 0  # tensors taken from `source` instead of computed
        self._source = source if source is not None and not self.replaying and len(source) == self._batches else None
        self._shared: set[str] | None = None  # tensors computed as in the source (known at the first request)

    def __len__(self) -> int:
        return self._batches

    def get(self, names: list[str]) -> list[dict[str, np.ndarray]]:
        """Per batch, name -> value of the tensors `names`, as the graph now stands.

        Args:
            names: Tensor names (graph inputs, intermediate tensors or graph outputs).

        Returns:
            One dict per batch, in the batches' order.

        Raises:
            KeyError: A name that no node produces and that is not a graph input.
        """
        if not self._batches:
            return []
        if self.replaying:
            return self._replay(names)
        if self._source is not None:
            self._borrow(names)
        missing = [n for n in dict.fromkeys(names) if n not in self._values]
        gone = [n for n in missing if self._shared and n in self._shared]
        if gone:
            raise KeyError(f"'{gone[0]}' is computed before the first changed node and its source dropped it")
        if missing:
            self._advance(missing)
            self._forget(keep=set(names))
            if not self.replaying and self._bytes() > self.cache_bytes:
                log.info(
                    "kept activations passed %d MB: replaying the whole graph per request from here (slower)",
                    self.cache_bytes >> 20,
                )
                self.replaying = True
                found = [{n: self._values[n][i] for n in names} for i in range(self._batches)]
                self._values.clear()
                return found
        return [{n: self._values[n][i] for n in names} for i in range(self._batches)]

    def _borrow(self, names: list[str]) -> None:
        """Take shared tensors from the source rather than compute them.

        The first time, before anything runs here: every shared tensor that an unshared node consumes, and the
        shared nodes count as run from then on. Later: shared tensors among `names` not kept here (a request for a
        tensor before the first change), while the source still has them.
        """
        if self._shared is None:
            self._shared = shared_tensors(self.graph, self._source.graph) if not self._done else set()
            self._shared -= set(self._values)  # the graph inputs are here already
            wanted = [
                t.name
                for n in self.graph.nodes
                if not _all_shared(n, self._shared)
                for t in n.inputs
                if isinstance(t, gs.Variable) and t.name in self._shared
            ]
            wanted += [t.name for t in self.graph.outputs if t.name in self._shared]
            if not wanted or not self._source.can_give(wanted):
                self._shared = set()
                return
            self._done |= {id(n) for n in self.graph.nodes if _all_shared(n, self._shared)}
        else:
            wanted = [n for n in names if n in self._shared and n not in self._values]
            if not wanted or not self._source.can_give(wanted):
                return
        wanted = list(dict.fromkeys(wanted))
        found = self._source.get(wanted)
        self._values.update({n: [b[n] for b in found] for n in wanted})
        self.borrowed += len(wanted)

    def can_give(self, names: list[str]) -> bool:
        """Whether `get(names)` would succeed: each is kept, or its producer has not run yet (nor been dropped)."""
        if self.replaying:
            return True
        producer = {t.name: n for n in self.graph.nodes for t in n.outputs}
        return all(n in self._values or (n in producer and id(producer[n]) not in self._done) for n in names)

    def _replay(self, names: list[str]) -> list[dict[str, np.ndarray]]:
        from onnxprune.calibration.runner import stream  # runner imports nothing from here; avoids a cycle at load

        self.runs += 1
        return list(stream(to_model(self.graph, self.template), self.data, list(names), batch_size=self.batch_size))

    def _advance(self, missing: list[str]) -> None:
        """Run, once per batch, the nodes not yet run that `missing` depends on; keep what is still needed."""
        producer = {t.name: n for n in self.graph.nodes for t in n.outputs}
        needed: set[int] = set()
        stack = list(missing)
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen or name in self._values:
                continue
            seen.add(name)
            node = producer.get(name)
            if node is None:
                if name not in {t.name for t in self.graph.tensors().values() if isinstance(t, gs.Constant)}:
                    raise KeyError(f"no node produces '{name}' and it is not a graph input")
                continue
            if id(node) in self._done or id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(t.name for t in node.inputs if isinstance(t, gs.Variable) and t.name)
        segment = [n for n in self.graph.nodes if id(n) in needed]
        if not segment:
            return
        inputs = {
            t.name: t
            for n in segment
            for t in n.inputs
            if isinstance(t, gs.Variable) and t.name and t.name in self._values
        }
        graph_outputs = {t.name for t in self.graph.outputs}
        outputs = {}
        for n in segment:
            for t in n.outputs:
                if not t.name:
                    continue
                later = any(id(c) not in needed and id(c) not in self._done for c in t.outputs)
                if t.name in missing or later or t.name in graph_outputs:
                    outputs[t.name] = t
        model = self._segment_model(segment, list(inputs), list(outputs))
        sess = session(model, calibration=True)
        self.runs += 1
        names = list(outputs)
        results: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for i in range(self._batches):
            outs = sess.run(names, {k: self._values[k][i] for k in inputs})
            for n, v in zip(names, outs, strict=True):
                results[n].append(v)
        self._values.update(results)
        self._done |= needed

    def _segment_model(self, nodes: list[gs.Node], inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
        """A model of `nodes` alone, fed the kept tensors `inputs` (typed from their values) and giving `outputs`."""
        tensors = {t.name: t for n in nodes for t in [*n.inputs, *n.outputs] if t.name}
        sub = gs.Graph(
            nodes=nodes,
            inputs=[tensors[n] for n in inputs],
            outputs=[tensors[n] for n in outputs],
            opset=self.graph.opset,
        )
        model = gs.export_onnx(sub, do_type_check=False)
        model.ir_version = max(self.template.ir_version, 4)
        del model.opset_import[:]
        model.opset_import.extend(self.template.opset_import)
        del model.graph.input[:]
        for k, name in enumerate(inputs):
            value = self._values[name][0]
            dims = [f"in{k}_d{i}" for i in range(value.ndim)]  # distinct: one name is one size to onnxruntime
            elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, dims))
        del model.graph.output[:]
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in outputs)
        del model.graph.value_info[:]
        return model

    def _forget(self, keep: set[str]) -> None:
        """Drop kept values that no node still to run consumes (graph outputs and `keep` stay)."""
        outputs = {t.name for t in self.graph.outputs}
        consumers = {t.name: t.outputs for n in self.graph.nodes for t in n.inputs if isinstance(t, gs.Variable)}
        for name in list(self._values):
            if name in keep or name in outputs:
                continue
            if all(id(c) in self._done for c in consumers.get(name, [])):
                del self._values[name]

    def _bytes(self) -> int:
        return sum(v.nbytes for values in self._values.values() for v in values)


def shared_tensors(graph: gs.Graph, other: gs.Graph) -> set[str]:
    """Names of the tensors `graph` computes exactly as `other` does, from the same graph inputs.

    A node's outputs are shared when `other` has a node of the same op and attributes producing the same output
    names, from the same inputs: graph inputs (same name), shared tensors, or constants of equal value.

    Args:
        graph: A graph (the pruned one).
        other: Another graph (the unpruned one).

    Returns:
        The shared tensor names (graph inputs included); empty when either carries a subgraph.
    """
    if _has_subgraphs(graph) or _has_subgraphs(other):
        return set()
    theirs = {t.name: n for n in other.nodes for t in n.outputs if t.name}
    shared = {t.name for t in graph.inputs} & {t.name for t in other.inputs}
    for node in graph.nodes:
        twin = theirs.get(node.outputs[0].name) if node.outputs else None
        if (
            twin is not None
            and twin.op == node.op
            and [t.name for t in twin.outputs] == [t.name for t in node.outputs]
            and len(twin.inputs) == len(node.inputs)
            and all(_same_input(a, b, shared) for a, b in zip(node.inputs, twin.inputs, strict=True))
            and _same_attrs(node.attrs, twin.attrs)
        ):
            shared.update(t.name for t in node.outputs if t.name)
    return shared


def _all_shared(node: gs.Node, shared: set[str]) -> bool:
    return bool(node.outputs) and all(not t.name or t.name in shared for t in node.outputs)


def _same_input(a: gs.Tensor, b: gs.Tensor, shared: set[str]) -> bool:
    if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        return isinstance(a, gs.Constant) and isinstance(b, gs.Constant) and _same_value(a.values, b.values)
    return a.name == b.name and (not a.name or a.name in shared)


def _same_value(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a is b or (a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b))


def _same_attrs(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if isinstance(x, gs.Constant) or isinstance(y, gs.Constant):
            if not (isinstance(x, gs.Constant) and isinstance(y, gs.Constant) and _same_value(x.values, y.values)):
                return False
        elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not _same_value(x, y):
                return False
        elif x != y:
            return False
    return True


def _has_subgraphs(graph: gs.Graph) -> bool:
    """Whether a node carries a subgraph (If/Loop/Scan): those read outer tensors no input edge names."""
    return any(isinstance(v, gs.Graph) for n in graph.nodes for v in n.attrs.values())
