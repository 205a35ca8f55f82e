"""What a pass returns: the graph it edited, whether it changed, and a report that merges."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

SCHEMA_VERSION = 1  # of `Report.to_dict`; raise it on a change that breaks a reader of report.schema.json


@dataclass(frozen=True)
class Skip:
    """A node (or group) a pass left alone, and why."""

    node: str
    reason: str


@dataclass
class Report:
    """Counts, skipped nodes, per-layer changes and free-form facts; `merge` adds another report in."""

    counts: Counter = field(default_factory=Counter)
    skipped: list[Skip] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def skip(self, node: gs.Node | str, reason: str) -> None:
        """Record that `node` was left alone because of `reason`.

        Args:
            node: The node, or the name of a node or group.
            reason: Why, in one line.
        """
        self.skipped.append(Skip(node if isinstance(node, str) else node.name, reason))

    def merge(self, other: Report) -> Report:
        """Add `other` into this report, in place, and return self.

        Counts add up, skipped entries are appended, per-layer changes are updated layer by layer, and facts are
        replaced key by key, except ``"kept"`` (tensor -> kept indices): for a tensor both reports shrink, the kept
        indices become ``first[second]`` (`other`'s selection indexes this report's).

        Args:
            other: The report to add; not modified.

        Returns:
            This report.
        """
        self.counts.update(other.counts)
        self.skipped.extend(other.skipped)
        for name, change in other.layers.items():
            self.layers.setdefault(name, {}).update(change)
        for key, value in other.facts.items():
            if key == "kept":  # a tensor shrunk twice keeps the second selection of the first
                kept = self.facts.setdefault("kept", {})
                for name, keep in value.items():
                    kept[name] = kept[name][keep] if name in kept else keep
            else:
                self.facts[key] = value
        return self

    def to_dict(self, input_path: str | None = None, output_path: str | None = None) -> dict[str, Any]:
        """The report as the JSON document ``--report`` writes (src/onnxprune/report.schema.json).

        Args:
            input_path: The pruned model's file, when it came from one.
            output_path: Where the result was written (None: not written, e.g. the guard refused it).

        Returns:
            Plain Python values only (numpy arrays and scalars converted): ``json.dumps`` takes it as it is.
        """
        doc = {"schema_version": SCHEMA_VERSION, **self.facts}
        doc["input"], doc["output"] = input_path, output_path
        doc["layers"] = [{"name": k, **v} for k, v in self.layers.items()]
        doc["skipped"] = [{"node": s.node, "reason": s.reason} for s in self.skipped]
        doc["counts"] = dict(self.counts)
        return _plain(doc)


def _plain(value: Any) -> Any:
    """`value` with numpy arrays, scalars and tuples made lists and Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class PassResult:
    """The graph a pass edited in place, whether it changed, and what it did."""

    graph: gs.Graph
    modified: bool
    report: Report
