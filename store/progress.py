"""Progress of the store's long operations, for whoever shows it (the CLI draws one
line on a terminal); the store only reports, in stages of counted units."""

from __future__ import annotations


class Progress:
    """What a long operation reports as it goes; this one reports nothing."""

    def stage(self, what: str, total: int = 0, unit: str = "") -> None:
        """A stage starts: ``what`` it does, ``total`` units to do (0: not known), counted
        in ``unit`` ("B": bytes; "": items)."""

    def advance(self, n: int = 1) -> None:
        """``n`` more units of the current stage are done."""


SILENT = Progress()
