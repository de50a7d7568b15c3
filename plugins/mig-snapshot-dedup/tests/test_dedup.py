"""The dedup backend: mig's snapshot-backend contract, pages shared across tags, space freed on delete."""

from __future__ import annotations

import numpy as np

from mig_core.testing.contracts import SnapshotBackendContract


class TestContract(SnapshotBackendContract):
    name = "dedup"
    distribution = "mig-snapshot-dedup"


def _stored(tmp_path) -> int:
    return sum(p.stat().st_blocks * 512 for p in (tmp_path / "store").rglob("*") if p.is_file())


def test_snapshots_share_pages_and_delete_frees_only_unshared(tmp_path):
    contract = TestContract()
    blocks = contract.machine(1)
    backend = contract.backend(tmp_path)
    contract._save(backend, "s0", blocks, b"")
    one = _stored(tmp_path)
    rng = np.random.default_rng(9)
    for i in range(1, 5):  # 1 % of the pages change between snapshots
        changed = rng.choice(blocks[0].npages, blocks[0].npages // 100, replace=False)
        blocks[0].pages[changed] = rng.integers(0, 256, (len(changed), 4096), dtype=np.uint8)
        contract._save(backend, f"s{i}", blocks, b"")
    five = _stored(tmp_path)
    assert five < one * 1.25, (one, five)  # about one image and 4 %, not five images
    infos = {s.tag: s for s in backend.list()}
    assert infos["s0"].size < one * 0.2  # most of s0's pages are shared with later tags
    backend.delete("s0")
    after = _stored(tmp_path)
    assert after < five  # the pages only s0 held are freed ...
    assert after > five - one * 0.2  # ... and nothing shared
    loaded, _ = contract._load(backend, "s4", 2)
    assert bytes(loaded[0].view) == bytes(blocks[0].view)
    backend.close()
    reopened = contract.backend(tmp_path)  # reference counts rebuilt from the tags
    assert [s.tag for s in reopened.list()] == ["s1", "s2", "s3", "s4"]
    loaded, _ = contract._load(reopened, "s1", 3)
    reopened.close()


def test_identical_pages_are_stored_once(tmp_path):
    contract = TestContract()
    blocks = contract.machine(1)
    for b in blocks:
        b.pages[:] = 5  # every page the same
    backend = contract.backend(tmp_path)
    contract._save(backend, "same", blocks, b"")
    assert (tmp_path / "store" / "pages-4096.pack").stat().st_blocks * 512 <= 4096 * 2
    loaded, _ = contract._load(backend, "same", 2)
    assert all(bytes(a.view) == bytes(b.view) for a, b in zip(blocks, loaded, strict=True))
    backend.close()


def _rewrite_slots(path, slots: np.ndarray, checksum: bool = True) -> None:
    import zstandard

    data = np.diff(slots, prepend=0).astype("<i8").tobytes()
    path.write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=checksum).compress(data))


def test_a_damaged_slot_list_is_refused_not_loaded_as_other_pages(tmp_path):
    """A tag's slot list that was damaged on disk, or names slots outside the store, makes the store refuse to
    open (ValueError, as for a bad option) with the file's name; it is never read as other pages or as zeros,
    and the failed open leaves the directory unlocked. The repaired store loads."""
    import pytest

    contract = TestContract()
    blocks = contract.machine(1)
    backend = contract.backend(tmp_path)
    contract._save(backend, "t", blocks, b"")
    backend.close()
    (slots_file,) = (tmp_path / "store").rglob("slots-0.zst")
    good = slots_file.read_bytes()
    import zstandard

    slots = np.cumsum(np.frombuffer(zstandard.ZstdDecompressor().decompress(good), dtype="<i8"))
    cases = [
        (good[:-6] + bytes(b ^ 0xFF for b in good[-6:]), "the slot list is damaged"),  # zstd's checksum
        (None, f"the slot list names slot {int(slots.max()) + 1000}, but pages-4096.pack holds"),
        (None, "the slot list names slot -5"),
    ]
    for data, error in cases:
        if data is not None:
            slots_file.write_bytes(data)
        elif "-5" in error:
            bad = slots.copy()
            bad[3] = -5
            _rewrite_slots(slots_file, bad)
        else:
            bad = slots.copy()
            bad[7] = int(slots.max()) + 1000
            _rewrite_slots(slots_file, bad)
        with pytest.raises(ValueError, match=error) as e:
            contract.backend(tmp_path)
        assert str(slots_file) in str(e.value)
    slots_file.write_bytes(good)
    backend = contract.backend(tmp_path)
    loaded, _ = contract._load(backend, "t", 2)
    assert bytes(loaded[0].view) == bytes(blocks[0].view)
    backend.close()
