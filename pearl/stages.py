"""The named stages of a prediction, for whoever times them (``pearl.bench``): every stage runs
inside a hook, none by default. A leaf module (it imports nothing of the package), so that the
methods and the Segmentor can mark their stages.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Callable, ContextManager, Iterator

StageHook = Callable[[str], ContextManager]
_hook: ContextVar[StageHook | None] = ContextVar("pearl_stage_hook", default=None)


def stage(name: str) -> ContextManager:
    """The context the stage ``name`` runs in: the hook's, or none. The stages: "backbone" (blocks
    and the last block), "pa" and "vfm" (a second vision model's features; both inside it),
    "fusion", "tlp" (the refinement: TLP, PAMR), "decision"."""
    hook = _hook.get()
    return nullcontext() if hook is None else hook(name)


@contextmanager
def timing_stages(hook: StageHook) -> Iterator[None]:
    """Within this block (in this thread or task) every stage runs inside ``hook(stage name)``."""
    token = _hook.set(hook)
    try:
        yield
    finally:
        _hook.reset(token)
