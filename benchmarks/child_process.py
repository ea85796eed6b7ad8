"""Running one measurement in its own process, so that its peak RSS (``ru_maxrss``) is its own."""
from __future__ import annotations

import json
import subprocess


def measure_in_child(command: list[str]) -> tuple[dict | None, str]:
    """(the JSON object the child printed last, "") or (None, why it failed in one line)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""
