"""``mig report``: flight records of real migrations rendered as one HTML page with inline SVG plots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from mig_core.testing import connect, wait_for_status

WL = ("--ram", "32M", "--ram-fill", "random", "--vcpus", "2")
SVG = "{http://www.w3.org/2000/svg}"


def mig(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mig_core", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, MIG_LOG_LEVEL="warning"))


async def migrate_recorded(start_host, tmp_path, name: str, caps: tuple[str, ...], rate: str) -> dict:
    """One migration whose source records into ``tmp_path/name``; query-migrate's final reply."""
    src = await connect(start_host(*WL, "--dirty-rate", rate, "--flight-dir", str(tmp_path / name),
                                   name=f"{name}-src").sock)
    dst = await connect(start_host(*WL, "--dirty-rate", rate, "--incoming", "defer", name=f"{name}-dst").sock)
    await src.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": c, "state": True} for c in caps]})
    # at most 8 MB/s: the 32 MiB take four seconds at least, so passes and seconds are recorded on any machine
    await src.execute("migrate-set-parameters", {"max-bandwidth": 8_000_000, "cpu-throttle-initial": 50})
    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/{name}.sock"})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/{name}.sock"})
    final = await wait_for_status(src, {"completed", "failed"}, timeout=120)
    assert final["status"] == "completed", final
    (tmp_path / f"{name}.json").write_text(json.dumps(await src.execute("x-query-migration-record")))
    await src.disconnect()
    await dst.disconnect()
    return final


def svgs(page: str) -> list[ET.Element]:
    """Every inline <svg> of the page, parsed as XML (the page must hold well-formed SVG)."""
    out = []
    pos = 0
    while (start := page.find("<svg", pos)) >= 0:
        end = page.index("</svg>", start) + len("</svg>")
        out.append(ET.fromstring(page[start:end]))
        pos = end
    return out


def ids(elements: list[ET.Element]) -> set[str]:
    return {e.get("id") for svg in elements for e in svg.iter() if e.get("id")}


def series_of(elements: list[ET.Element], plot: str) -> set[str]:
    """The series one plot holds: the ids mig gave (``r<N>-…``, ``compare-…``) inside the plot's group
    (matplotlib names every other element of its own)."""
    prefix = plot.split("-plot")[0] + "-"
    for svg in elements:
        for g in svg.iter(f"{SVG}g"):
            if g.get("id") == plot:
                return {i for e in g.iter() if (i := e.get("id")) and i != plot and i.startswith(prefix)}
    raise AssertionError(f"no plot {plot}")


async def test_report_of_one_and_of_several_records(start_host, tmp_path):
    plain = await migrate_recorded(start_host, tmp_path, "plain", ("return-path",), "1M")
    await migrate_recorded(start_host, tmp_path, "throttled", ("return-path", "auto-converge"), "12M")
    [plain_rec] = (tmp_path / "plain").glob("*-source.jsonl")
    [throttled_rec] = (tmp_path / "throttled").glob("*-source.jsonl")

    records = [json.loads(line) for line in plain_rec.read_text().splitlines()]
    start = records[0]
    assert start["kind"] == "start" and start["side"] == "source"
    assert start["max-bandwidth"] == 8_000_000 and start["downtime-limit"] == 300
    assert "return-path" in start["capabilities"]
    [switch] = [r for r in records if r["kind"] == "switchover"]
    assert switch["status"] == "active" and switch["remaining"] >= 0  # the machine has just stopped
    assert [r["pass"] for r in records if r["kind"] == "pass"] == list(range(1, plain["ram"]["dirty-sync-count"] + 1))

    one = tmp_path / "one.html"
    out = mig("report", str(plain_rec), "-o", str(one))
    assert out.returncode == 0, out.stderr
    page = one.read_text()
    # nothing to fetch: no script, stylesheet, image or link outside the page (namespace names are not fetched)
    assert not re.search(r'(src|href)="(https?:)?//|@import|<script|<link', page)
    parsed = svgs(page)
    assert len(parsed) == 1 and "compare-plot" not in ids(parsed)  # one record: no side-by-side plot
    assert series_of(parsed, "r0-plot-passes") == {"r0-bandwidth", "r0-dirty-rate"}
    assert {"r0-remaining", "r0-budget", "r0-switchover"} <= series_of(parsed, "r0-plot-remaining")
    assert series_of(parsed, "r0-plot-throttle") == {"r0-throttle"}
    assert "Switchover at" in page and "downtime-limit 300 ms" in page

    several = tmp_path / "several.html"
    # the throttled one as x-query-migration-record's JSON list, the plain one as JSON lines
    out = mig("report", str(plain_rec), str(tmp_path / "throttled.json"), "-o", str(several), "--title", "two runs")
    assert out.returncode == 0, out.stderr
    page = several.read_text()
    parsed = svgs(page)
    assert len(parsed) == 3 and "<title>two runs</title>" in page
    assert series_of(parsed, "compare-plot") == {"compare-0", "compare-1"}
    for i in (0, 1):
        assert {f"r{i}-plot-passes", f"r{i}-plot-remaining", f"r{i}-plot-throttle"} <= ids(parsed)
    # auto-converge stepped the throttle: the second record's throttle plot has steps above 0
    throttled = [json.loads(line) for line in throttled_rec.read_text().splitlines()]
    assert any(r.get("cpu-throttle-percentage") for r in throttled)
    assert "auto-converge" in page

    # a writer that died mid-line: the whole records before the cut are reported, with a warning
    text = plain_rec.read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text[:text.rstrip("\n").rindex("\n") + 20])
    out = mig("report", str(cut), "-o", str(tmp_path / "cut.html"))
    assert out.returncode == 0, out.stderr
    assert "flight_record_cut_short" in out.stderr and f"records={len(records) - 1}" in out.stderr
    assert "r0-plot-passes" in ids(svgs((tmp_path / "cut.html").read_text()))


NOT_A_RECORD = "not a flight record (each record needs 'kind' and 'ms')"


@pytest.mark.parametrize(("text", "error"), [
    ('{"a": 1}\n', NOT_A_RECORD),
    ("not json\n", "not JSON lines nor a JSON list: line 1: "),
    # only a last line without its newline counts as cut short: a bad line before it refuses the file
    ('{"kind": "start", "ms": 0}\n{"kind": "sta\n{"kind": "end", "ms": 5}\n',
     "not JSON lines nor a JSON list: line 2: "),
    ('{"kind": "start", "ms": "0"}\n', NOT_A_RECORD),
    ('{"kind": "start", "ms": 0}\n{"kind": "status", "ms": 3}\n', "record 2 (status) has no 'status'"),
])
def test_report_refuses_what_is_not_a_record(tmp_path, text: str, error: str):
    junk = tmp_path / "junk.jsonl"
    junk.write_text(text)
    out = mig("report", str(junk), "-o", str(tmp_path / "x.html"))
    assert out.returncode == 1 and error in out.stderr
    assert not (tmp_path / "x.html").exists()


def test_report_of_a_missing_file_is_a_usage_error(tmp_path):
    out = mig("report", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2 and "does not exist" in out.stderr
