"""Several segmentors predicting the same images on one shared trunk (docs/speed.md §3).

``JointPrediction`` is the pipeline across segmentors: it prepares each image and cuts its windows
once, batches the windows of equal shape (of all the images), runs blocks 1…L−1 once per batch, and
hands the trunk to each segmentor's own stages (``Segmentor.window_logits``, ``fuse``,
``finish_images``): the last block and the fusion once for the segmentors that ``fuses_as`` one
another, then each one's refinement and decision. ``Segmentor.predict_batch`` is the one-segmentor case.
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .decision import Prediction
from .fused import WindowedImage
from .stages import stage

if TYPE_CHECKING:
    from .segmentor import Segmentor


class JointPrediction:
    """The segmentors' predictions of a sequence of images; the segmentors must have equal
    :meth:`Segmentor.trunk_key` (same model, device, rescale, windows, input dtype and padding)."""

    def __init__(self, segmentors: Sequence[Segmentor]) -> None:
        lead = segmentors[0]
        if any(seg.trunk_key() != lead.trunk_key() for seg in segmentors[1:]):
            raise ValueError("segmentors share a trunk only with the same model, device, rescale, windows, input "
                             "dtype and padding")
        self.segmentors = list(segmentors)
        self.fusers = self._fusers()

    def predict(self, images: Sequence, on_device: bool = False) -> Iterator[list[Prediction]]:
        """Per image (in order), one prediction per segmentor, each what that segmentor computes
        alone. Predictions are made a group of equal-size images at a time as the iterator
        advances, so only that group's are alive; the post-fusion refinement of a group may be one
        call (``Segmentor.together_values``; docs/speed.md §2)."""
        # not itself under torch.no_grad(): its generator wrapper would hold each yielded result until the
        # next is made, two images' predictions alive at once
        prepared = [self.segmentors[0].prepare_image(image) for image in images]
        patch_logits, forward_info = self._window_logits(prepared)
        queries = max(seg.vocabulary.num_queries for seg in self.segmentors)
        budget = max(seg.together_values for seg in self.segmentors)
        ready: dict[int, list[Prediction]] = {}
        for image_index, group in enumerate(_equal_size_groups(prepared, queries, budget)):
            if image_index not in ready:  # the first image of its group: predict the group
                ready.update(self.predict_group(prepared, patch_logits, forward_info, group, on_device))
            # popped, and no other name holds them: once the consumer releases them they are freed
            yield ready.pop(image_index)

    def _fusers(self) -> dict[int, list[int]]:
        """Index of the segmentor that computes a fusion → the indices of all that use it (itself
        first): those for which :meth:`Segmentor.fuses_as` holds."""
        fusers: dict[int, list[int]] = {}
        for index, seg in enumerate(self.segmentors):
            owner = next((first for first in fusers if seg.fuses_as(self.segmentors[first])), index)
            fusers.setdefault(owner, []).append(index)
        return fusers

    @torch.no_grad()
    def _window_logits(self, prepared: list[WindowedImage]) -> tuple[list, list[dict]]:
        """Each fusing segmentor's [Q, h', w'] logits of every window of every image (per fuser,
        image, window), blocks 1..L−1 run once per batch of equal-shape windows; and each one's
        forward diagnostics (means over the windows)."""
        fusing = [self.segmentors[index] for index in self.fusers]
        lead = fusing[0]
        patch_logits = [[[None] * len(item.windows) for item in prepared] for _ in fusing]
        stats = [defaultdict(list) if seg.diagnostics else None for seg in fusing]
        keep_hidden = any(seg.method.needs_hidden_states for seg in fusing)
        for chunk in self._window_batches(prepared):
            with stage("backbone"):
                shared = lead.tower.trunk(torch.stack([crop for _, _, crop in chunk]), keep_hidden,
                                          lead.method.position_interpolation)
            for seg, logits_of, seg_stats in zip(fusing, patch_logits, stats):
                with stage("backbone"):
                    chunk_logits = seg.window_logits(shared, seg_stats, [prepared[i].input for i, _, _ in chunk])
                for (image_index, window_index, _), window_logits in zip(chunk, chunk_logits):
                    logits_of[image_index][window_index] = window_logits
        forward_info = [{key: torch.stack(values).mean() for key, values in (seg_stats or {}).items()}
                        for seg_stats in stats]
        return patch_logits, forward_info

    def _window_batches(self, prepared: list[WindowedImage]) -> Iterator[list[tuple[int, int, torch.Tensor]]]:
        """Chunks of at most :meth:`Segmentor.windows_per_forward` (image index, window index, crop) of
        equal crop shape; all windows of one image per chunk, in order, when a segmentor's last block
        attends across them (``Method.attends_across_windows``)."""
        lead = self.segmentors[0]
        if any(seg.method.attends_across_windows for seg in self.segmentors):
            for image_index, item in enumerate(prepared):
                yield [(image_index, window_index, lead.crop(item, window))
                       for window_index, window in enumerate(item.windows)]
            return
        groups = defaultdict(list)
        for image_index, item in enumerate(prepared):
            for window_index, window in enumerate(item.windows):
                crop = lead.crop(item, window)
                groups[tuple(crop.shape)].append((image_index, window_index, crop))
        for shape, group in groups.items():
            size = lead.windows_per_forward(shape)
            for start in range(0, len(group), size):
                yield group[start:start + size]

    @torch.no_grad()
    def predict_group(self, prepared: list[WindowedImage], patch_logits: list, forward_info: list,
                      group: list[int], on_device: bool) -> dict[int, list[Prediction]]:
        """image index → one prediction per segmentor, for the images of ``group`` (equal size) from
        their window logits (each image's are used once): each fusion made once, then refined and
        decided by every segmentor that uses it (one fusion alive at a time)."""
        items = [prepared[i] for i in group]
        per_segmentor: list[list[Prediction] | None] = [None] * len(self.segmentors)
        for (owner, users), logits_of, info in zip(self.fusers.items(), patch_logits, forward_info):
            infos = [dict(info, windows=len(item.windows)) for item in items]
            with stage("fusion"):
                fused = [self.segmentors[owner].fuse(item, _take(logits_of, i), one)
                         for item, i, one in zip(items, group, infos)]
            for user in users:
                per_segmentor[user] = self.segmentors[user].finish_images(
                    items, fused, [dict(one) for one in infos], on_device)
            del fused
        return {index: [predictions[position] for predictions in per_segmentor]
                for position, index in enumerate(group)}


def predict_jointly(segmentors: Sequence[Segmentor], images: Sequence, on_device: bool = False
                    ) -> Iterator[list[Prediction]]:
    """Per image (in order), one prediction per segmentor, computed on one shared trunk (``JointPrediction``)."""
    return JointPrediction(segmentors).predict(images, on_device)


def _equal_size_groups(prepared: list[WindowedImage], queries: int, budget: int) -> list[list[int]]:
    """For each image, the indices of the images predicted with it: those of its original and
    input size, in order, up to ``budget`` query × pixel values together (0: each image alone)."""
    open_group: dict[tuple, list[int]] = {}
    of_image = []
    for index, item in enumerate(prepared):
        key = (tuple(item.ori_shape), tuple(item.input.shape))
        group = open_group.get(key)
        if group is None or (len(group) + 1) * queries * item.ori_shape[0] * item.ori_shape[1] > budget:
            group = open_group[key] = []
        group.append(index)
        of_image.append(group)
    return of_image


def _take(items: list, index: int):
    """items[index], leaving None in its place (this image's window logits are used once)."""
    value, items[index] = items[index], None
    return value
