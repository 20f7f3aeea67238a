"""The error hierarchy. Every message says what went wrong, where, and how to fix it."""
from __future__ import annotations

__all__ = [
    "FracpassError",
    "PlanError",
    "TraceError",
    "PassError",
    "PreconditionError",
    "PostconditionError",
    "RegistryError",
    "ExportError",
]


class FracpassError(Exception):
    """Base class of every error fracpass raises on purpose."""


class PlanError(FracpassError, ValueError):
    """A precision plan is malformed or does not fit the model it is applied to."""


class TraceError(FracpassError):
    """Neither torch.fx nor torch.export could capture the model."""


class PassError(FracpassError):
    """A pass failed; the message names the pass and, where known, the node."""


class PreconditionError(PassError):
    """A pass's `requires` check failed before it ran."""


class PostconditionError(PassError):
    """A pass's `ensures` check failed after it ran."""


class RegistryError(PassError):
    """An op the pipeline needs a rule for has none in the op registry."""


class ExportError(FracpassError):
    """The transformed model cannot be exported as asked."""
