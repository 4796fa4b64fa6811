"""Where the data shipped inside the package lives (constitutions, prompt templates)."""

from __future__ import annotations

from pathlib import Path


def data_dir(kind: str) -> Path:
    """Folder of shipped data (`constitutions`, `prompts`): inside the installed package, or at
    the top of a source checkout (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / kind, here.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped data folder '{kind}' is missing from this installation")
