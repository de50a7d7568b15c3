"""COLO's output comparison (QEMU's colo-compare) as a ``mig_core.replication`` plugin named ``colo``."""

from mig_colo.compare import ColoCompare

__all__ = ["ColoCompare"]
