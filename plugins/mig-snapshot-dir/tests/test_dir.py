"""The dir backend: mig's snapshot-backend contract, and its image layout (sparse, RAM at fixed offsets)."""

from __future__ import annotations

import os

from mig_core.testing.contracts import SnapshotBackendContract


class TestContract(SnapshotBackendContract):
    name = "dir"
    distribution = "mig-snapshot-dir"


def test_image_is_sparse_with_pages_at_fixed_offsets(tmp_path):
    contract = TestContract()
    blocks = contract.machine(1)
    backend = contract.backend(tmp_path)
    contract._save(backend, "t", blocks, b"")
    image = next((tmp_path / "store" / "tags").glob("t-*")) / "ram.img"
    data = image.read_bytes()
    assert data[:len(blocks[0].view)] == bytes(blocks[0].view)
    assert data[4 << 20:(4 << 20) + len(blocks[1].view)] == bytes(blocks[1].view)  # 1 MiB-aligned region
    # zero pages are holes: the image takes about the non-zero half of RAM
    assert os.stat(image).st_blocks * 512 < (5 << 20) * 0.6
    backend.close()
