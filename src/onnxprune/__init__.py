"""onnxprune: post-training structured pruning of ONNX models, without a training framework."""

from onnxprune.api import DEFAULTS, prune
from onnxprune.errors import (
    BudgetError,
    CalibrationError,
    GuardError,
    InvalidModelError,
    OnnxPruneError,
    PassError,
    PruneBug,
    UnsupportedModelError,
)
from onnxprune.pipeline import decompose
from onnxprune.result import PassResult, Report

__all__ = [
    "DEFAULTS",
    "BudgetError",
    "CalibrationError",
    "GuardError",
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
