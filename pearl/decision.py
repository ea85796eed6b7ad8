"""The decision rule: query logits at the original size → labels and class probabilities.

docs/protocol.md §8: softmax(logit_scale·L) over all queries, each class the max over its queries
(no renormalisation), SCLIP/SFP's optional area filter, argmax, ``prob_thd``. Above
``FULL_SIZE_BUDGET`` the labels are decided in column slabs (docs/memory.md).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .fused import OriginalSizeLogits, fits_whole, per_slab
from .params import default


class Prediction:
    """One image's result. labels [H, W] long; probs [C, H, W] (before the area filter and prob_thd);
    logits [Q, H, W] (after refinement, before logit_scale); info: diagnostics.

    For an image whose Q×H×W exceeds ``FULL_SIZE_BUDGET`` the labels are decided in column slabs
    and ``probs`` / ``logits`` are computed when first read (docs/memory.md)."""

    def __init__(self, labels: torch.Tensor, probs, logits, info: dict | None = None) -> None:
        self.labels = labels
        self._probs, self._logits = probs, logits  # a tensor, or a function computing it
        self.info = info if info is not None else {}

    @property
    def probs(self) -> torch.Tensor:
        if callable(self._probs):
            self._probs = self._probs()
        return self._probs

    @property
    def logits(self) -> torch.Tensor:
        if callable(self._logits):
            self._logits = self._logits()
        return self._logits


def class_probabilities(logits: torch.Tensor, query_to_class: torch.Tensor, num_classes: int,
                        logit_scale: float) -> torch.Tensor:
    """[C, H, W]: softmax(logit_scale·L) over all queries (in L's dtype), then the max over each
    class's queries (no renormalisation); docs/protocol.md §8."""
    query_probs = torch.softmax(logits * logit_scale, dim=0)
    if logits.shape[0] == num_classes:
        return query_probs
    probs = torch.zeros((num_classes, *logits.shape[1:]), dtype=query_probs.dtype, device=logits.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)  # "in beta"
        return probs.index_reduce_(0, query_to_class, query_probs, "amax")  # probabilities ≥ 0: zeros are neutral


def area_keep(argmax_counts: torch.Tensor, area_thd: float) -> torch.Tensor:
    """[C − 1] 0/1: the foreground classes whose argmax area exceeds ``area_thd`` of all foreground
    argmax pixels (SCLIP/SFP's area filter)."""
    counts = argmax_counts[1:]
    return (counts > area_thd * counts.sum()).float()


def labels_from(probs: torch.Tensor, keep: torch.Tensor | None, prob_thd: float) -> torch.Tensor:
    """[H, W]: argmax over the kept classes (first index on ties); below ``prob_thd`` → 0."""
    filtered = probs
    if keep is not None:
        filtered = probs.clone()
        filtered[1:] *= keep.to(probs.dtype)[:, None, None]
    labels = filtered.argmax(dim=0)
    labels.masked_fill_(filtered.amax(dim=0) < prob_thd, 0)
    return labels


def top_query_labels(logits: torch.Tensor, query_to_class: torch.Tensor, logit_scale: float,
                     prob_thd: float = 0.0) -> torch.Tensor:
    """[H, W] labels of ``decide`` without an area filter, from query logits [Q, H, W], without
    forming the [C, H, W] probabilities: the softmax is monotonic and the top class holds the top
    query, so the label is the top query's class and the top probability is
    exp(s·l_max − logsumexp(s·l)). Equal to ``decide``'s labels except where two values that
    differ in the logits round to one probability (docs/speed.md §2)."""
    top_logit, top_query = logits.max(dim=0)
    labels = query_to_class[top_query]
    if prob_thd > 0:
        scaled = logits * logit_scale
        top_prob = torch.exp(top_logit * logit_scale - torch.logsumexp(scaled, dim=0))
        labels.masked_fill_(top_prob < prob_thd, 0)  # not labels[mask] = 0: that syncs the device
    return labels


def decide(logits: torch.Tensor, query_to_class: torch.Tensor, num_classes: int, logit_scale: float,
           area_thd: float = 0.0, prob_thd: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [H, W], class probabilities [C, H, W]) from query logits [Q, H, W]; docs/protocol.md §8.

    ``class_probabilities``; optional area filter; argmax (first index on ties); pixels whose top
    probability is strictly below prob_thd → 0. The returned probabilities are pre-filter.
    """
    probs = class_probabilities(logits, query_to_class, num_classes, logit_scale)
    keep = None
    if area_thd > 0:
        keep = area_keep(torch.bincount(probs.argmax(dim=0).flatten(), minlength=num_classes), area_thd)
    return labels_from(probs, keep, prob_thd), probs


@dataclass(frozen=True)
class DecisionConfig:
    """The decision rule's settings (docs/protocol.md §8); the parameters of the same names."""

    logit_scale: float = default("logit_scale")
    prob_thd: float = default("prob_thd")
    area_thd: float = default("area_thd")


class Decision:
    """One segmentor's decision rule bound to its vocabulary (``query_to_class`` [Q] on the device)."""

    def __init__(self, config: DecisionConfig, query_to_class: torch.Tensor, num_classes: int) -> None:
        self.config = config
        self.query_to_class = query_to_class
        self.num_classes = num_classes

    def __call__(self, logits: OriginalSizeLogits, info: dict) -> Prediction:
        """The prediction from the original-size logits: decided whole, or in column slabs above
        ``FULL_SIZE_BUDGET``; ``info`` (the image's diagnostics) becomes the prediction's."""
        rule = (self.query_to_class, self.num_classes, self.config.logit_scale)
        info["nan_images"] = torch.isnan(logits.source).any()  # a device flag: NaN reached the decision
        if fits_whole(logits.values):
            full = logits.full()
            if self.config.area_thd > 0:
                labels, probs = decide(full, *rule, self.config.area_thd, self.config.prob_thd)
                return Prediction(labels, probs.float(), full.float(), info)
            labels = top_query_labels(full, self.query_to_class, self.config.logit_scale, self.config.prob_thd)
            return Prediction(labels, lambda: class_probabilities(full, *rule).float(), full.float(), info)
        width = per_slab(logits.source.shape[0] * logits.size[0])
        keep = None
        if self.config.area_thd > 0:  # the filter needs the whole image's argmax areas first
            counts = torch.zeros(rule[1], dtype=torch.long, device=self.query_to_class.device)
            for _, slab in logits.column_slabs(width):
                counts += torch.bincount(class_probabilities(slab, *rule).argmax(dim=0).flatten(), minlength=rule[1])
            keep = area_keep(counts, self.config.area_thd)
        labels = torch.empty(logits.size, dtype=torch.long, device=self.query_to_class.device)
        for start, slab in logits.column_slabs(width):
            labels[:, start:start + slab.shape[2]] = (
                labels_from(class_probabilities(slab, *rule), keep, self.config.prob_thd) if keep is not None
                else top_query_labels(slab, self.query_to_class, self.config.logit_scale, self.config.prob_thd))
        return Prediction(labels, lambda: class_probabilities(logits.full(), *rule).float(),
                          lambda: logits.full().float(), info)
