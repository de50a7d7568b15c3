"""structlog set-up, done once per process: JSON lines or a console renderer, to stderr."""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure_logging(fmt: str | None = None, level: str | None = None) -> None:
    """Configure structlog; ``fmt`` is ``json`` or ``console`` (default: ``$MIG_LOG_FORMAT`` or console)."""
    global _configured
    fmt = fmt or os.environ.get("MIG_LOG_FORMAT", "console")
    if fmt not in ("json", "console"):
        raise ValueError(f"log format must be json or console, not {fmt!r}")
    level_name = (level or os.environ.get("MIG_LOG_LEVEL", "info")).upper()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True
