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
    """

    def __init__(
        self,
        graph: gs.Graph,
        template: onnx.ModelProto,
        data: Samples | dict[str, np.ndarray],
        *,
        batch_size: int = 32,
        cache_bytes: int = CACHE_BYTES,
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
        missing = [n for n in dict.fromkeys(names) if n not in self._values]
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


def _has_subgraphs(graph: gs.Graph) -> bool:
    """Whether a node carries a subgraph (If/Loop/Scan): those read outer tensors no input edge names."""
    return any(isinstance(v, gs.Graph) for n in graph.nodes for v in n.attrs.values())
