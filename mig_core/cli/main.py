"""``mig``: the command group and its shared options."""

from __future__ import annotations

import click

from mig_core.cli.advise import advise_cmd
from mig_core.cli.demo import demo
from mig_core.cli.operator import info_cmd, migrate_cmd, qmp_cmd
from mig_core.cli.plugins import plugins
from mig_core.cli.report import report_cmd
from mig_core.cli.run import run
from mig_core.cli.shell import shell_cmd
from mig_core.cli.snapshot import snapshot_cmd
from mig_core.cli.top import top_cmd
from mig_core.logconfig import configure_logging
from mig_core.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mig")
@click.option("--log-format", type=click.Choice(["console", "json"]), default=None, envvar="MIG_LOG_FORMAT",
              help="How log events are written to stderr.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              envvar="MIG_LOG_LEVEL", help="Lowest level logged.")
def cli(log_format: str | None, log_level: str | None) -> None:
    """Live migration, checkpointing and replication of a running program's state."""
    configure_logging(log_format, log_level)


cli.add_command(run)
cli.add_command(plugins)
cli.add_command(demo)
for _cmd in (qmp_cmd, info_cmd, migrate_cmd, shell_cmd, snapshot_cmd, report_cmd, advise_cmd, top_cmd):
    cli.add_command(_cmd)


def main() -> None:
    cli()
