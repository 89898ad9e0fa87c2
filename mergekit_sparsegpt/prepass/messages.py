"""Messages to the user on stderr (silent under --quiet)."""

from __future__ import annotations

import sys

from mergekit.options import MergeOptions


def say(options: MergeOptions, message: str) -> None:
    if not options.quiet:
        print(message, file=sys.stderr)
