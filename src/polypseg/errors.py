"""The one base class for errors caused by user input (bad path, bad file, bad option).

The CLI prints these as a single ``error: ...`` line without a stack trace; anything else is a bug
and keeps its traceback.
"""


class PolypsegError(Exception):
    """An error the user can fix; the message names the file or option at fault."""
