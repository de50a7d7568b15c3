"""Block nodes: files host software writes through mig, so named dirty bitmaps can track the writes."""

from mig_core.block.bitmap import DirtyBitmap
from mig_core.block.node import BlockNode

__all__ = ["BlockNode", "DirtyBitmap"]
