"""Segments of image segmentation and how predictions are scored against them: the targets Mask2Former
trains on (`segments`: binary masks with a class each, from a class map and an instance map), the class per
pixel of either model's output (`semantic_map`), and the eval metric over them (mean IoU, pixel accuracy,
panoptic quality).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.eval_views import Examples, picture_grid
from models.spec import StreamingMetric, View

IGNORE = (
    255  # ignored pixels in the stored targets (SegFormer's semantic_loss_ignore_index, Mask2Former's ignore_value)
)


def segments(semantic: np.ndarray, instances: np.ndarray | None, subtask: str) -> tuple[np.ndarray, np.ndarray]:
    """Targets for mask classification: (binary masks N x H x W, class ids N). Semantic: one segment per
    class; instance: one per instance id; panoptic: instances plus one "stuff" segment per class of the
    pixels outside every instance."""
    masks, classes = [], []
    valid = semantic != IGNORE
    if subtask == "semantic" or instances is None:
        for c in np.unique(semantic[valid]):
            masks.append(semantic == c)
            classes.append(c)
    else:
        for k in np.unique(instances[valid]):
            region = (instances == k) & valid
            if k == 0:
                continue
            masks.append(region)
            classes.append(np.bincount(semantic[region]).argmax())
        if subtask == "panoptic":
            stuff = (instances == 0) & valid
            for c in np.unique(semantic[stuff]):
                masks.append(stuff & (semantic == c))
                classes.append(c)
    h, w = semantic.shape
    stacked = np.stack(masks).astype(np.uint8) if masks else np.zeros((0, h, w), np.uint8)
    return stacked, np.asarray(classes, dtype=np.int64)


class SegmentationMetric(StreamingMetric):
    """Mean IoU and pixel accuracy from a confusion matrix; panoptic quality from per-class TP/FP/FN/IoU sums."""

    def __init__(self, num_labels: int, panoptic: bool, threshold: float, labels: list | None = None):
        self.num_labels, self.panoptic, self.threshold = num_labels, panoptic, threshold
        self.names = [str(label) for label in labels] if labels else [str(i) for i in range(num_labels)]
        self.confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
        self.pq = torch.zeros(4, num_labels, dtype=torch.float64)  # TP, FP, FN, IoU sum per class
        self.total, self.examples = None, Examples(limit=3)  # what the run report shows of the last eval

    def bind(self, model, processor):
        self.processor = processor

    def to(self, device):
        self.confusion, self.pq = self.confusion.to(device), self.pq.to(device)
        return self

    def update(self, outputs, inputs, arrays):
        target = torch.from_numpy(np.stack(arrays["labels"]).astype(np.int64)).to(self.confusion.device)
        predicted = semantic_map(outputs, target.shape[-2:]).to(target.device)
        valid = target != IGNORE
        index = target[valid] * self.num_labels + predicted[valid]
        self.confusion += torch.bincount(index, minlength=self.num_labels**2).view(self.num_labels, self.num_labels)
        for i in range(min(self.examples.room(), len(arrays.get("pixels", [])))):
            truth = np.where(valid[i].cpu().numpy(), target[i].cpu().numpy(), -1).astype(np.int32)
            found = predicted[i].cpu().numpy().astype(np.int32)
            self.examples.add({"image": arrays["pixels"][i], "truth": truth, "found": found})
        if self.panoptic:
            size = tuple(target.shape[-2:])
            found = self.processor.post_process_panoptic_segmentation(
                outputs, threshold=self.threshold, target_sizes=[size] * len(target)
            )
            for result, masks, classes, void in zip(found, arrays["segment_masks"], arrays["segment_classes"], ~valid):
                self.match(result, torch.from_numpy(masks).bool().to(void.device), classes, void)

    def match(self, result, truth: torch.Tensor, classes: np.ndarray, void: torch.Tensor):
        """One image's predicted segments against its true ones: IoU > 0.5 with the same class is a match."""
        seg = result["segmentation"].to(void.device)
        matched = set()
        for info in result["segments_info"]:
            mask, c = (seg == info["id"]) & ~void, info["label_id"]
            if not mask.any():
                continue
            for j in np.flatnonzero(classes == c):
                g = truth[j] & ~void
                iou = float((mask & g).sum()) / float((mask | g).sum())
                if iou > 0.5:
                    self.pq[0, c] += 1
                    self.pq[3, c] += iou
                    matched.add(int(j))
                    break
            else:
                self.pq[1, c] += 1
        for j, c in enumerate(classes):
            if j not in matched:
                self.pq[2, int(c)] += 1

    def compute(self):
        confusion, pq = self.confusion.clone(), self.pq.clone()
        if dist.is_initialized():
            dist.all_reduce(confusion)
            dist.all_reduce(pq)
        self.total = confusion.cpu().numpy()
        confusion = confusion.double()
        hits = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - hits
        seen = union > 0
        out = {
            "mean_iou": float((hits[seen] / union[seen]).mean()) if seen.any() else 0.0,
            "pixel_accuracy": float(hits.sum() / confusion.sum().clamp(min=1)),
        }
        if self.panoptic:
            tp, fp, fn, iou = pq
            denominator = tp + 0.5 * fp + 0.5 * fn
            present = denominator > 0
            out["pq"] = float((iou[present] / denominator[present]).mean()) if present.any() else 0.0
        return out

    def views(self):
        if self.total is None:
            return []
        hits, true, found = np.diag(self.total), self.total.sum(1), self.total.sum(0)
        union = true + found - hits
        rows = [
            [name, int(true[c]), int(found[c]), float(hits[c] / union[c]) if union[c] else 0.0]
            for c, name in enumerate(self.names)
        ]
        views = [
            View(
                "Per-class IoU",
                "Pixels of each class in the eval and as predicted.",
                ["class", "pixels", "predicted", "IoU"],
                rows,
            )
        ]
        panels = []
        for k, e in enumerate(self.examples.items):
            panels.append({"image": np.asarray(e["image"]), "title": f"image {k + 1}"})
            panels.append({"image": np.asarray(e["image"]), "title": "true classes", "overlay": e["truth"]})
            panels.append({"image": np.asarray(e["image"]), "title": "predicted classes", "overlay": e["found"]})
        if panels:
            note = "The first eval images, their true classes per pixel and the predicted ones (a colour per class)."
            views.append(View("Examples", note, figures=[("example segmentations", picture_grid(panels))]))
        return views


def semantic_map(outputs, size) -> torch.Tensor:
    """Class per pixel at `size` (batch x H x W) from SegFormer logits or Mask2Former query outputs."""
    if getattr(outputs, "logits", None) is not None:
        logits = F.interpolate(outputs.logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return logits.argmax(1)
    classes = outputs.class_queries_logits.float().softmax(-1)[..., :-1]  # drop "no object"
    masks = F.interpolate(
        outputs.masks_queries_logits.float(), size=tuple(size), mode="bilinear", align_corners=False
    ).sigmoid()
    return torch.einsum("bqc,bqhw->bchw", classes, masks).argmax(1)
