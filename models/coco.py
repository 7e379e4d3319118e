"""COCO, apart from the detection task's model: its annotation files (`parse_coco`), its mAP evaluation of
streamed predictions (pycocotools), and the canvas sizes boxes are scaled to, which the task's postprocess
shares with the metric."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from errors import UserError
from models.eval_views import Examples, picture_grid
from models.spec import StreamingMetric, View


def canvas(arrays: dict[str, list]) -> tuple[int, int]:
    """(height, width) of the zero-padded canvas a batch's images share."""
    return max(p.shape[0] for p in arrays["pixels"]), max(p.shape[1] for p in arrays["pixels"])


def target_sizes(arrays: dict[str, list]) -> list[tuple[float, float]]:
    """Per row, the size that maps DETR's canvas-relative boxes onto the original image's pixels."""
    height, width = canvas(arrays)
    return [
        (h0 * height / p.shape[0], w0 * width / p.shape[1]) for (h0, w0), p in zip(arrays["size"], arrays["pixels"])
    ]


class DetectionMetric(StreamingMetric):
    """COCO mAP (IoU .50:.95) and mAP@50 with pycocotools' COCOeval, the reference torchmetrics'
    MeanAveragePrecision wraps (which would also need torchvision). Keeps every eval detection."""

    def __init__(self, labels: list):
        self.categories = [{"id": i, "name": str(name)} for i, name in enumerate(labels)]
        self.images, self.truths, self.detections = [], [], []
        self.examples = Examples()

    def update(self, outputs, inputs, arrays):
        probs = outputs.logits.detach().float().softmax(-1)[..., :-1].cpu()
        scores, classes = probs.max(-1)
        boxes = outputs.pred_boxes.detach().float().cpu().numpy()
        self.keep_examples(arrays, scores, classes, boxes)
        for i, (h, w) in enumerate(target_sizes(arrays)):
            image_id = len(self.images)
            self.images.append({"id": image_id, "height": arrays["size"][i][0], "width": arrays["size"][i][1]})
            xywh = np.stack(
                [
                    (boxes[i, :, 0] - boxes[i, :, 2] / 2) * w,
                    (boxes[i, :, 1] - boxes[i, :, 3] / 2) * h,
                    boxes[i, :, 2] * w,
                    boxes[i, :, 3] * h,
                ],
                axis=1,
            )
            for box, score, label in zip(xywh.tolist(), scores[i].tolist(), classes[i].tolist()):
                self.detections.append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
            pixels = arrays["pixels"][i]
            back = np.array([arrays["size"][i][1] / pixels.shape[1], arrays["size"][i][0] / pixels.shape[0]] * 2)
            truth = np.asarray(arrays["boxes"][i], dtype=np.float64).reshape(-1, 4) * back
            for (x0, y0, x1, y1), label in zip(truth.tolist(), np.asarray(arrays["class_labels"][i]).tolist()):
                self.truths.append(
                    {
                        "id": len(self.truths) + 1,
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )

    def compute(self):
        images, truths, detections = self.images, self.truths, self.detections
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (images, truths, detections))
            images, truths, detections, offset = [], [], [], 0
            for part_images, part_truths, part_detections in parts:
                images += [{**x, "id": x["id"] + offset} for x in part_images]
                truths += [
                    {**x, "image_id": x["image_id"] + offset, "id": len(truths) + k + 1}
                    for k, x in enumerate(part_truths)
                ]
                detections += [{**x, "image_id": x["image_id"] + offset} for x in part_detections]
                offset += len(part_images)
        if not truths or not detections:
            return {"map": 0.0, "map_50": 0.0}
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
            coco = COCO()
            coco.dataset = {"images": images, "annotations": truths, "categories": self.categories}
            coco.createIndex()
            evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        return {"map": max(float(evaluation.stats[0]), 0.0), "map_50": max(float(evaluation.stats[1]), 0.0)}

    def keep_examples(self, arrays, scores, classes, boxes) -> None:
        """The first eval images with their true boxes and the boxes found with a score of 0.5 or more."""
        height, width = canvas(arrays)
        for i in range(min(self.examples.room(), len(arrays["pixels"]))):
            centre, size = boxes[i][:, :2], boxes[i][:, 2:]
            xyxy = np.concatenate([centre - size / 2, centre + size / 2], axis=1) * [width, height, width, height]
            found = [
                (*box, label, score)
                for box, label, score in zip(xyxy.tolist(), classes[i].tolist(), scores[i].tolist())
                if score >= 0.5
            ]
            truth = np.asarray(arrays["boxes"][i], dtype=np.float64).reshape(-1, 4).tolist()
            labels = np.asarray(arrays["class_labels"][i]).tolist()
            self.examples.add({"image": arrays["pixels"][i], "truth": list(zip(truth, labels)), "found": found})

    def views(self):
        if not self.examples.items:
            return []
        name = [c["name"] for c in self.categories]
        panels = []
        for e in self.examples.items:
            true_boxes = [(*box, name[label], "#2ca02c", True) for box, label in e["truth"]]
            found = [
                (x0, y0, x1, y1, f"{name[label]} {score:.2f}", "#d62728") for x0, y0, x1, y1, label, score in e["found"]
            ]
            title = f"{len(e['truth'])} true (green), {len(found)} found (red)"
            panels.append({"image": np.asarray(e["image"]), "title": title, "boxes": true_boxes + found})
        note = "The first eval images as the model saw them; red boxes are those found with a score of 0.5 or more."
        return [View("Examples", note, figures=[("example detections", picture_grid(panels))])]


def parse_coco(data: bytes, path: str):
    """A COCO detection JSON -> one row per image: image path (relative to the JSON), boxes, categories."""
    try:
        coco = json.loads(data)
        names = {c["id"]: c.get("name", c["id"]) for c in coco.get("categories", [])}
        per_image: dict = {image["id"]: ([], []) for image in coco["images"]}
        for a in coco.get("annotations", []):
            if a.get("iscrowd"):
                continue  # crowd regions are not single objects; DETR and COCO eval leave them out
            if a["image_id"] not in per_image:
                raise UserError(
                    f"{path}: annotation {a.get('id')} names image_id {a['image_id']}, which is not in 'images'"
                )
            per_image[a["image_id"]][0].append([float(v) for v in a["bbox"]])
            per_image[a["image_id"]][1].append(names.get(a["category_id"], a["category_id"]))
        for image in coco["images"]:
            boxes, categories = per_image[image["id"]]
            yield {"id": image["id"], "image": image["file_name"], "boxes": boxes, "categories": categories}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a COCO detection file ({type(e).__name__}: {e})") from None
