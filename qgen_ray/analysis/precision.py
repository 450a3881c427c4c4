"""Precision labels and their order: bits 32 -> "FP32", else "int{b}"; FP32 first, then
falling bit width (FP32, int8, int4, int2), the order of every table and figure."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

FP32_BITS = 32

# Line colours per bit width, the same in every figure; other widths use the fallback.
PRECISION_COLORS = {
    32: "black",
    8: "tab:blue",
    6: "tab:green",
    4: "tab:orange",
    3: "tab:purple",
    2: "tab:red",
}
FALLBACK_COLOR = "tab:gray"


def precision_label(bits: int | float) -> str:
    """The paper's name for a bit width: 32 -> "FP32", 4 -> "int4"."""
    b = int(bits)
    return "FP32" if b == FP32_BITS else f"int{b}"


def precision_order(bits: Iterable[int | float]) -> list[str]:
    """Labels of the distinct bit widths, FP32 first and then by falling bit width."""
    distinct = sorted({int(b) for b in bits if pd.notna(b)}, reverse=True)
    return [precision_label(b) for b in distinct]


def precision_color(bits: int | float) -> str:
    return PRECISION_COLORS.get(int(bits), FALLBACK_COLOR)


def with_precision(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` with a `precision` column: an ordered categorical built from `bits`,
    so that sorting and grouping follow FP32, int8, int4, int2."""
    out = frame.copy()
    order = precision_order(out["bits"])
    labels = [precision_label(b) for b in out["bits"]]
    out["precision"] = pd.Categorical(labels, categories=order, ordered=True)
    return out
