"""The named stages of a prediction, for whoever times them (``pearl.bench``): every stage runs
inside a hook, none by default. A leaf module (it imports nothing of the package), so that the
methods and the Segmentor can mark their stages.
"""
from __future__ import annotations

import weakref
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


def once_per(owner, key: tuple, compute: Callable[[], object], name: str) -> object:
    """``compute()`` in the stage ``name``, once per ``owner`` tensor and ``key``, kept while ``owner``
    lives: what every job of a shared trunk would otherwise compute again from the same windows or image
    (a second vision model's features, an image's CLS embedding)."""
    computed = _computed_for.get(id(owner))
    if computed is None:
        computed = _computed_for[id(owner)] = {}
        weakref.finalize(owner, _computed_for.pop, id(owner), None)
    if key not in computed:
        with stage(name):
            computed[key] = compute()
    return computed[key]


# id(a window batch or an image's input) → key → result; an entry goes when its tensor does
# (tensors compare elementwise, so they cannot key a WeakKeyDictionary)
_computed_for: dict[int, dict] = {}
