"""The dir backend: mig's snapshot-backend contract, and its image layout (sparse, RAM at fixed offsets)."""

from __future__ import annotations

import os

from mig_core.testing.contracts import SnapshotBackendContract


class TestContract(SnapshotBackendContract):
    name = "dir"
    distribution = "mig-snapshot-dir"


def _saved(tmp_path):
    """A backend in ``tmp_path`` holding the tag ``t`` of the contract's machine: (contract, blocks, backend, the
    tag's directory)."""
    contract = TestContract()
    blocks = contract.machine(1)
    backend = contract.backend(tmp_path)
    contract._save(backend, "t", blocks, b"")
    return contract, blocks, backend, next((tmp_path / "store" / "tags").glob("t-*"))


def test_image_is_sparse_with_pages_at_fixed_offsets(tmp_path):
    _, blocks, backend, tag = _saved(tmp_path)
    image = tag / "ram.img"
    data = image.read_bytes()
    assert data[:len(blocks[0].view)] == bytes(blocks[0].view)
    assert data[4 << 20:(4 << 20) + len(blocks[1].view)] == bytes(blocks[1].view)  # 1 MiB-aligned region
    # zero pages are holes: the image takes about the non-zero half of RAM
    assert os.stat(image).st_blocks * 512 < (5 << 20) * 0.6
    backend.close()


def test_a_tag_cut_short_is_refused_and_leaves_no_descriptor_open(tmp_path):
    """A tag whose stored-pages bitmap was cut short is refused with the file's name, and the refusal leaves no
    descriptor of the image behind; the tag loads again once the bitmap is whole."""
    import pytest

    contract, blocks, backend, tag = _saved(tmp_path)
    bits = tag / "stored.bits"
    whole = bits.read_bytes()
    bits.write_bytes(whole[:1])
    image = os.path.realpath(bits.parent / "ram.img")

    def image_descriptors() -> int:
        fds = "/proc/self/fd"
        return sum(1 for fd in os.listdir(fds) if os.path.realpath(os.path.join(fds, fd)) == image)

    with pytest.raises(OSError, match="stored.bits: cut short"):
        backend.open("t")
    assert image_descriptors() == 0
    bits.write_bytes(whole)
    loaded, _ = contract._load(backend, "t", 2)
    assert bytes(loaded[0].view) == bytes(blocks[0].view)
    backend.close()
