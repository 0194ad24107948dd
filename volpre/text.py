"""Text from files and manifests, made safe to print on a terminal or in a log.

Entry ids, file names, DICOM fields and library messages come from data volpre does not
control: a manifest ``id`` holding ``ESC ] 0 ; ... BEL`` retitles the terminal, a file name
holding a newline forges an output line. :func:`printable` escapes every character that is not
printable (C0 and C1 controls, DEL, newlines, tabs, bidirectional overrides, lone surrogates
from undecodable file names) the way Python's ``repr`` writes it (``\\x1b``, ``\\n``,
``\\u202e``, ``\\udcff``), and keeps everything else, accents and CJK included.
"""

from __future__ import annotations


def printable(text: object) -> str:
    """``str(text)`` with every non-printable character escaped (one line, nothing removed)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def printable_lines(text: object) -> str:
    """:func:`printable` applied to each line of a message volpre built from several lines."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def one_line(error: BaseException) -> str:
    """A library's exception message on one line (runs of whitespace joined), or its type's name if empty."""
    return " ".join(str(error).split()) or type(error).__name__
