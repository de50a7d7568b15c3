"""Errors that reach a QMP client as ``{"error": {"class", "desc"}}``."""

from __future__ import annotations


class QMPError(Exception):
    """A command failure; ``desc`` is the text QEMU would give, ``error_class`` its QAPI class."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_qmp(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}


def command_not_found(desc: str) -> QMPError:
    return QMPError(desc, "CommandNotFound")
