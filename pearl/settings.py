"""A job's settings: a method's published protocol on a dataset, updated by overrides and resolved.

The runner resolves each job's settings with it, and the tables use the same function to say
which resolved settings a table row requires, so a cell and a run agree by construction.
"""
from __future__ import annotations

import json

from .protocols import protocol
from .segmentor import resolve_settings

OPERATIONAL_PARAMS = ("text_cache_dir",)  # where things are cached: never changes a number


def job_settings(method: str, pa: bool | None, tlp: bool | None, dataset: str, profile: str = "own",
                 overrides: dict | None = None) -> dict:
    """Every resolved parameter (pa and tlp included) of ``method`` on ``dataset`` with ``overrides``."""
    params = protocol(method, dataset, profile)
    params.update(overrides or {})
    return resolve_settings(method, pa, tlp, params)[1]


def comparable(settings: dict) -> dict:
    """The settings that determine a number, JSON-normalised (tuples as lists) for comparison."""
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in OPERATIONAL_PARAMS}, default=str))


def deviations(method: str, dataset: str, profile: str, resolved: dict) -> dict:
    """The resolved settings that differ from ``method``'s protocol on ``dataset`` (same pa/tlp)."""
    reference = comparable(job_settings(method, resolved["pa"], resolved["tlp"], dataset, profile))
    mine = comparable(resolved)
    return {k: resolved[k] for k in mine if mine[k] != reference.get(k)}
