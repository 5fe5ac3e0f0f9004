"""What a run leaves for people to look at: pictures (`plots`) and the model card (`card`), both drawn
from the plan.json record and written next to the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secateurs.io import jsonable
from secateurs.report.card import write_card
from secateurs.report.plots import write_plots


def write_report(out: str | Path, record: dict[str, Any]) -> list[Path]:
    """The pictures the record has data for (none without matplotlib), then README.md showing them."""
    record = jsonable(record)  # as plan.json has it: enums as their values
    pictures = write_plots(record, out)
    return [*pictures, write_card(out, record, [p.name for p in pictures])]
