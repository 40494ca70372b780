"""hpc_ckpt: complete, pickle-free PyTorch checkpoints through ``hpc-ckpt`` (the child protocol).

    import hpc_ckpt
    ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, scheduler=sched, every_steps=100)
    start = ck.restore()
    for step in range(start, total):
        ...
        ck.step_done(step + 1, metrics={"loss": loss})
        if ck.should_stop():
            break
    ck.finish()

Multi-rank jobs (``hpc-ckpt wrap --ranks N``): rank 0 saves the replicated state, every rank its
RNG, data position and optimizer shard; ranks agree on the stop step through torch.distributed.
Sharded models (FSDP2, DTensor) are saved through torch.distributed.checkpoint and resume on
another number of ranks (``hpc_ckpt.sharded``).

Integrations: ``hpc_ckpt.integrations.hf.HpcCkptCallback`` (transformers.Trainer) and
``hpc_ckpt.integrations.lightning.HpcCkptCallback`` (Lightning). torch and the frameworks are
imported only when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpointer import FORMAT, Checkpointer
from .data import ResumableLoader
from .errors import (CheckpointError, CommitError, ConfigMismatchError, IncompatibleCheckpointError,
                     NotSerializableError, ProtocolError, ReferenceMismatchError)
from .protocol import Environment
from .ranks import StopAgreement
from .session import Session
from .state import seed_all

__all__ = [
    "Checkpointer", "ResumableLoader", "Session", "Environment", "FORMAT", "seed_all", "StopAgreement",
    "CheckpointError", "CommitError", "ConfigMismatchError", "IncompatibleCheckpointError",
    "NotSerializableError", "ProtocolError", "ReferenceMismatchError", "__version__",
]
