"""End to end in real headless Chromium (Debian's package, driven by Playwright).

Skipped when Chromium or Playwright is missing, except in CI (``CI=true``), where that fails:
``.ci/install_browser.sh`` installs both. The screenshot goes to ``test-artifacts/web_e2e.png``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from polypseg.checkpoint import save_checkpoint
from polypseg.models import create_model
from polypseg.sample_data import sample_dataset_path
from polypseg.web.app import create_app
from polypseg.web.server import BackgroundServer
from polypseg.web.service import InferenceService

from helpers import tiny_config

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
AREA = re.compile(r"^(\d+\.\d{2}) % \(([\d,]+) px\)$")


def find_chromium() -> str | None:
    explicit = os.environ.get("POLYPSEG_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser():
    """(sync_playwright, chromium path), or skip; in CI a missing browser is a failure."""
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "playwright is not installed (pip install playwright; no 'playwright install' needed)"
        pytest.fail(message) if in_ci else pytest.skip(message)
    chromium = find_chromium()
    if chromium is None:
        message = "no chromium executable on PATH (apt-get install chromium, or set POLYPSEG_CHROMIUM)"
        pytest.fail(message) if in_ci else pytest.skip(message)
    return sync_playwright, chromium


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> InferenceService:
    config = tiny_config(image_size=64)
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path_factory.mktemp("browser") / "tiny", create_model(config.model), config, threshold=0.5)
    return InferenceService.from_checkpoint(path, device="cpu")


def mask_pixels(page) -> int:
    """White pixels of the mask canvas, read back from the rendered canvas."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('view-mask');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] > 127) n++;
            return n;
        }"""
    )


def shown_area(page) -> int:
    match = AREA.match(page.inner_text("#area").strip())
    assert match, f"area text not shown: {page.inner_text('#area')!r}"
    return int(match.group(2).replace(",", ""))


def write_clip(path: Path, frames: int = 12) -> Path:
    """12 frames at 10 fps of a square moving right, H.264 MP4 (what Debian's Chromium plays)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), 40, np.uint8)
            image[10:30, 5 + 3 * i : 25 + 3 * i] = [220, 120, 110]
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_page_end_to_end(service: InferenceService, tmp_path: Path):
    sync_playwright, chromium = require_browser()
    clip = write_clip(tmp_path / "clip.mp4")
    images = sorted((sample_dataset_path() / "images").glob("*.jpg"))
    upload = images[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with BackgroundServer(create_app(service)) as base:
        api = httpx.post(f"{base}/v1/segment", files={"file": (upload.name, upload.read_bytes(), "image/jpeg")}, timeout=60).json()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 950})
                requests: list[str] = []
                errors: list[str] = []
                page.on("request", lambda request: requests.append(request.url))
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)

                page.goto(f"{base}/", wait_until="networkidle")
                page.wait_for_function("() => document.getElementById('model-info').textContent.includes('resnet18')")
                page.wait_for_selector("#sample-select option:nth-child(2)", state="attached")

                page.set_input_files("#file-input", str(upload))
                page.wait_for_function(
                    "() => document.getElementById('status').textContent.includes('done')", timeout=60_000
                )
                assert page.is_visible("#results")
                for canvas in ("view-outline", "view-mask", "view-prob"):
                    size = page.evaluate(f"[document.getElementById('{canvas}').width, document.getElementById('{canvas}').height]")
                    assert size == [api["width"], api["height"]], canvas
                page.wait_for_function(
                    "() => document.getElementById('view-cam').complete && document.getElementById('view-cam').naturalWidth > 0"
                )
                assert page.evaluate("document.getElementById('view-cam').naturalWidth") == api["width"]
                assert page.evaluate("document.getElementById('view-cam').getBoundingClientRect().width") > 100
                assert page.input_value("#threshold") == "0.5"
                assert page.get_attribute("#results", "data-rendered-threshold") == "0.50"

                area = shown_area(page)
                assert area == mask_pixels(page)
                # the page thresholds an 8-bit copy of the probabilities: within 1/255 of the API's mask
                assert abs(area - api["area_pixels"]) <= 0.02 * api["width"] * api["height"]
                assert page.inner_text("#confidence").strip()
                # canvas.toBlob is asynchronous: the links get their blob URLs a moment after drawing
                page.wait_for_function(
                    "() => ['download-mask', 'download-overlay'].every((id) => (document.getElementById(id).getAttribute('href') || '').startsWith('blob:'))"
                )
                with page.expect_download() as download_info:
                    page.click("#download-mask")
                download = download_info.value
                assert download.suggested_filename == f"{upload.stem}_mask.png"
                saved = np.asarray(Image.open(download.path()).convert("L"))
                assert saved.shape == (api["height"], api["width"]) and int((saved > 127).sum()) == area
                page.screenshot(path=str(ARTIFACTS / "web_e2e.png"), full_page=True)

                # Moving the slider re-thresholds in the browser: no new model call.
                calls_before = sum("/v1/segment" in url for url in requests)
                page.focus("#threshold")
                page.keyboard.press("End")  # 0.99
                page.wait_for_function("() => document.getElementById('results').dataset.renderedThreshold === '0.99'")
                high = mask_pixels(page)
                page.keyboard.press("Home")  # 0.01
                page.wait_for_function("() => document.getElementById('results').dataset.renderedThreshold === '0.01'")
                low = mask_pixels(page)
                assert low > high, (low, high)
                assert shown_area(page) == low
                assert sum("/v1/segment" in url for url in requests) == calls_before

                # A bundled sample picked from the list.
                page.select_option("#sample-select", images[1].name)
                page.wait_for_function(
                    f"() => document.getElementById('status').textContent.startsWith({images[1].name!r} + ': done')", timeout=60_000
                )
                assert shown_area(page) == mask_pixels(page)

                # A short video: per-frame results, the outline follows the playback position.
                page.set_input_files("#file-input", str(clip))
                page.wait_for_function(
                    "() => document.getElementById('status').textContent.startsWith('clip.mp4: 12 frames done')", timeout=60_000
                )
                assert page.is_visible("#video-results") and not page.is_visible("#results")
                assert page.inner_text("#video-frames") == "12"
                assert page.get_attribute("#video-results", "data-rendered-frame") == "0"
                page.wait_for_function("() => document.getElementById('video').readyState >= 2", timeout=30_000)
                page.evaluate("() => { document.getElementById('video').currentTime = 0.75; }")
                page.wait_for_function("() => document.getElementById('video-results').dataset.renderedFrame === '7'")
                assert page.inner_text("#video-current").startswith("8 / 12")
                page.screenshot(path=str(ARTIFACTS / "web_e2e_video.png"), full_page=True)

                assert all(url.startswith(base) or url.startswith(("data:", "blob:")) for url in requests), requests
                assert not errors, errors
            finally:
                browser.close()
