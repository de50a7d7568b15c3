"""``mig plugins``: every installed plugin per group, its distribution and version, and which is selected."""

from __future__ import annotations

import json

import click

from mig_core.plugin.registry import GROUPS, PluginRegistry


def _implementation(reg: PluginRegistry, entry: object) -> str | None:
    """Which code path a compressor runs (hardware or software, and why), if it loads."""
    try:
        return str(reg.load("mig_core.compressors", entry.name).implementation())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a broken plugin is reported by --check, not here
        return None


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--check", is_flag=True, help="Import each plugin and report the ones that fail.")
def plugins(as_json: bool, check: bool) -> None:
    """List installed plugins per entry-point group."""
    reg = PluginRegistry.from_environment()
    rows = []
    for group in GROUPS:
        for e in reg.entries(group):
            chosen = reg.choice(group, e.name)
            status = "disabled" if reg.is_disabled(e) else ("selected" if chosen == e else "shadowed")
            error = reg.check_loadable(e) if check else None
            impl = _implementation(reg, e) if group == "mig_core.compressors" and status == "selected" else None
            rows.append({"group": group, "name": e.name, "distribution": e.distribution, "version": e.version,
                         "target": e.value, "status": "broken" if error else status, "error": error,
                         "implementation": impl})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    current = None
    for r in rows:
        if r["group"] != current:
            current = r["group"]
            click.echo(f"{current}:")
        mark = {"selected": "*", "shadowed": " ", "disabled": "-", "broken": "!"}[str(r["status"])]
        line = f"  {mark} {r['name']:<16} {r['distribution']} {r['version']}  ({r['status']})"
        if r["error"]:
            line += f": {r['error']}"
        elif r["implementation"] and r["implementation"] != "software":
            line += f" — {r['implementation']}"
        click.echo(line)
    if not rows:
        click.echo("no plugins installed")
