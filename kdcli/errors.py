"""The one exception type for user mistakes.

Anything raised as :class:`KdcliError` is the user's to fix: the CLI prints its message as one line
and exits with status 2 (``--debug`` shows the traceback). Everything else is a bug in kdcli.
"""

from __future__ import annotations


class KdcliError(Exception):
    """A user mistake: one readable line that names the problem and the fix."""
