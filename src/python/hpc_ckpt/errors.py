"""Exceptions raised by hpc_ckpt. All derive from :class:`CheckpointError`."""

from __future__ import annotations

from typing import Any, Dict, Tuple


class CheckpointError(RuntimeError):
    """Base class of every error hpc_ckpt raises on purpose."""


class NotSerializableError(CheckpointError, TypeError):
    """A piece of state is neither a tensor nor JSON-able (hpc_ckpt never pickles).

    ``key`` names where it was found, e.g. ``scheduler.lr_lambdas[0].fn``.
    """

    def __init__(self, key: str, value: object, hint: str = "") -> None:
        self.key = key
        msg = (f"{key}: {type(value).__module__}.{type(value).__qualname__} is not JSON-able "
               f"and not a tensor; hpc_ckpt stores state as safetensors + JSON, never pickle")
        super().__init__(msg + (f" ({hint})" if hint else ""))


class CommitError(CheckpointError):
    """The supervisor (or ``hpc-ckpt commit``) refused or failed to commit a checkpoint."""

    def __init__(self, step: int, message: str) -> None:
        self.step = step
        super().__init__(f"checkpoint at step {step} was not committed: {message}")


class ProtocolError(CheckpointError):
    """The environment does not allow checkpointing (bad paths, no binary, a dead supervisor)."""


class ConfigMismatchError(CheckpointError):
    """The checkpoint was made with another ``config``; ``changed`` maps key -> (saved, now)."""

    def __init__(self, checkpoint: str, changed: Dict[str, Tuple[Any, Any]]) -> None:
        self.changed = changed
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        super().__init__(f"{checkpoint} was made with another config ({lines}); pass "
                         f"allow_config_change=True (or list the keys in mutable_config) to resume anyway")


class ReferenceMismatchError(CheckpointError):
    """The reference batch's loss recomputed after a load differs from the stored one."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint does not fit the objects it is loaded into (missing file, keys, shapes)."""
