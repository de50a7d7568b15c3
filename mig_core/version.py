"""mig's version, in one place (the package, the QMP ``query-version`` reply and ``mig --version`` read it)."""

__version__ = "0.1.0"
