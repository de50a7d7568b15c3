"""``mig report RECORD…``: one self-contained HTML page (inline SVG) of one or more flight records.

Per record: bandwidth and dirty rate per pass; remaining against time with the downtime budget and the
switchover decision; throttle steps. With several records, one more plot puts their remaining side by side.
Plots are drawn by matplotlib (the ``report`` extra) and embedded as SVG, so the page needs no network.
Every plot is an SVG group ``id="r<N>-plot-<name>"`` and every series one ``id="r<N>-<series>"`` inside it
(``compare-plot`` and ``compare-<N>`` for the side-by-side plot), so tools can find them.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mig_core.cli.flight_series import FlightSeries, RecordError, label_for, load, series

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MB = 1e6
#: statuses shaded on the remaining plot (active is the plain background)
_PHASE_COLOURS = {"setup": "grey", "pre-switchover": "orange", "device": "red", "postcopy-active": "green",
                  "postcopy-paused": "purple", "postcopy-recover": "blue", "wait-unplug": "brown"}
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; } td.n { text-align: right; } section { margin-top: 2.5em; }
p.decision { background: #f7f7e8; padding: 6px 10px; border-left: 4px solid #cc3; }
svg { max-width: 100%; height: auto; }
"""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise click.ClickException("mig report draws with matplotlib, which is not installed: "
                                   "pip install 'mig-core[report]'") from None
    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "mig-report", "font.size": 9})
    import matplotlib.pyplot as plt

    return plt


def _svg(plt: Any, fig: Figure) -> str:
    """The figure as inline SVG (no XML declaration or doctype: the page is HTML); the figure is closed."""
    buf = io.StringIO()
    try:
        fig.savefig(buf, format="svg", metadata={"Date": None})
    finally:
        plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this record", ha="center", va="center", transform=ax.transAxes, color="#888")


def _legend_or_empty(ax: Axes, present: bool, what: str) -> None:
    """A legend under the plot, or a note in it that the record has nothing to draw there."""
    if present:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7, frameon=False)
    else:
        _empty(ax, what)


def _passes(ax: Axes, f: FlightSeries, rid: str) -> None:
    from matplotlib.ticker import MaxNLocator  # matplotlib is there: _pyplot() found it

    ax.set_gid(f"{rid}-plot-passes")
    ax.set(title="bandwidth and dirty rate per pass", xlabel="pass", ylabel="MB/s")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    n = [p.number for p in f.passes]
    (bw,) = ax.plot(n, [p.bandwidth_mb_s for p in f.passes], marker="o", label="bandwidth (sent / pass time)")
    (dr,) = ax.plot(n, [p.dirty_rate_mb_s for p in f.passes], marker="s", label="dirty rate (dirtied / pass time)")
    bw.set_gid(f"{rid}-bandwidth")
    dr.set_gid(f"{rid}-dirty-rate")
    _legend_or_empty(ax, bool(f.passes), "passes")


def _remaining(ax: Axes, f: FlightSeries, rid: str) -> None:
    ax.set_gid(f"{rid}-plot-remaining")
    limit = f.settings.get("downtime-limit")
    ax.set(title="remaining against time", xlabel="seconds", ylabel="MB")
    t = [s for s, _, _ in f.remaining]
    (rem,) = ax.plot(t, [r / _MB for _, r, _ in f.remaining], label="remaining")
    rem.set_gid(f"{rid}-remaining")
    budget = [(s, b / _MB) for s, _, b in f.remaining if b is not None]
    (bud,) = ax.plot([s for s, _ in budget], [b for _, b in budget], linestyle="--",
                     label=f"downtime budget ({limit} ms at the current rate)")
    bud.set_gid(f"{rid}-budget")
    if f.switchover is not None:
        line = ax.axvline(f.switchover.at_s, color="red", linestyle=":", label="switchover")
        line.set_gid(f"{rid}-switchover")
    end = f.end_s
    for (start, status), stop in zip(f.statuses, [s for s, _ in f.statuses[1:]] + [end], strict=True):
        if status in _PHASE_COLOURS and stop > start:
            span = ax.axvspan(start, stop, color=_PHASE_COLOURS[status], alpha=0.15, label=status)
            span.set_gid(f"{rid}-phase-{status}")
    _legend_or_empty(ax, bool(f.remaining), "remaining figures")


def _throttle(ax: Axes, f: FlightSeries, rid: str) -> None:
    ax.set_gid(f"{rid}-plot-throttle")
    ax.set(title="throttle", xlabel="seconds", ylabel="cpu-throttle-percentage (%)", ylim=(0, 100))
    end = f.end_s
    steps = f.throttle or [(0.0, 0)]
    (thr,) = ax.step([s for s, _ in steps] + [end], [p for _, p in steps] + [steps[-1][1]], where="post",
                     label="auto-converge throttle (%)")
    thr.set_gid(f"{rid}-throttle")
    handles = [thr]
    if f.dirty_limit:
        ax2 = ax.twinx()
        ax2.set_ylabel("dirty-limit sleep per round (µs)")
        (dl,) = ax2.step([s for s, _ in f.dirty_limit] + [end], [v for _, v in f.dirty_limit] + [f.dirty_limit[-1][1]],
                         where="post", color="tab:orange", label="dirty-limit sleep per round (µs)")
        dl.set_gid(f"{rid}-dirty-limit")
        handles.append(dl)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7, frameon=False)
    if not f.throttle and not f.dirty_limit:
        _empty(ax, "throttling")


def _decision(f: FlightSeries) -> str:
    so = f.switchover
    if so is None:
        return f"No switchover: the migration ended {f.status}."
    expected = f"expected downtime {so.expected_downtime_ms} ms" if so.expected_downtime_ms is not None else \
        "no downtime estimate yet"
    took = f", the downtime was {f.end['downtime']} ms" if f.end.get("downtime") is not None else ""
    return (f"Switchover at {so.at_s:.2f} s with {so.remaining / _MB:.1f} MB left: {expected} against "
            f"downtime-limit {so.downtime_limit_ms} ms{took}.")


def _figure_for(plt: Any, f: FlightSeries, i: int) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
    rid = f"r{i}"
    _passes(axes[0], f, rid)
    _remaining(axes[1], f, rid)
    _throttle(axes[2], f, rid)
    return _svg(plt, fig)


def _compare(plt: Any, flights: Sequence[FlightSeries]) -> str:
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.set_gid("compare-plot")
    ax.set(title="remaining against time, side by side", xlabel="seconds", ylabel="MB")
    for i, f in enumerate(flights):
        (line,) = ax.plot([s for s, _, _ in f.remaining], [r / _MB for _, r, _ in f.remaining],
                          label=f"{f.label} ({f.status})")
        line.set_gid(f"compare-{i}")
    ax.legend(loc="upper right", fontsize=7, ncol=2)
    fig.tight_layout()
    return _svg(plt, fig)


def _cell(value: Any) -> str:
    return "-" if value is None else html.escape(str(value))


def _summary(flights: Sequence[FlightSeries]) -> str:
    head = ("record", "side", "result", "total time (ms)", "downtime (ms)", "passes", "transferred (MB)",
            "capabilities")
    rows = []
    for i, f in enumerate(flights):
        e = f.end
        moved = f"{e['transferred'] / _MB:.1f}" if e.get("transferred") is not None else None
        caps = ", ".join(f.settings.get("capabilities", [])) or None
        cells = (f'<a href="#r{i}">{html.escape(f.label)}</a>', _cell(f.side), _cell(f.status),
                 _cell(e.get("total-time")), _cell(e.get("downtime")), _cell(e.get("dirty-sync-count")),
                 _cell(moved), _cell(caps))
        rows.append("<tr>" + "".join(f'<td class="n">{c}</td>' if j in (3, 4, 5, 6) else f"<td>{c}</td>"
                                     for j, c in enumerate(cells)) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def render(flights: Sequence[FlightSeries], title: str) -> str:
    """The whole page."""
    plt = _pyplot()
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>", _summary(flights)]
    if len(flights) > 1:
        parts.append(_compare(plt, flights))
    for i, f in enumerate(flights):
        settings = ", ".join(f"{k} {v}" for k, v in f.settings.items() if k != "capabilities")
        parts.append(f'<section id="r{i}"><h2>{html.escape(f.label)}</h2><p>{html.escape(settings)}</p>'
                     f'<p class="decision">{html.escape(_decision(f))}</p>{_figure_for(plt, f, i)}</section>')
    parts.append("</body></html>")
    return re.sub(r"\n\s*\n", "\n", "\n".join(parts))


@click.command("report")
@click.argument("records", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("mig-report.html"),
              show_default=True, help="The HTML file to write.")
@click.option("--title", default="mig flight report", show_default=True, help="The page's title.")
def report_cmd(records: tuple[Path, ...], output: Path, title: str) -> None:
    """Write an HTML report (plots inline, no network needed) of one or more flight RECORDS.

    A record is a JSON-lines file from ``mig run --flight-dir`` or a JSON list from x-query-migration-record.
    """
    try:
        flights = [series(load(p), label_for(p)) for p in records]
    except RecordError as e:
        raise click.ClickException(str(e)) from None
    output.write_text(render(flights, title))
    click.echo(f"{output}: {len(flights)} record(s)")
