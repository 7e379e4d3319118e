"""Opens a report page the way a person would: in a real headless Chromium (Debian's `chromium`).

A test that calls `open_in_browser` is skipped, saying why, when no Chromium is on PATH; `make test`
installs one when it can (apt-get, as root: `make browser`)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest

# appended to a copy of the page: records each image's decoded size once the page has loaded, and how
# many distinct colours the browser drew of it (sampled on a canvas: a blank image has one or two)
PROBE = """<script>
function colours(image) {
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data, seen = new Set();
  for (let k = 0; k < data.length; k += 4 * 7) seen.add(data[k] << 16 | data[k + 1] << 8 | data[k + 2]);
  return seen.size;
}
addEventListener("load", () => document.body.setAttribute("data-images", JSON.stringify(
  [...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight, colours(i)]))));
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium); the report page is not rendered")
    return found


def open_in_browser(page: str, tmp_path, colours: bool = False) -> tuple[dict, str, "object"]:
    """What Chromium shows of `page`: each image's decoded (width, height) by its alt text (with
    `colours`: (width, height, distinct colours drawn)), the rendered DOM, and a screenshot (a PIL
    image). Fails on any message in the browser's console."""
    from PIL import Image

    browser = chromium()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "CONSOLE" not in dom.stderr, [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    decoded = json.loads(html.unescape(dom.stdout.split('data-images="', 1)[1].split('"', 1)[0]))
    shot, plain = tmp_path / "shot.png", tmp_path / "page.html"
    plain.write_text(page)
    done = subprocess.run(
        [*flags, "--hide-scrollbars", "--window-size=1200,2600", f"--screenshot={shot}", plain.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    images = {alt: (w, h, n) if colours else (w, h) for alt, w, h, n in decoded}
    return images, dom.stdout, Image.open(shot).convert("RGB")


def plotted_pixels(screenshot) -> int:
    """Pixels in matplotlib's first line colour (#1f77b4) or the report's bar colour (#4c72b0): what was drawn."""
    return sum(
        1
        for r, g, b in screenshot.getdata()
        if abs(r - 31) + abs(g - 119) + abs(b - 180) < 40 or abs(r - 76) + abs(g - 114) + abs(b - 176) < 30
    )


def class_rows(dom: str) -> dict[str, tuple[int, int, float, float]]:
    """The per-class table of a run report's last-eval views as rendered: class -> (eval rows, predicted,
    precision, recall)."""
    views = dom.split('<div id="eval-views"', 1)[1]
    num = r'<td class="num">([\d.]+)</td>'
    found = re.findall(rf"<tr><td>([^<]+)</td>{num}{num}{num}{num}{num}</tr>", views)
    return {name: (int(rows), int(predicted), float(p), float(r)) for name, rows, predicted, p, r, _ in found}
