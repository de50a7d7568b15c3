"""Coverage-guided fuzzing of the same decoders with atheris (libFuzzer over Python's coverage).

``make fuzz`` runs it after the hypothesis fuzzers, every decoder in turn (``all``), or one:
``python tests/fuzz/coverage_guided.py TARGET|all [libFuzzer flags, e.g. -runs=100000]``. Each target runs the
very property its hypothesis test checks (the test's own body), starting from the valid encoding the
test mutates; mig_core is instrumented, so libFuzzer keeps the inputs that reach new code. Anything
but the decoder's documented refusal (a crash), an input that breaks the test's invariant (a wrong
acceptance) or one that runs over 10 s (a hang) stops the run with the input saved as ``crash-*``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

HERE = Path(__file__).parent

with atheris.instrument_imports(include=["mig_core"]):
    spec = importlib.util.spec_from_file_location("fuzz_decoders", HERE / "test_fuzz_decoders.py")
    assert spec is not None and spec.loader is not None
    d = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(d)


def _body(test: Callable[..., None]) -> Callable[..., None]:
    """The undecorated body of a hypothesis test: the property itself."""
    return test.hypothesis.inner_test  # type: ignore[attr-defined, no-any-return]


def _one_bit(data: bytes) -> None:
    if len(data) >= 4:
        _body(d.test_a_checksummed_stream_never_accepts_a_flipped_bit)(
            bit=int.from_bytes(data[:4], "little") % (len(d.CHECKED_STREAM) * 8))


#: name -> (seed input, what one input is checked with)
TARGETS: dict[str, tuple[bytes, Callable[[bytes], None]]] = {
    "stream_reader": (d.STREAM, lambda b: _body(d.test_stream_reader)(data=b)),
    "checksummed_stream": (b"\0\0\0\0", _one_bit),
    "multifd_packet": (d.PACKET_OK, lambda b: _body(d.test_multifd_packet)(data=b)),
    "xbzrle_decode": (d.XBZRLE, lambda b: _body(d.test_xbzrle_decode)(data=b)),
    "mapped_ram_header": (d.MAPPED_RAM, lambda b: _body(d.test_mapped_ram_header)(data=b)),
    "unpopulated_runs": (d.UNPOPULATED, lambda b: _body(d.test_unpopulated_runs)(data=b)),
    "postcopy_discard": (d.DISCARD, lambda b: _body(d.test_postcopy_discard)(data=b)),
    "device_state_section": (b"\2" + d.DEVICE_STATE,
                             lambda b: _body(d.test_device_state_section)(data=b[1:], version=b[0] % 4 if b else 0)),
    "device_state_buffer": (d._DEVICES.save_to_buffer(), lambda b: _body(d.test_device_state_buffer)(data=b)),
    "dirty_bitmap_section": (d.DIRTY_BITMAPS, lambda b: _body(d.test_dirty_bitmap_section)(data=b)),
    "block_data_records": (d.BLOCK_RECORDS, lambda b: _body(d.test_block_data_records)(data=b)),
    "qmp_framing": (b"\7" + d.QMP_TEXT * 3,
                    lambda b: _body(d.test_qmp_framing)(data=b[1:], split=1 + (b[0] % 64) if b else 1)),
}


def run_all(flags: list[str]) -> int:
    """Each target in a process of its own (libFuzzer runs one per process); a line per target."""
    failed = 0
    for name in TARGETS:
        done = subprocess.run([sys.executable, __file__, name, *flags], capture_output=True, text=True)
        runs = re.findall(r"Done (\d+) runs in (\d+) second", done.stderr)
        summary = f"{runs[-1][0]} runs in {runs[-1][1]} s" if runs else "no summary"
        print(f"  {name}: {summary}, {'ok' if done.returncode == 0 else 'FAILED'}", flush=True)
        if done.returncode:
            failed += 1
            print(done.stderr[-4000:], file=sys.stderr)
    return failed


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[1] == "all":
        sys.exit(1 if run_all(argv[2:]) else 0)
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} TARGET|all [libFuzzer flags]; targets: {', '.join(TARGETS)}")
    from mig_core.logconfig import configure_logging  # (after the instrumented imports above)

    configure_logging(level=os.environ.get("MIG_LOG_LEVEL", "error"))  # the decoders' refusals are no news here
    seed, check = TARGETS[argv[1]]
    corpus = Path(tempfile.mkdtemp(prefix=f"mig-fuzz-{argv[1]}-"))
    (corpus / "valid").write_bytes(seed)
    atheris.Setup([argv[0], str(corpus), "-timeout=10", *argv[2:]], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
