"""A report as a list of blocks (headings, paragraphs, tables, images), rendered to
Markdown and to a self-contained HTML page. Tables are written by our own small Markdown
writer (pandas.to_markdown needs `tabulate`, which the stack does not ship)."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import pandas as pd

SIGNIFICANT_DIGITS = 4
MISSING = "–"


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    caption: str
    frame: pd.DataFrame


@dataclass(frozen=True)
class Image:
    caption: str
    filename: str  # relative to the report folder


Block = Heading | Paragraph | Bullets | Table | Image


def format_cell(value: object) -> str:
    """Floats to SIGNIFICANT_DIGITS significant digits, missing values to a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.{SIGNIFICANT_DIGITS}g}"
    return str(value)


def formatted(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` as strings, each cell through `format_cell`."""
    return frame.astype(object).map(format_cell)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of `frame` (index ignored); numbers right-aligned."""
    cells = formatted(frame)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]

    def row(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    rule = ["---:" if num else "---" for num in numeric]
    lines = [row([str(c) for c in frame.columns]), "|" + "|".join(rule) + "|"]
    lines += [row(list(values)) for values in cells.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            parts.append(f"{block.caption}\n\n{markdown_table(block.frame)}")
        elif isinstance(block, Image):
            parts.append(f"![{block.caption}]({block.filename})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
figure { margin: 1em 0 2em; } img { max-width: 100%; }
caption, figcaption { text-align: left; font-style: italic; padding: 0.3em 0; }
"""


def to_html(blocks: list[Block], title: str) -> str:
    """A self-contained page: inline style, tables as HTML, images by relative path."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{html.escape(i)}</li>" for i in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            table = formatted(block.frame).to_html(index=False, escape=True, border=0)
            body.append(f"<p><em>{html.escape(block.caption)}</em></p>\n{table}")
        elif isinstance(block, Image):
            src = html.escape(block.filename, quote=True)
            cap = html.escape(block.caption)
            body.append(
                f'<figure><img src="{src}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'
            )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
