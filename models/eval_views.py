"""What the run report shows of a final eval besides its numbers, built from what a metric kept while it
ran: a confusion matrix with per-class precision and recall, and a few examples with their predictions
(drawn as pictures, or laid out as a table). Memory stays bounded: counts, and at most `EXAMPLES`
examples (of a classifier: as many right and as many wrong ones), whatever the size of the eval split.
Figures are drawn with matplotlib's Agg backend (no display) and handed on as PNG bytes in `spec.View`s.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.distributed as dist

from models.spec import View

EXAMPLES = 6  # examples kept per eval (on rank 0's shard)
DRAWN_CLASSES = 30  # a confusion matrix with more classes is a table, not a picture
LISTED_CLASSES = 50  # rows of the per-class table; with more classes, the worst recalls


class Examples:
    """The first `limit` examples an eval saw, as dicts; later ones are not kept."""

    def __init__(self, limit: int = EXAMPLES):
        self.items: list[dict] = []
        self.limit = limit

    def room(self) -> int:
        return self.limit - len(self.items)

    def add(self, item: dict) -> None:
        if self.room() > 0:
            self.items.append(item)


class RightAndWrong:
    """A classifier's examples, some it got right and some it got wrong: the first `limit` of each kind an
    eval saw are kept (later ones are not); `items` shows `limit` of them, up to half wrong ones (more
    when there are too few right ones), the right ones first. Each item is a dict with a "right" key."""

    def __init__(self, limit: int = EXAMPLES):
        self.right: list[dict] = []
        self.wrong: list[dict] = []
        self.limit = limit

    def wants(self, right: bool) -> bool:
        return len(self.right if right else self.wrong) < self.limit

    def full(self) -> bool:
        return not (self.wants(True) or self.wants(False))

    def add(self, item: dict, right: bool) -> None:
        if self.wants(right):
            (self.right if right else self.wrong).append({**item, "right": right})

    @property
    def items(self) -> list[dict]:
        wrong = self.wrong[: max(self.limit // 2, self.limit - len(self.right))]
        return self.right[: self.limit - len(wrong)] + wrong


class Confusion:
    """Counts of (true class, predicted class) over an eval, the matrix itself up to `DRAWN_CLASSES`
    classes; past that (where it is not drawn) only what the per-class table needs: per class the rows
    right, predicted and present (3 x classes, not classes squared). `total` sums them over workers."""

    def __init__(self, num_labels: int):
        self.n = num_labels
        shape = (num_labels, num_labels) if num_labels <= DRAWN_CLASSES else (3, num_labels)
        self.counts = torch.zeros(shape, dtype=torch.long)

    def to(self, device) -> "Confusion":
        self.counts = self.counts.to(device)
        return self

    def add(self, predicted: torch.Tensor, truth: torch.Tensor) -> None:
        predicted, truth = predicted.to(self.counts.device).long(), truth.to(self.counts.device).long()
        if self.n <= DRAWN_CLASSES:
            self.counts += torch.bincount(truth * self.n + predicted, minlength=self.n * self.n).view(self.n, self.n)
            return
        for k, values in enumerate((truth[predicted == truth], predicted, truth)):
            self.counts[k] += torch.bincount(values, minlength=self.n)

    def total(self) -> np.ndarray:
        """The counts of every worker (a collective under torch.distributed: every rank calls it)."""
        counts = self.counts.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        return counts.cpu().numpy()


def scores_view(title: str, note: str, what: str, names: list[str], hits, predicted, true) -> View:
    """A table of precision, recall and F1 per name from counts: right, predicted, present. With more
    than `LISTED_CLASSES` names, those with the lowest recall."""
    hits, predicted, true = (np.asarray(a, dtype=float) for a in (hits, predicted, true))
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, true, out=np.zeros_like(hits), where=true > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    order = list(range(len(names)))
    if len(order) > LISTED_CLASSES:
        order = sorted(order, key=lambda i: (recall[i], -true[i]))[:LISTED_CLASSES]
        note += f" The {LISTED_CLASSES} with the lowest recall."
    rows = [
        [names[i], int(true[i]), int(predicted[i]), float(precision[i]), float(recall[i]), float(f1[i])] for i in order
    ]
    return View(title, note, [what, "in eval", "predicted", "precision", "recall", "F1"], rows)


def class_views(counts: np.ndarray, labels: list) -> list[View]:
    """The confusion matrix (a picture up to `DRAWN_CLASSES` classes) and per-class precision/recall, from
    `Confusion.total()`."""
    names = [str(label) for label in labels]
    square = counts.shape == (len(names), len(names))
    hits, predicted, true = (np.diag(counts), counts.sum(0), counts.sum(1)) if square else counts
    note = f"{int(true.sum())} eval rows, {len(names)} classes."
    table = scores_view("Per-class precision and recall", note, "class", names, hits, predicted, true)
    if not square:
        return [table]
    matrix = View(
        "Confusion matrix",
        "Rows: the true class; columns: the predicted class; each cell counts eval rows.",
        figures=[("confusion matrix", confusion_png(counts, names))],
    )
    return [matrix, table]


# --- drawing -------------------------------------------------------------------------------------


def new_figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def confusion_png(counts: np.ndarray, names: list[str]) -> bytes:
    n = len(names)
    side = min(8.0, 2.6 + 0.35 * n)
    fig = new_figure(side + 0.8, side)
    ax = fig.add_axes((0.25, 0.25, 0.6, 0.65))
    shown = ax.imshow(counts, cmap="Blues")
    fig.colorbar(shown, ax=ax, fraction=0.05)
    ticks = [name[:16] for name in names]
    ax.set_xticks(range(n), ticks, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), ticks, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 12:
        high = counts.max() or 1
        for i in range(n):
            for j in range(n):
                colour = "white" if counts[i, j] > high / 2 else "black"
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=colour, fontsize=8)
    ax.set_title("confusion matrix")
    return png(fig)


def picture_grid(panels: list[dict], columns: int = 3, size: float = 2.6) -> bytes:
    """Pictures side by side with a caption each. A panel is {"image": HxWx3 uint8, or HxW floats drawn
    with "cmap" from "vmin" to "vmax" (and a colour bar; NaN left blank), "title": str, optional "boxes":
    [(x0, y0, x1, y1, text, colour)] in pixels (a seventh item, True, puts the text under the box),
    optional "overlay": HxW class ids (drawn translucent, a colour per class; negative ids left clear)}."""
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    fig = new_figure(size * columns, (size + 0.35) * rows)
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, k + 1)
        image = panel["image"]
        if image.ndim == 2:
            colours = {"cmap": panel.get("cmap", "viridis"), "vmin": panel.get("vmin"), "vmax": panel.get("vmax")}
            shown = ax.imshow(np.ma.masked_invalid(image), **colours)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        else:
            ax.imshow(image)
        if panel.get("overlay") is not None:
            overlay = np.asarray(panel["overlay"])
            # tab20's even entries are its strong colours: ten classes apart before one repeats
            mask = np.ma.masked_less(np.where(overlay >= 0, (overlay * 2) % 20 + (overlay // 10) % 2, -1), 0)
            ax.imshow(mask, cmap="tab20", alpha=0.6, interpolation="nearest", vmin=0, vmax=19)
        for x0, y0, x1, y1, text, colour, *below in panel.get("boxes", []):
            from matplotlib.patches import Rectangle

            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
            at, align = (y1, "top") if below and below[0] else (y0, "bottom")
            ax.text(x0, at, text, color="white", fontsize=7, va=align, backgroundcolor=colour)
        ax.set_title(panel.get("title", ""), fontsize=8)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.02, right=0.95, bottom=0.02, top=0.92, wspace=0.2, hspace=0.3)
    return png(fig)


def clipped(text: str, limit: int = 300) -> str:
    """A text cell of an examples table, cut at `limit` characters."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
