"""What a pass returns: the graph it edited, whether it changed, and a report that merges."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx_graphsurgeon as gs


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
        """Record that `node` was left alone because of `reason`."""
        self.skipped.append(Skip(node if isinstance(node, str) else node.name, reason))

    def merge(self, other: Report) -> Report:
        """Add `other` into this report, in place, and return self."""
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


@dataclass
class PassResult:
    """The graph a pass edited in place, whether it changed, and what it did."""

    graph: gs.Graph
    modified: bool
    report: Report
