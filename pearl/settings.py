"""A job's settings: a method's published protocol on a dataset, updated by overrides and resolved.

The runner resolves each job's settings with it, and the tables use the same function to say
which resolved settings a table row requires, so a cell and a run agree by construction.
"""
from __future__ import annotations

import json

from . import params as param_specs
from .protocols import method_facts, pa_methods, plug_in_protocol, protocol, resclip_hosts

OPERATIONAL_PARAMS = ("text_cache_dir",)  # where things are cached: never changes a number


def job_settings(method: str, pa: bool | None, tlp: bool | None, dataset: str, profile: str = "own",
                 overrides: dict | None = None) -> dict:
    """Every resolved parameter (pa and tlp included) of ``method`` on ``dataset`` with ``overrides``."""
    return resolve_settings(method, pa, tlp, published_settings(method, dataset, profile, overrides))


def published_settings(method: str, dataset: str, profile: str = "own", overrides: dict | None = None) -> dict:
    """``method``'s protocol on ``dataset``, the per-dataset settings of the plug-ins ``overrides`` switches
    on (``resclip``: ResCLIP's released weights), then ``overrides`` (not yet resolved)."""
    params = protocol(method, dataset, profile)
    if (overrides or {}).get("resclip"):
        params.update(plug_in_protocol("resclip", dataset))
    params.update(overrides or {})
    return params


def resolve_settings(method: str, pa: bool | None, tlp: bool | None, params: dict) -> dict:
    """Every parameter resolved for a method, its pa/tlp switches and overrides (from the method's
    facts, ``pearl.protocols.method_facts``: no model code is imported).

    None for pa / tlp / arch means the method's own default. Raises ValueError for an unknown
    method or parameter, an out-of-range value, or pa=True where attention has no query·key term.
    """
    facts = method_facts(method)
    resolved = param_specs.resolve(params)
    pa = facts.default_pa if pa is None else pa
    tlp = facts.default_tlp if tlp is None else tlp
    if not isinstance(pa, bool) or not isinstance(tlp, bool):
        raise ValueError(f"pa and tlp must be True, False or None, got pa={pa!r}, tlp={tlp!r}")
    if pa and not facts.has_query_key_term:
        raise ValueError(
            f"pa=True has no meaning for method {method!r}: its last-block attention has no query·key term "
            f"(only key·key / query·query products), and rotating the keys by an orthogonal R leaves k·kᵀ and "
            f"q·qᵀ unchanged. PA applies to: {', '.join(pa_methods())}.")
    if resolved["resclip"] and not facts.resclip_host:
        raise ValueError(f"resclip=True has no meaning for method {method!r}: ResCLIP's released code applies RCS and "
                         f"SFR to the attention of {', '.join(resclip_hosts())} only")
    if resolved["arch"] is None:
        resolved["arch"] = facts.default_arch
    resolved.update(pa=pa, tlp=tlp)
    return resolved


def comparable(settings: dict) -> dict:
    """The settings that determine a number, JSON-normalised (tuples as lists) for comparison."""
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in OPERATIONAL_PARAMS}, default=str))


def deviations(method: str, dataset: str, profile: str, resolved: dict) -> dict:
    """The resolved settings that differ from ``method``'s protocol on ``dataset`` (same pa/tlp)."""
    reference = comparable(job_settings(method, resolved["pa"], resolved["tlp"], dataset, profile))
    mine = comparable(resolved)
    return {k: resolved[k] for k in mine if mine[k] != reference.get(k)}
