"""Draw the documentation's pictures again (not part of the site):

    python docs/pictures.py

- ``docs/guide/page-verdict.png``: the service's page in Debian's chromium
  (driven by Playwright), after a full-size gpt-image-1 picture and a
  photograph were dropped on it: each card's verdict, heatmap and evidence.
- ``docs/guide/heatmap.png``: ``imageorigin explain`` on the same picture.

Both come from the shipped default model, through a real ``imageorigin serve``
process on 127.0.0.1 and the real command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "tests"))
from serving import CHROMIUM, serve_process  # noqa: E402

AI = next((SHARED / "dh3-full/dalle").glob("*gpt-image-1__floorplan-output.png"))
PHOTO = SHARED / "raw-samples/human/bsds500__real_photo__test_65084.jpg"


def main() -> None:
    from playwright.sync_api import sync_playwright

    out = REPO / "docs/guide"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "imageorigin.cli", "explain", "default", str(AI), "--out", tmp],
                       check=True)
        shutil.copy(next(Path(tmp).glob("*.overlay.png")), out / "heatmap.png")
    with serve_process() as (url, _, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        page.wait_for_selector("#model p")
        page.set_input_files("#picker", [str(AI), str(PHOTO)])
        page.wait_for_selector("text=Done: 2 images analysed.", timeout=120000)
        page.locator("article.card").first.screenshot(path=str(out / "page-verdict.png"))
        browser.close()
    print("wrote", out / "heatmap.png", out / "page-verdict.png")


if __name__ == "__main__":
    main()
