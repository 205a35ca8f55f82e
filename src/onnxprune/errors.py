"""The errors onnxprune raises on purpose. Each message is one line a person can act on."""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base of every error meant for the user: the CLI prints its message and exits 2."""


class InvalidModelError(OnnxPruneError):
    """The input is not a readable, valid ONNX model."""


class UnsupportedModelError(OnnxPruneError):
    """The model is valid ONNX but holds something onnxprune cannot handle."""


class CalibrationError(OnnxPruneError):
    """Calibration data is missing, unreadable or does not match the model's inputs."""


class BudgetError(OnnxPruneError):
    """The requested removal cannot be reached (everything that could go is gone or blocked).

    Attributes:
        reachable: The largest share that can be removed this way, when it is known; else None.
        head: The message without the suggestions of what to try instead.
        blocked: Group name -> why its channels cannot be removed (``onnxprune -v`` lists them under the error).
    """

    def __init__(
        self,
        message: str,
        *,
        reachable: float | None = None,
        head: str | None = None,
        blocked: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.reachable = reachable
        self.head = head if head is not None else message
        self.blocked = dict(blocked or {})


class PruneBug(Exception):
    """A bug in onnxprune, not a problem with the input: the CLI says "internal error" and exits 3."""


class PassError(PruneBug):
    """A pass failed unexpectedly (a bug); the message names the pass and the ones that ran before it."""


class GuardError(Exception):
    """The pruned model measured as broken on the user's held-out samples; nothing was written (the CLI exits 1).

    Not an `OnnxPruneError`: the input was fine, the result is what failed the check the user (by default) asked for.

    Attributes:
        report: The report of the refused result (its ``guard`` entry says what was measured), or None.
    """

    def __init__(self, message: str, report=None) -> None:
        super().__init__(message)
        self.report = report
