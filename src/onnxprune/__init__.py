"""onnxprune: post-training structured pruning of ONNX models, without a training framework."""

from onnxprune.errors import (
    BudgetError,
    CalibrationError,
    InvalidModelError,
    OnnxPruneError,
    PassError,
    PruneBug,
    UnsupportedModelError,
)
from onnxprune.pipeline import decompose, prune
from onnxprune.result import PassResult, Report

__all__ = [
    "BudgetError",
    "CalibrationError",
    "InvalidModelError",
    "OnnxPruneError",
    "PassError",
    "PassResult",
    "PruneBug",
    "Report",
    "UnsupportedModelError",
    "decompose",
    "prune",
]
