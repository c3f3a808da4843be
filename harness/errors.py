"""One error hierarchy for teelab: every user-facing error has a stable code and a hint.

Subclasses declare ``code`` (``E<number>``), ``title`` and ``explanation``; they register themselves so
that ``teelab explain CODE`` can describe any of them. Code ranges: E1xx config and CLI, E2xx host,
E3xx VM specs, E4xx QEMU processes, E5xx images, E6xx guest agent, E7xx vsock, E8xx attestation, E9xx enclaves
and TEE devices, E10xx KMS.
"""

from __future__ import annotations

from typing import Any, ClassVar

REGISTRY: dict[str, type[LabError]] = {}


class LabError(Exception):
    """Root of all teelab errors. ``hint`` says what to change; ``evidence`` keeps what was seen."""

    code: ClassVar[str] = "E100"
    title: ClassVar[str] = "teelab error"
    explanation: ClassVar[str] = "An error inside teelab."
    exit_status: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None, **evidence: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.evidence = evidence

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            other = REGISTRY.get(cls.code)
            if other is not None and other.__qualname__ != cls.__qualname__:
                raise TypeError(f"error code {cls.code} used by {other.__qualname__} and {cls.__qualname__}")
            REGISTRY[cls.code] = cls

    def __str__(self) -> str:
        text = f"[ {self.code} ] {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view for ``--json`` output."""
        return {
            "code": self.code,
            "title": self.title,
            "message": self.message,
            "hint": self.hint,
            "evidence": {k: _jsonable(v) for k, v in self.evidence.items()},
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


REGISTRY[LabError.code] = LabError


class ConfigError(LabError):
    code = "E101"
    title = "bad configuration"
    explanation = "A setting in teelab.toml, the environment or the command line has an invalid value."
    exit_status = 2


class UsageError(LabError):
    code = "E102"
    title = "bad command-line usage"
    explanation = "A command was given arguments it cannot use."
    exit_status = 2


class InputFileError(LabError):
    code = "E103"
    title = "input file unreadable"
    explanation = (
        "A file named on the command line or in a setting is missing, is a directory, cannot be read, or is "
        "not the text (UTF-8) it must be."
    )
    exit_status = 2


class OutputPathError(LabError):
    code = "E104"
    title = "output path unusable"
    explanation = (
        "A file or directory teelab was told to write is a directory where a file is wanted (or the "
        "reverse), sits in a directory that does not exist, or cannot be written."
    )
    exit_status = 2


def explain(code: str) -> type[LabError] | None:
    """The error class registered under ``code`` (``E301`` or ``301``), or None."""
    code = code.upper()
    if not code.startswith("E"):
        code = "E" + code
    return REGISTRY.get(code)
