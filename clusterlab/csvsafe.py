"""CSV cells that a spreadsheet opens as text, not as a formula to run.

A file named `=HYPERLINK("http://...")&A1.png` or `@SUM(A1).png` is a valid path; written as it is
into assignments.csv, Excel, LibreOffice and Google Sheets read the cell as a formula, which can
fetch a URL or (with DDE, `=cmd|...`) run a program when the file is opened ("CSV injection").
Every CSV that clusterlab writes with a string the user controls (a path, a reason quoting one)
passes it through `cell`: a cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return
gets a single quote in front (OWASP's recommendation), which spreadsheets show as text and which
a reader of the CSV sees as part of the value: `'=1+1.png`. `unquote` gives the path back.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _quoted(value: str) -> bool:
    # Also a value that already starts with quotes before a formula (`'=x`): quoted once more, so
    # that `unquote` gives every value back exactly.
    return value.lstrip("'").startswith(FORMULA_STARTS)


def cell(value):
    """`value`, with a quote in front when it is a string a spreadsheet would run; other values
    (numbers) as they are."""
    if isinstance(value, str) and _quoted(value):
        return "'" + value
    return value


def row(values) -> list:
    """Every cell of a row through `cell`."""
    return [cell(value) for value in values]


def unquote(value: str) -> str:
    """The value `cell` was given: the quote taken off a cell that `cell` quoted."""
    if value.startswith("'") and _quoted(value[1:]):
        return value[1:]
    return value
