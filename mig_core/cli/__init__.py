"""The ``mig`` command line."""

from mig_core.cli.main import main

__all__ = ["main"]
