"""What every bench script writes: a result dict stamped with date, machine, command and versions, saved as
``<stem>.json`` + ``<stem>.md`` (the Markdown rendered from the JSON) and printed.

Example:
    >>> result = stamped("bench/selective_tta.py", models=rows)
    >>> write_results(Path("bench/results"), "selective_tta", result, markdown)
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, Callable


def stamped(script: str, **fields: Any) -> dict:
    """``fields`` plus created (UTC), machine line, the command that ran (this process's arguments), versions."""
    from deploykit.environment import machine_line, versions

    return {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_line(),
            "command": f"python {script} " + " ".join(sys.argv[1:]), "versions": versions(), **fields}


def write_results(out: Path, stem: str, result: dict, markdown: Callable[[dict], str]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    print(text)
