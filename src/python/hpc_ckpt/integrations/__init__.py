"""Framework callbacks: ``hpc_ckpt.integrations.hf`` (transformers.Trainer) and
``hpc_ckpt.integrations.lightning`` (Lightning). Import the one you use; each imports its
framework, nothing else here does."""
