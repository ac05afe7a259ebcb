"""The one place benchmark scripts write their result tables: benchmarks/results/<name>.{md,json}."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, text: str, data: dict) -> None:
    """Print the Markdown ``text`` and write it with the raw ``data`` next to it."""
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
