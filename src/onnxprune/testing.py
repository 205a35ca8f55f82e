"""Helpers for tests and benchmarks: run in onnxruntime, random feeds, apply a pass, mask channels, compare."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.calibration.data import batch_axes, model_inputs
from onnxprune.graph import session, to_graph, to_model
from onnxprune.passes.groups import ChannelGraph, find_channel_groups
from onnxprune.result import PassResult, Report
from onnxprune.rules import Kind, const


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name, from the CPU provider with every graph optimisation off."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def random_feeds(
    model: onnx.ModelProto, *, batch: int = 2, seed: int = 0, dims: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Normal random data for every graph input: `batch` samples on a symbolic batch axis, others from `dims` or 8.

    The batch axis is the first, or the one `batch_axes` names (a recurrent state ``[layers, batch, hidden]``).
    """
    rng = np.random.default_rng(seed)
    symbols = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    axes = batch_axes(model)
    feeds = {}
    for name, (known, dtype) in model_inputs(model).items():
        shape = [
            d if d is not None else batch if i == axes[name] else (dims or {}).get(symbols[name][i], 8)
            for i, d in enumerate(known)
        ]
        feeds[name] = rng.standard_normal(shape).astype(dtype or np.float32)
    return feeds


def apply_pass(model: onnx.ModelProto, pass_fn: Callable[..., PassResult], **options) -> tuple[onnx.ModelProto, Report]:
    """Import, run one pass with `options`, export: the model-level view tests use."""
    graph = to_graph(model)
    result = pass_fn(graph, **options)
    return to_model(result.graph, model), result.report


def assert_outputs_close(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], *, rtol: float, atol: float
) -> None:
    """Every output of `expected` is in `actual` with the same shape and close values; names the worst one."""
    for name, want in expected.items():
        assert name in actual, f"output {name!r} is missing"
        got = actual[name]
        assert got.shape == want.shape, f"output {name!r}: shape {got.shape} != {want.shape}"
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        bound = atol + rtol * np.abs(want.astype(np.float64))
        if not np.all(diff <= bound):
            raise AssertionError(f"output {name!r}: max abs diff {diff.max():.3g} (tolerance atol={atol}, rtol={rtol})")


def every_other_channel(analysis: ChannelGraph) -> dict[str, np.ndarray]:
    """A plan that removes every other removable channel of every group (and keeps at least one)."""
    plan = {}
    for group in analysis.groups:
        removable = set(group.removable.tolist())
        gone = [i for i, c in enumerate(group.classes) if c in removable][1::2]
        if gone and len(gone) < len(group.classes):
            plan[group.name] = np.setdiff1d(np.arange(len(group.classes)), gone)
    return plan


def mask_channels(model: onnx.ModelProto, plan: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The same model with the planned channels zeroed instead of removed: what removal must equal.

    The producers' filters and biases of removed channels are zeroed. Where a consumer cannot take the constant
    a removed channel still carries into its bias (a padded Conv after a Sigmoid, say), removal means that
    consumer no longer sees the channel: its input slice is zeroed too.
    """
    graph = to_graph(model)
    analysis = find_channel_groups(graph)
    alive = analysis.alive(plan)
    nodes = {n.name: n for n in graph.nodes}
    masked: dict[str, list[gs.Constant]] = {}  # a shared weight masked alike for every use stays one tensor
    for name, step in analysis.steps.items():
        if step.kind is not Kind.PRODUCER:
            continue
        node = nodes[name]
        unfoldable = False
        if step.fold is not None:  # the same judgement remove_channels makes, on the removed positions
            flow = analysis.flows[step.fold.tensor]
            values = flow.zero[~alive[analysis.class_of[flow.ids]]]
            unfoldable = bool(np.any(values != 0)) and (step.fold.apply is None or not np.all(np.isfinite(values)))
        for ps in step.params:
            if ps.index >= len(node.inputs) or const(node.inputs[ps.index]) is None:
                continue
            values = const(node.inputs[ps.index]).copy()
            for axis, tensor in ps.axes:
                is_out = tensor in {t.name for t in node.outputs}
                gone = np.flatnonzero(~alive[analysis.classes(tensor)])
                at = ps.positions(values.shape[axis], len(analysis.flows[tensor].ids), gone) if values.ndim else None
                if not (is_out or unfoldable) or at is None:
                    continue
                index = [slice(None)] * values.ndim
                index[axis] = at
                values[tuple(index)] = 0
            original = node.inputs[ps.index].name
            done = masked.setdefault(original, [])
            same = next((c for c in done if np.array_equal(c.values, values)), None)
            if same is None:
                same = gs.Constant(f"{original}/masked{len(done) or ''}", values)
                done.append(same)
            node.inputs[ps.index] = same
    for name, step in analysis.steps.items():  # normalisations that removal changes: statistics over kept channels
        node = nodes[name]
        if step.approximate and node.inputs[0].name in analysis.flows:
            kept = alive[analysis.classes(node.inputs[0].name)]
            if not kept.all():
                _kept_statistics_layer_norm(graph, node, kept)
    graph.cleanup().toposort()
    return to_model(graph, model)


def _kept_statistics_layer_norm(graph: gs.Graph, node: gs.Node, kept: np.ndarray) -> None:
    """Replace a LayerNormalization over the channel axis by its value once the removed channels are gone.

    Mean and variance over the kept channels only, and 0 at the removed ones.
    """
    x, y = node.inputs[0], node.outputs[0]
    dtype = const(node.inputs[1]).dtype
    m = kept.astype(dtype)
    scale = const(node.inputs[1]) * m
    bias = (const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros_like(scale)) * m
    c = {
        key: gs.Constant(f"{node.name}/kept/{key}", value)
        for key, value in {
            "m": m,
            "scale": scale,
            "bias": bias,
            "k": np.array(m.sum(), dtype),
            "eps": np.array(node.attrs.get("epsilon", 1e-5), dtype),
            "axes": np.array([-1], np.int64),
        }.items()
    }
    node.outputs.clear()

    def op(kind, *inputs, **attrs):
        name = f"{node.name}/kept/{kind}_{len(graph.nodes)}"
        return graph.layer(op=kind, inputs=list(inputs), outputs=[name], attrs=attrs)[0]

    mean = op("Div", op("ReduceSum", op("Mul", x, c["m"]), c["axes"], keepdims=1), c["k"])
    d = op("Mul", op("Sub", x, mean), c["m"])
    var = op("Div", op("ReduceSum", op("Mul", d, d), c["axes"], keepdims=1), c["k"])
    out = op("Add", op("Mul", op("Div", d, op("Sqrt", op("Add", var, c["eps"]))), c["scale"]), c["bias"])
    last = out.inputs[0]
    last.outputs.clear()
    last.outputs.append(y)
    node.inputs.clear()


def report_schema() -> dict:
    """The JSON Schema of `--report` documents (``report.schema.json``, shipped in the package)."""
    import importlib.resources
    import json

    return json.loads((importlib.resources.files("onnxprune") / "report.schema.json").read_text())


def validate_report(doc: dict) -> None:
    """Check a report document (`Report.to_dict`, or a `--report` file read back) against `report_schema`.

    Raises:
        jsonschema.ValidationError: The document does not follow the schema (jsonschema: the ``test`` extra).
    """
    from jsonschema import Draft202012Validator

    Draft202012Validator(report_schema()).validate(doc)


def summary_item(stdout: str, label: str) -> str:
    """The summary's item `label` (``chosen``, ``speed``...): its line and the lines that go on it, joined by newlines.

    Raises:
        StopIteration: The summary has no such item.
    """
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {label}  "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" " * 10)), len(lines))
    return "\n".join(lines[start:end])
