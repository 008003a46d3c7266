"""The one base class for errors caused by user input (bad path, bad file, bad option).

The CLI prints these as a single ``error: ...`` line without a stack trace; anything else is a bug
and keeps its traceback.
"""


def _printable(text: str) -> str:
    """File names that are not UTF-8 reach Python as lone surrogates, which no terminal or file can
    encode: show them as ``\\xNN`` escapes (as :func:`polypseg.core.io_utils.display_name` does)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(
            f"\\x{ord(c) - 0xDC00:02x}"
            if 0xDC80 <= ord(c) <= 0xDCFF
            else (f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c)
            for c in text
        )


class PolypsegError(Exception):
    """An error the user can fix; the message names the file or option at fault."""

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):
            args = (_printable(args[0]), *args[1:])
        super().__init__(*args)
