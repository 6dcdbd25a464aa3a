"""The project's user-facing error: a fault in what the user gave (a file, an option, a key).

`dd` prints any `DDError` as one line, `dd <verb>: error: <message>`, and exits 1 (cli.py); the
message names the file / option / key at fault. A leaf module so every layer can raise it.
"""
from __future__ import annotations


class DDError(Exception):
    """A bad input or a fault the user can fix; str(e) names what is at fault."""
