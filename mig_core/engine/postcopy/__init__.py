"""Postcopy: the destination runs before all of its memory arrived; missing pages are fetched on fault.

``switch`` switches a running precopy migration over (and pauses and recovers
it); ``source`` sends the remaining pages, requested ones first;
``destination`` is the host side of the destination (advise, discard, listen,
completion); ``page_server`` is the helper process that holds the
userfaultfd, receives pages and requests the missing ones, so a thread that
faults while holding the GIL never stops what would serve it. ``ipc`` is how
the host and the helper talk. docs/concepts.md ("Postcopy") has the design.
"""
