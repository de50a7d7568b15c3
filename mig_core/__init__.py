"""mig: live migration, checkpointing and replication of a running program's state."""

__version__ = "0.1.0"
