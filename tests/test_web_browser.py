"""End to end in real headless Chromium (Debian's package, driven by Playwright).

Skipped when Chromium or Playwright is missing, except in CI (``CI=true``), where that fails:
``.ci/install_browser.sh`` installs both. Screenshots go to ``test-artifacts/web_e2e*.png``.
No assertion depends on how fast the machine is: every wait is for a state of the page.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from polypseg.data.sample_data import sample_dataset_path
from polypseg.models.checkpoint import save_checkpoint
from polypseg.models.factory import create_model
from polypseg.web import encoding
from polypseg.web.app import WebSettings, create_app
from polypseg.web.server import BackgroundServer
from polypseg.web.service import InferenceService

from helpers import tiny_config, write_synthetic_dataset

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
AREA = re.compile(r"^(\d+\.\d{2}) % \(([\d,]+) px\)$")
SAMPLES = sorted((sample_dataset_path() / "images").glob("*.jpg"))
MASKS = sample_dataset_path() / "masks"
HANG_MS = 600_000


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
def browser():
    sync_playwright, chromium = require_browser()
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceService]:
    """One running inference worker that every server of this module shares; stopped at the end."""
    config = tiny_config(image_size=64)
    torch.manual_seed(0)
    path = save_checkpoint(
        tmp_path_factory.mktemp("browser") / "tiny", create_model(config.model), config, threshold=0.5
    )
    shared = InferenceService.from_checkpoint(path, device="cpu")
    shared.start()
    yield shared
    shared.stop()


def serving(service: InferenceService, settings: WebSettings | None = None) -> BackgroundServer:
    """A server over the shared worker: it neither starts nor stops it, so a server that ends cannot
    stop the worker under another one still in use."""
    return BackgroundServer(create_app(service, settings, manage_service=False))


@pytest.fixture(scope="module")
def base(service: InferenceService):
    with serving(service) as url:
        yield url


@pytest.fixture(scope="module")
def ensemble_base(tmp_path_factory: pytest.TempPathFactory):
    """A 2-fold CV run folder of tiny random models: the page shows the ensemble's mask."""
    root = tmp_path_factory.mktemp("browser-run")
    config = tiny_config(image_size=64)
    for fold in range(2):
        torch.manual_seed(10 + fold)
        save_checkpoint(root / f"fold_{fold}" / "best", create_model(config.model), config, threshold=0.5)
    (root / "config.json").write_text(
        json.dumps({"run": config.to_dict(), "data": "kvasir-seg", "folds": 2, "seed": 0})
    )
    (root / "splits.json").write_text(json.dumps({"seed": 0, "k": 2, "stems": [], "folds": []}))
    with BackgroundServer(create_app(InferenceService.from_checkpoint(root, device="cpu"))) as url:
        yield url


class Page:
    """A fresh tab on the app that records every request and every page error."""

    def __init__(
        self,
        browser,
        url: str,
        init_script: str | None = None,
        setup: Callable[[BrowserContext], None] | None = None,
    ) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 950}, accept_downloads=True)
        # Waits are for states of the page; the limit only stops a hung test, even on a loaded machine.
        self.context.set_default_timeout(HANG_MS)
        if init_script:
            self.context.add_init_script(init_script)
        if setup:
            setup(self.context)
        self.page = self.context.new_page()
        self.base = url
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        self.page.goto(f"{url}/", wait_until="networkidle")
        self.page.wait_for_function("() => document.getElementById('status').textContent === 'Ready.'")
        self.page.wait_for_selector("#sample-select option:nth-child(2)", state="attached")

    def close(self) -> None:
        # Only the page's own origin, data: and blob: URLs were ever requested.
        assert all(url.startswith(self.base) or url.startswith(("data:", "blob:")) for url in self.requests), (
            self.requests
        )
        self.context.close()

    def upload(self, path: Path | list[Path]) -> None:
        self.page.set_input_files("#file-input", [str(p) for p in path] if isinstance(path, list) else str(path))

    def wait_for_result(self, name: str) -> None:
        self.page.wait_for_function(
            "(name) => document.getElementById('result-title').dataset.name === name"
            " && !document.getElementById('results').hidden"
            " && document.getElementById('status').textContent.startsWith(name + ': done')",
            arg=name,
            timeout=HANG_MS,
        )

    def wait_for_cam(self, threshold: str) -> None:
        self.page.wait_for_function(
            "(t) => { const p = document.getElementById('cam-panel');"
            " return p.dataset.explainedThreshold === t && p.dataset.state === 'ready'; }",
            arg=threshold,
            timeout=HANG_MS,
        )

    def set_threshold(self, value: float) -> None:
        self.page.evaluate(
            "(v) => { const s = document.getElementById('threshold'); s.value = String(v);"
            " s.dispatchEvent(new Event('input', {bubbles: true})); }",
            value,
        )
        self.page.wait_for_function(
            "(t) => document.getElementById('results').dataset.renderedThreshold === t", arg=f"{value:.2f}"
        )

    def canvas_gray(self, canvas_id: str) -> np.ndarray:
        """A canvas's red channel as (H, W) uint8, read back from the page."""
        data = self.page.evaluate(
            """(id) => {
                const c = document.getElementById(id);
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                const out = new Array(c.width * c.height);
                for (let i = 0; i < out.length; i++) out[i] = d[i * 4];
                return [c.width, c.height, out];
            }""",
            canvas_id,
        )
        width, height, values = data
        return np.asarray(values, dtype=np.uint8).reshape(height, width)

    def canvas_rgb(self, canvas_id: str) -> np.ndarray:
        width, height, values = self.page.evaluate(
            """(id) => {
                const c = document.getElementById(id);
                return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
            }""",
            canvas_id,
        )
        return np.asarray(values, dtype=np.uint8).reshape(height, width, 4)[:, :, :3]

    def mask_pixels(self) -> int:
        return int((self.canvas_gray("view-mask") > 127).sum())

    def shown_area(self) -> int:
        text = self.page.inner_text("#area").strip()
        match = AREA.match(text)
        assert match, f"area text not shown: {text!r}"
        return int(match.group(2).replace(",", ""))

    def download(self, button: str):
        with self.page.expect_download() as info:
            self.page.click(button)
        return info.value


def saved_mask(download) -> np.ndarray:
    return np.asarray(Image.open(download.path()).convert("L")) > 127


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


# ----------------------------------------------------------------------------------- the page


def test_page_end_to_end(browser, base: str, tmp_path: Path):
    clip = write_clip(tmp_path / "clip.mp4")
    upload = SAMPLES[0]
    ARTIFACTS.mkdir(exist_ok=True)
    api = httpx.post(
        f"{base}/v1/segment", files={"file": (upload.name, upload.read_bytes(), "image/jpeg")}, timeout=HANG_MS / 1000
    ).json()
    tab = Page(browser, base)
    page = tab.page

    # the drop zone is a named button that opens the file chooser from the keyboard
    zone = page.get_by_role("button", name="Choose an image or short video to analyse, or drop one here")
    with page.expect_file_chooser() as chooser:
        zone.press("Enter")
    assert chooser.value.is_multiple()

    tab.upload(upload)
    tab.wait_for_result(upload.name)
    assert page.inner_text("#result-title") == f"Results for {upload.name}"
    for canvas in ("view-outline", "view-mask", "view-prob", "view-cam"):
        size = page.evaluate(f"[document.getElementById('{canvas}').width, document.getElementById('{canvas}').height]")
        assert size == [api["width"], api["height"]], canvas
        assert page.evaluate(f"document.getElementById('{canvas}').getBoundingClientRect().width") > 100
    assert page.input_value("#threshold") == "0.5"
    assert page.get_attribute("#results", "data-rendered-threshold") == "0.50"
    tab.wait_for_cam("0.50")

    # every image panel has a text alternative naming what it shows
    area = tab.shown_area()
    for pattern in (
        rf"^{re.escape(upload.name)} with the predicted polyp outlined and filled in blue at threshold 0\.50",
        rf"^Predicted mask of {re.escape(upload.name)} at threshold 0\.50: white = polyp, [\d.]+ % \({area:,} px\)$",
        rf"^Probability map of {re.escape(upload.name)}\. Colours viridis",
        r"^(Grad-CAM of the mask shown at threshold 0\.50|Nothing to explain: the mask is empty at threshold 0\.50)",
    ):
        assert page.get_by_role("img", name=re.compile(pattern)).count() == 1, pattern
    assert page.get_by_role("img", name=re.compile(r"^Colour scale of the probability map")).count() == 1

    assert area == tab.mask_pixels()
    # the page thresholds the exact float32 probabilities: the API's mask, pixel for pixel
    assert area == api["area_pixels"]
    api_mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(api["mask_png_base64"])))) > 0
    np.testing.assert_array_equal(tab.canvas_gray("view-mask") > 127, api_mask)
    assert page.inner_text("#confidence").strip()
    download = tab.download("#download-mask")
    assert download.suggested_filename == f"{upload.stem}_mask_t0.50.png"
    saved = saved_mask(download)
    assert saved.shape == (api["height"], api["width"]) and int(saved.sum()) == area
    page.screenshot(path=str(ARTIFACTS / "web_e2e.png"), full_page=True)

    # Moving the slider re-thresholds in the browser: no new segmentation call.
    calls_before = sum("/v1/segment" in url for url in tab.requests)
    page.focus("#threshold")
    page.keyboard.press("End")  # 0.99
    page.wait_for_function("() => document.getElementById('results').dataset.renderedThreshold === '0.99'")
    high = tab.mask_pixels()
    page.keyboard.press("Home")  # 0.01
    page.wait_for_function("() => document.getElementById('results').dataset.renderedThreshold === '0.01'")
    low = tab.mask_pixels()
    assert low > high, (low, high)
    assert tab.shown_area() == low
    assert sum("/v1/segment" in url for url in tab.requests) == calls_before

    # A bundled sample picked from the list.
    page.select_option("#sample-select", SAMPLES[1].name)
    tab.wait_for_result(SAMPLES[1].name)
    assert tab.shown_area() == tab.mask_pixels()

    # A short video: per-frame results, the outline follows the playback position.
    tab.upload(clip)
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('clip.mp4: 12 frames done')", timeout=HANG_MS
    )
    assert page.is_visible("#video-results") and not page.is_visible("#results")
    assert page.inner_text("#video-title") == "Results for clip.mp4"
    assert page.inner_text("#video-frames") == "12"
    assert page.get_attribute("#video-results", "data-rendered-frame") == "0"
    page.wait_for_function("() => document.getElementById('video').readyState >= 2", timeout=HANG_MS)
    page.evaluate("() => { document.getElementById('video').currentTime = 0.75; }")
    page.wait_for_function("() => document.getElementById('video-results').dataset.renderedFrame === '7'")
    assert page.inner_text("#video-current").startswith("8 / 12")
    # frame stepping (keys , and .), per-frame CSV, Grad-CAM of the paused frame, another threshold
    page.focus("#frame-next")
    page.keyboard.press(".")
    page.wait_for_function("() => document.getElementById('video-results').dataset.renderedFrame === '8'")
    page.keyboard.press(",")
    page.keyboard.press(",")
    page.wait_for_function("() => document.getElementById('video-results').dataset.renderedFrame === '6'")
    rows = list(csv.DictReader(io.StringIO(Path(tab.download("#video-csv").path()).read_text())))
    assert [int(r["frame"]) for r in rows] == list(range(12)) and rows[0]["iou_with_previous"] == ""
    assert rows[0]["threshold"] == "0.5" and float(rows[3]["area_fraction"]) >= 0
    page.click("#video-cam")
    page.wait_for_function("() => document.getElementById('video-results').dataset.camFrame === '6'")
    assert re.match(
        r"^(Grad-CAM of the mask|Nothing to explain: the mask) of frame 7", page.inner_text("#video-cam-caption")
    )

    # The threshold slider re-thresholds the video in the browser, with no new request: the outline
    # and the per-frame numbers are the server's at the new threshold.
    shown, threshold = 6, video_threshold_that_changes_the_mask(base, clip, frame=6)
    server = httpx.post(
        f"{base}/v1/segment-video",
        params={"include_masks": "true", "threshold": threshold},
        files={"file": (clip.name, clip.read_bytes(), "video/mp4")},
        timeout=HANG_MS / 1000,
    ).json()
    before = overlay_mask(page)
    videos = sum("/v1/segment-video" in url for url in tab.requests)
    page.evaluate(
        "(t) => { const s = document.getElementById('video-threshold-input'); s.value = t;"
        " s.dispatchEvent(new Event('input', {bubbles: true})); }",
        threshold,
    )
    page.wait_for_function(
        "(t) => document.getElementById('video-results').dataset.renderedThreshold === t", arg=threshold
    )
    assert sum("/v1/segment-video" in url for url in tab.requests) == videos
    assert page.get_attribute("#video-results", "data-rendered-frame") == str(shown)
    after = overlay_mask(page)
    np.testing.assert_array_equal(after, encoding.rle_decode(server["masks_rle"][shown]))
    assert not np.array_equal(after, before)
    assert page.inner_text("#video-threshold") == threshold
    assert abs(float(page.inner_text("#video-consistency")) - server["consistency"]) <= 1.5e-3
    rows = list(csv.DictReader(io.StringIO(Path(tab.download("#video-csv").path()).read_text())))
    assert [int(r["area_pixels"]) for r in rows] == [r["area_pixels"] for r in server["per_frame"]]
    assert {r["threshold"] for r in rows} == {str(float(threshold))}
    for row, expected in zip(rows, server["per_frame"], strict=True):
        assert float(row["mean_confidence"]) == pytest.approx(expected["mean_confidence"], abs=2e-6)
    page.screenshot(path=str(ARTIFACTS / "web_e2e_video.png"), full_page=True)
    # decoded frames are kept for the last FRAME_CACHE frames only: a long video cannot fill the tab's memory
    size, limit, oldest = page.evaluate(
        "() => { const m = new Map(); for (let i = 0; i < FRAME_CACHE + 5; i++) remember(m, i, i);"
        " return [m.size, FRAME_CACHE, Math.min(...m.keys())]; }"
    )
    assert size == limit and oldest == 5
    assert page.evaluate("() => video.masks.size + video.levels.size") <= 2 * limit
    assert not tab.errors, tab.errors
    tab.close()


def overlay_mask(page) -> np.ndarray:
    """The video overlay's drawn pixels (outline and fill) as a (H, W) bool array."""
    width, height, alpha = page.evaluate(
        """() => {
            const c = document.getElementById('video-overlay');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return [c.width, c.height, Array.from(d.filter((_, i) => i % 4 === 3))];
        }"""
    )
    return np.asarray(alpha, dtype=np.uint8).reshape(height, width) > 0


def video_threshold_that_changes_the_mask(url: str, clip: Path, frame: int) -> str:
    """A threshold (2 decimals, not the served one) at which ``frame``'s mask differs from the served mask."""
    body = httpx.post(
        f"{url}/v1/segment-video",
        params={"include_levels": "true"},
        files={"file": (clip.name, clip.read_bytes(), "video/mp4")},
        timeout=HANG_MS / 1000,
    ).json()
    served = round(body["threshold"] * 100)
    png = body["threshold_levels"]["frames"][frame]["levels_png_base64"]
    levels = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))
    for k in sorted({int(np.quantile(levels, q)) for q in (0.5, 0.25, 0.75, 0.1, 0.9)}, key=lambda k: abs(k - served)):
        if 1 <= k <= 99 and k != served and ((levels >= k) != (levels >= served)).any():
            return f"{k / 100:.2f}"
    raise AssertionError("the tiny model's probabilities give the same mask at every threshold")


# Canvas encodings that finish in reverse order: the first toBlob call of a burst completes last,
# as happened on a loaded machine after fast arrow-key steps of the threshold slider.
REVERSED_TO_BLOB = """
(() => {
  window.__toBlobDelays = [];
  window.__toBlobPending = 0;
  const original = HTMLCanvasElement.prototype.toBlob;
  HTMLCanvasElement.prototype.toBlob = function (callback, ...rest) {
    const delay = window.__toBlobDelays.shift() || 0;
    window.__toBlobPending += 1;
    original.call(this, (blob) => setTimeout(() => { window.__toBlobPending -= 1; callback(blob); }, delay), ...rest);
  };
})();
"""


def probability_quantiles(url: str, upload: Path, quantiles: list[float]) -> list[float]:
    """Thresholds (2 decimals) at quantiles of the served probability map of ``upload``."""
    body = httpx.post(
        f"{url}/v1/segment",
        params={"include_probability": "true"},
        files={"file": (upload.name, upload.read_bytes(), "image/jpeg")},
        timeout=HANG_MS / 1000,
    ).json()
    probability = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["probability_png_base64"])))) / 255
    return [round(float(np.quantile(probability, q)), 2) for q in quantiles]


def test_downloaded_mask_is_the_mask_on_screen_after_fast_slider_steps(browser, base: str):
    upload = SAMPLES[2]
    steps = sorted(set(probability_quantiles(base, upload, [0.2, 0.35, 0.5, 0.65, 0.8])))
    assert len(steps) >= 3, steps
    tab = Page(browser, base, init_script=REVERSED_TO_BLOB)
    page = tab.page
    tab.upload(upload)
    tab.wait_for_result(upload.name)
    page.wait_for_function("() => window.__toBlobPending === 0")
    page.evaluate("() => { window.__toBlobDelays = [900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20, 10]; }")
    areas = []
    for threshold in steps:  # each step drawn, any canvas encodings finishing in reverse order
        tab.set_threshold(threshold)
        areas.append(tab.shown_area())
    assert len(set(areas)) == len(areas), areas  # every step shows another mask
    page.wait_for_function("() => window.__toBlobPending === 0")
    download = tab.download("#download-mask")
    shown = tab.canvas_gray("view-mask") > 127
    saved = saved_mask(download)
    assert download.suggested_filename == f"{upload.stem}_mask_t{steps[-1]:.2f}.png"
    assert saved.shape == shown.shape
    assert int(saved.sum()) == tab.shown_area() == int(shown.sum()) == areas[-1]
    np.testing.assert_array_equal(saved, shown)

    # The overlay download is the overlay on screen too (same threshold, same fill and outline).
    overlay = tab.download("#download-overlay")
    assert overlay.suggested_filename == f"{upload.stem}_overlay_t{steps[-1]:.2f}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(overlay.path()).convert("RGB")), tab.canvas_rgb("view-outline"))

    # A slider step not yet drawn when the button is pressed is drawn first: the file is the new mask.
    page.evaluate(
        "(v) => { const s = document.getElementById('threshold'); s.value = String(v);"
        " s.dispatchEvent(new Event('input')); document.getElementById('download-mask').click(); }",
        steps[0],
    )
    page.wait_for_function("() => window.__toBlobPending === 0")
    assert page.get_attribute("#results", "data-rendered-threshold") == f"{steps[0]:.2f}"
    assert tab.shown_area() == areas[0]
    assert not tab.errors, tab.errors
    tab.close()


def test_grad_cam_explains_the_mask_shown_and_follows_the_slider(browser, ensemble_base: str):
    upload = SAMPLES[3]
    peak = probability_quantiles(ensemble_base, upload, [1.0])[0]
    empty_at = round(peak + 0.02, 2)  # above every pixel of the ensemble's probability
    assert empty_at <= 0.99, "the test needs a threshold that empties the ensemble's mask"
    tab = Page(browser, ensemble_base)
    page = tab.page
    tab.upload(upload)
    tab.wait_for_result(upload.name)
    tab.wait_for_cam("0.50")
    caption = page.inner_text("#cam-caption")
    assert "mean of 2 fold models" in caption and "threshold 0.50" in caption, caption

    # At a threshold where the mask on screen is empty, there is nothing to explain.
    tab.set_threshold(empty_at)
    assert tab.shown_area() == 0
    tab.wait_for_cam(f"{empty_at:.2f}")
    assert page.inner_text("#cam-caption") == f"Nothing to explain: the mask is empty at threshold {empty_at:.2f}"
    plain = tab.canvas_rgb("view-cam")

    # Back to a low threshold: a heatmap again, explaining that mask.
    tab.set_threshold(0.05)
    tab.wait_for_cam("0.05")
    assert tab.shown_area() > 0
    assert page.inner_text("#cam-caption").startswith("Grad-CAM of the mask shown at threshold 0.05")
    assert np.abs(tab.canvas_rgb("view-cam").astype(int) - plain).max() > 10
    explained = [url for url in tab.requests if "/v1/explain" in url]
    assert any(f"threshold={empty_at:.2f}" in url for url in explained) and any(
        "threshold=0.05" in url for url in explained
    )
    assert not tab.errors, tab.errors
    tab.close()


def test_a_failed_upload_clears_the_previous_result(browser, base: str, tmp_path: Path):
    tab = Page(browser, base)
    page = tab.page
    tab.upload(SAMPLES[4])
    tab.wait_for_result(SAMPLES[4].name)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(SAMPLES[5].read_bytes()[:400])
    tab.upload(broken)
    page.wait_for_function("() => document.getElementById('status').classList.contains('error')", timeout=HANG_MS)
    status = page.inner_text("#status")
    assert status.startswith("broken.jpg: ") and status.count("broken.jpg") == 1, status
    assert not page.is_visible("#results")  # nothing of the previous image stays on screen
    # the next good upload shows again, under its own name
    tab.upload(SAMPLES[5])
    tab.wait_for_result(SAMPLES[5].name)
    # Chromium logs the refused upload's 400 itself; the page raised nothing
    assert [e for e in tab.errors if "status of 400" not in e] == [], tab.errors
    tab.close()


def test_a_file_chosen_during_analysis_replaces_the_first(browser, base: str):
    tab = Page(browser, base)
    page = tab.page
    held: list = []

    def hold_first(route):
        if not held:
            held.append(route)  # the first analysis waits here until the second has finished
        else:
            route.continue_()

    page.route(lambda url: "/v1/segment?" in url, hold_first)
    first, second = SAMPLES[6], SAMPLES[7]
    tab.upload(first)
    page.wait_for_function(f"() => document.getElementById('status').textContent === 'Analysing {first.name}…'")
    for _ in range(HANG_MS // 50):
        if held:
            break
        page.wait_for_timeout(50)  # lets Playwright deliver the route event
    assert held, "the first analysis never asked for /v1/segment"
    tab.upload(second)
    tab.wait_for_result(second.name)
    late = held[0].request
    settled: list = []
    page.on("requestfinished", lambda request: settled.append(request) if request == late else None)
    page.on("requestfailed", lambda request: settled.append(request) if request == late else None)
    try:
        held[0].continue_()  # the first answer arrives late (its request was cancelled by the page)
    except Exception:  # noqa: BLE001 - an aborted request can no longer be continued: it will never arrive
        settled.append(late)
    if late.failure is not None:
        settled.append(late)  # the page aborted it before it was released
    for _ in range(HANG_MS // 50):
        if settled:
            break
        page.wait_for_timeout(50)
    assert settled, "the late answer neither arrived nor failed"
    page.evaluate("() => new Promise(resolve => setTimeout(resolve, 100))")  # the page handles what arrived
    assert page.get_attribute("#result-title", "data-name") == second.name
    assert page.inner_text("#status").startswith(f"{second.name}: done")
    tab.close()


def test_reviewer_tools(browser, base: str, tmp_path: Path):
    tab = Page(browser, base)
    page = tab.page
    first, second = SAMPLES[8], SAMPLES[9]

    # A sample with its ground truth: shown beside the prediction, with Dice and IoU.
    page.select_option("#sample-select", first.name)
    tab.wait_for_result(first.name)
    assert page.is_visible("#truth-panel") and page.inner_text("#nav-position") == f"9 / {len(SAMPLES)} samples"
    truth = np.asarray(Image.open(MASKS / f"{first.stem}.png").convert("RGB")).max(axis=2) > 127
    for threshold in (0.5, 0.3):
        tab.set_threshold(threshold)
        shown = tab.canvas_gray("view-mask") > 127
        inter = int((shown & truth).sum())
        dice = 2 * inter / (shown.sum() + truth.sum())
        assert page.inner_text("#dice") == f"{dice:.3f}"
        assert page.inner_text("#iou") == f"{inter / (shown | truth).sum():.3f}"
    assert (
        page.get_by_role(
            "img", name=re.compile(r"ground truth .* outlined in yellow, prediction at threshold 0\.30 in blue; Dice")
        ).count()
        == 1
    )

    # Filled overlay: opacity and an on/off toggle (key O).
    page.fill("#overlay-opacity", "80")
    page.dispatch_event("#overlay-opacity", "input")
    page.wait_for_function("() => document.getElementById('overlay-opacity-value').textContent === '80 %'")
    page.wait_for_function("() => document.getElementById('outline-caption').textContent.includes('80 %')")
    strong = tab.canvas_rgb("view-outline").astype(int)
    page.focus("#zoom-reset")
    page.keyboard.press("o")
    page.wait_for_function("() => document.getElementById('outline-caption').textContent === 'Image (overlay off)'")
    assert not page.is_checked("#overlay-toggle")
    plain = tab.canvas_rgb("view-outline").astype(int)
    inside = tab.canvas_gray("view-mask") > 127
    assert inside.any()
    assert np.abs(strong - plain)[inside].mean() > 20  # the fill covers the polyp pixels
    page.keyboard.press("o")
    assert page.is_checked("#overlay-toggle")

    # Zoom and pan, the same in every panel; keys + and 0.
    page.keyboard.press("+")
    page.wait_for_function("() => document.getElementById('results').dataset.zoom === '1.5'")
    transforms = page.evaluate(
        "Array.from(document.querySelectorAll('.viewport > canvas')).map((c) => c.style.transform)"
    )
    assert len(set(transforms)) == 1 and "scale(1.5)" in transforms[0]
    page.locator("#view-mask").scroll_into_view_if_needed()
    box = page.locator("#view-mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 40, box["y"] + box["height"] / 2 + 30, steps=4)
    page.mouse.up()
    assert page.evaluate("document.getElementById('view-prob').style.transform") != transforms[0]
    page.keyboard.press("0")
    page.wait_for_function("() => document.getElementById('results').dataset.zoom === '1'")

    # Colour-blind-safe palettes on the maps, with colour bars.
    assert tuple(tab.canvas_rgb("bar-prob")[0, 0]) == (68, 1, 84)  # viridis
    page.select_option("#palette", "cividis")
    assert tuple(tab.canvas_rgb("bar-prob")[0, 0]) == (0, 34, 78) and tuple(tab.canvas_rgb("bar-cam")[0, -1]) == (
        254,
        232,
        56,
    )

    # Next / previous with the keyboard.
    page.keyboard.press("n")
    tab.wait_for_result(second.name)
    assert page.inner_text("#nav-position") == f"10 / {len(SAMPLES)} samples"
    assert page.input_value("#threshold") == "0.3"  # the reviewer's threshold is kept
    page.keyboard.press("p")
    tab.wait_for_result(first.name)
    page.keyboard.press("ArrowRight")
    tab.wait_for_result(second.name)
    area = tab.shown_area()

    # Measurements of every image shown, as CSV.
    download = tab.download("#download-csv")
    assert download.suggested_filename == "polypseg_measurements.csv"
    rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    assert [row["file"] for row in rows] == [first.name, second.name]
    last = rows[-1]
    assert last["threshold"] == "0.30" and int(last["area_pixels"]) == area
    assert last["ground_truth"] == f"masks/{second.stem}"
    assert abs(float(last["dice"]) - float(page.inner_text("#dice"))) <= 5e-4
    assert last["mean_confidence"] and last["model"].startswith("unet / resnet18")
    page.screenshot(path=str(ARTIFACTS / "web_e2e_review.png"), full_page=True)

    # A folder with images/ and masks/: stepped through, each image with its ground truth.
    folder = write_synthetic_dataset(tmp_path / "study", n=3, size=(60, 80))
    page.set_input_files("#folder-input", str(folder))
    tab.wait_for_result("case00.jpg")
    assert page.inner_text("#nav-position") == "1 / 3 files" and page.is_visible("#truth-panel")
    page.click("#nav-next")
    tab.wait_for_result("case01.jpg")
    assert page.is_visible("#dice-stat")
    # a mask of another size is refused with a clear message, never stretched over the image
    (tmp_path / "wrong.png").write_bytes(_png(np.zeros((10, 10), np.uint8)))
    page.set_input_files("#truth-input", str(tmp_path / "wrong.png"))
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('wrong.png is 10 × 10 px')")
    assert not tab.errors, tab.errors
    tab.close()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------- the review loop


def editor_mask(page) -> np.ndarray:
    width, height, values = page.evaluate("() => [editor.width, editor.height, Array.from(editor.mask)]")
    return np.asarray(values, dtype=bool).reshape(height, width)


def wait_for_item(page, name: str, text: str) -> None:
    page.wait_for_function(
        "([name, text]) => { const b = document.querySelector(`.review-item[data-name='${name}']`);"
        " return b && b.textContent.includes(text); }",
        arg=[name, text],
    )


@contextlib.contextmanager
def reviewing(browser, service, review_dir: Path, folder: Path) -> Iterator[Page]:
    """A page served with ``--review-dir review_dir``, the image folder ``folder`` opened, its first image shown."""
    from polypseg.web.app import WebSettings

    with serving(service, WebSettings(review_dir=review_dir)) as url:
        tab = Page(browser, url)
        tab.page.wait_for_selector("#review-tools", state="visible")
        tab.page.set_input_files("#folder-input", str(folder))
        tab.wait_for_result("case00.jpg")
        yield tab


def test_review_tools_shown_when_the_review_script_loads_after_the_first_requests(browser, service, tmp_path: Path):
    """app.js starts only once every deferred script ran: a slow review.js cannot leave the tools hidden."""
    from polypseg.web.app import WebSettings

    def slow_review_script(context: BrowserContext) -> None:
        def late(route) -> None:
            time.sleep(1.0)  # far longer than /v1/health, /v1/model and /v1/samples take to answer
            route.continue_()

        context.route("**/static/review.js", late)

    with serving(service, WebSettings(review_dir=tmp_path / "review")) as url:
        tab = Page(browser, url, setup=slow_review_script)
        assert tab.page.is_visible("#review-tools") and tab.page.evaluate("() => review.enabled")
        assert not tab.errors, tab.errors
        tab.close()


def test_review_loop_verdicts_and_corrections_persist_and_export(browser, service, tmp_path: Path):
    from typer.testing import CliRunner

    from polypseg.cli.main import app as cli

    review_dir = tmp_path / "review"
    folder = write_synthetic_dataset(tmp_path / "study", n=3, size=(96, 128))
    with reviewing(browser, service, review_dir, folder) as tab:
        page = tab.page
        page.wait_for_function("() => document.getElementById('review-summary').dataset.left === '3'")
        assert page.locator(".review-item").count() == 3

        # Verdicts from the keyboard and the buttons, a note saved when the field is left.
        page.focus("#zoom-reset")
        page.keyboard.press("a")
        wait_for_item(page, "case00.jpg", "accepted")
        page.keyboard.press("n")
        tab.wait_for_result("case01.jpg")
        page.click("#review .verdict[data-status='needs_correction']")
        wait_for_item(page, "case01.jpg", "needs correction")
        page.fill("#review-note", "misses the left edge")
        page.focus("#zoom-reset")
        page.wait_for_function("() => document.getElementById('review-state').textContent.includes('updated')")
        page.wait_for_function("() => review.records.get('case01.jpg').note === 'misses the left edge'")

        # Correct the mask with the brush, at the image's full resolution; undo and redo.
        page.wait_for_function("() => document.getElementById('editor').dataset.area !== undefined")
        assert page.evaluate(
            "[document.getElementById('editor-canvas').width, document.getElementById('editor-canvas').height]"
        ) == [128, 96]
        # an untouched editor follows the slider: it starts from the model's mask at the current threshold
        tab.set_threshold(0.99)
        page.wait_for_function("() => editor.threshold === 0.99 && editor.source === 'model'")
        page.focus("#zoom-reset")
        model = editor_mask(page)
        page.keyboard.press("b")
        page.evaluate("() => setBrushSize(9)")
        page.locator("#editor-canvas").scroll_into_view_if_needed()
        box = page.locator("#editor-canvas").bounding_box()
        scale = box["width"] / 128
        page.mouse.move(box["x"] + 10 * scale, box["y"] + 10 * scale)
        page.mouse.down()
        page.mouse.move(box["x"] + 60 * scale, box["y"] + 12 * scale, steps=8)
        page.mouse.up()
        painted = editor_mask(page)
        assert painted.sum() > model.sum() and painted[10:13, 15:55].all()
        page.keyboard.press("Control+z")
        np.testing.assert_array_equal(editor_mask(page), model)
        page.keyboard.press("Control+y")
        np.testing.assert_array_equal(editor_mask(page), painted)
        assert page.get_attribute("#editor", "data-dirty") == "true"
        page.click("#editor-save")
        wait_for_item(page, "case01.jpg", "mask corrected")
        saved = np.asarray(Image.open(review_dir / "masks" / "case01.png"))
        assert saved.ndim == 2 and set(np.unique(saved)) <= {0, 255}
        np.testing.assert_array_equal(saved > 0, painted)
        assert (review_dir / "images" / "case01.jpg").read_bytes() == (folder / "images" / "case01.jpg").read_bytes()
        page.screenshot(path=str(ARTIFACTS / "web_e2e_review_loop.png"), full_page=True)

        # A reload loses nothing: verdicts, the note and the corrected mask come back from the server.
        page.reload(wait_until="networkidle")
        page.wait_for_function("() => document.getElementById('status').textContent === 'Ready.'")
        page.set_input_files("#folder-input", str(folder))
        tab.wait_for_result("case00.jpg")
        wait_for_item(page, "case00.jpg", "accepted")
        wait_for_item(page, "case01.jpg", "needs correction, mask corrected")
        assert page.get_attribute("#review-summary", "data-left") == "1"
        page.click(".review-item[data-name='case01.jpg']")
        tab.wait_for_result("case01.jpg")
        page.wait_for_function("() => editor.name === 'case01.jpg' && editor.source === 'saved'")
        np.testing.assert_array_equal(editor_mask(page), painted)
        assert page.input_value("#review-note") == "misses the left edge"

        # Export: the review as CSV, the corrected data set as a zip that `polypseg data check` accepts.
        rows = list(csv.DictReader(io.StringIO(Path(tab.download("#review-export-csv").path()).read_text())))
        assert [(r["file"], r["status"], r["corrected"]) for r in rows] == [
            ("case00.jpg", "accept", "False"),
            ("case01.jpg", "needs_correction", "True"),
        ]
        assert rows[1]["note"] == "misses the left edge" and rows[1]["dice_vs_model"]
        archive = tab.download("#review-export-zip")
        assert archive.suggested_filename == "review-dataset.zip"
        import zipfile

        with zipfile.ZipFile(archive.path()) as unzip:
            unzip.extractall(tmp_path / "exported")
        result = CliRunner().invoke(cli, ["data", "check", str(tmp_path / "exported")])
        assert result.exit_code == 0, result.output
        assert not tab.errors, tab.errors
        tab.close()


def right_triangle(shape: tuple[int, int], x0: int, y0: int, leg: int) -> np.ndarray:
    """Pixels of the triangle (x0, y0), (x0 + leg, y0), (x0, y0 + leg), edges included."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx >= x0) & (yy >= y0) & ((xx - x0) + (yy - y0) <= leg)


def test_polygon_tool_fills_and_erases_at_full_resolution_under_zoom(browser, service, tmp_path: Path):
    review_dir = tmp_path / "review"
    folder = write_synthetic_dataset(tmp_path / "study", n=1, size=(96, 128))
    with reviewing(browser, service, review_dir, folder) as tab:
        page = tab.page
        tab.set_threshold(0.99)
        page.wait_for_function("() => editor.threshold === 0.99 && editor.source === 'model'")
        model = editor_mask(page)

        # Zoom at the pointer and pan with a right drag; vertices go where the brush would paint.
        viewport = page.locator("#editor-viewport")
        viewport.scroll_into_view_if_needed()
        frame = viewport.bounding_box()
        page.mouse.move(frame["x"] + frame["width"] * 0.4, frame["y"] + frame["height"] * 0.4)
        for _ in range(3):
            page.mouse.wheel(0, -100)
        page.wait_for_function("() => Number(document.getElementById('editor').dataset.zoom) > 1.9")
        page.mouse.down(button="right")
        page.mouse.move(frame["x"] + frame["width"] * 0.45, frame["y"] + frame["height"] * 0.5, steps=3)
        page.mouse.up(button="right")
        box = page.locator("#editor-canvas").bounding_box()
        to_image = lambda sx, sy: ((sx - box["x"]) / box["width"] * 128, (sy - box["y"]) / box["height"] * 96)  # noqa: E731
        left, top = (int(np.ceil(v)) + 1 for v in to_image(frame["x"], frame["y"]))
        right, bottom = (int(v) - 2 for v in to_image(frame["x"] + frame["width"], frame["y"] + frame["height"]))
        assert right - left >= 30 and bottom - top >= 24, (left, top, right, bottom)  # visible part of the image

        def at(x: int, y: int) -> tuple[float, float]:
            return box["x"] + (x + 0.5) * box["width"] / 128, box["y"] + (y + 0.5) * box["height"] / 96

        # A rectangle, closed with a double-click on its last vertex.
        page.keyboard.press("l")
        assert page.get_attribute("#editor", "data-tool") == "polygon"
        x0, y0, x1, y1 = left, top, left + 20, top + 14
        rect = np.zeros_like(model)
        rect[y0 : y1 + 1, x0 : x1 + 1] = True
        assert not model[rect].all()
        page.mouse.click(*at(x0, y0))
        page.mouse.click(*at(x1, y0))
        page.mouse.move(*at(x1, y1))
        # the live preview: the points so far and the edge to the pointer, in an SVG aligned with the canvas
        assert page.get_attribute("#editor", "data-polygon-points") == "2"
        assert len(page.get_attribute("#editor-polygon", "points").split()) == 3
        svg = page.locator("#editor-overlay").bounding_box()
        assert all(abs(svg[k] - box[k]) < 1 for k in ("x", "y", "width", "height")), (svg, box)
        ARTIFACTS.mkdir(exist_ok=True)
        viewport.screenshot(path=str(ARTIFACTS / "web_e2e_polygon.png"))
        page.mouse.click(*at(x1, y1))
        page.mouse.dblclick(*at(x0, y1))
        page.wait_for_function("() => document.getElementById('editor').dataset.polygonPoints === '0'")
        filled = editor_mask(page)
        np.testing.assert_array_equal(filled, model | rect)
        assert page.get_attribute("#editor", "data-dirty") == "true"
        # one undo step
        page.keyboard.press("Control+z")
        np.testing.assert_array_equal(editor_mask(page), model)
        page.keyboard.press("Control+y")
        np.testing.assert_array_equal(editor_mask(page), filled)

        # Escape cancels a polygon in progress: the mask and the undo history stay as they were.
        undo_steps = page.evaluate("editor.undo.length")
        for x, y in ((x0 + 2, y1 + 3), (x0 + 9, y1 + 3), (x0 + 9, y1 + 8)):
            page.mouse.click(*at(x, y))
        page.keyboard.press("Escape")
        assert page.get_attribute("#editor", "data-polygon-points") == "0"
        assert page.get_attribute("#editor-polygon", "points") == ""
        np.testing.assert_array_equal(editor_mask(page), filled)
        assert page.evaluate("editor.undo.length") == undo_steps

        # The polygon eraser (Shift+L): a fourth point taken back with Backspace, closed on the first point.
        page.keyboard.press("Shift+L")
        assert page.get_attribute("#editor", "data-tool") == "polygon-erase"
        ex, ey = x0 + 4, y0 + 2
        for x, y in ((ex, ey), (ex + 10, ey), (ex, ey + 10), (ex + 10, ey + 10)):
            page.mouse.click(*at(x, y))
        page.keyboard.press("Backspace")
        assert page.get_attribute("#editor", "data-polygon-points") == "3"
        page.keyboard.press("h")  # the pan tool keeps the polygon in progress
        assert page.get_attribute("#editor", "data-polygon-points") == "3"
        page.keyboard.press("Shift+L")
        assert page.get_attribute("#editor", "data-polygon-erase") == "true"
        page.mouse.click(*at(ex, ey))
        page.wait_for_function("() => document.getElementById('editor').dataset.polygonPoints === '0'")
        erased = editor_mask(page)
        np.testing.assert_array_equal(erased, filled & ~right_triangle(model.shape, ex, ey, 10))
        page.keyboard.press("Control+z")
        np.testing.assert_array_equal(editor_mask(page), filled)
        page.keyboard.press("Control+y")

        # A triangle added and closed with Enter, then the mask saved.
        page.keyboard.press("l")
        tx, ty = x0 + 24, y0 + 1
        for x, y in ((tx, ty), (tx + 6, ty), (tx, ty + 6)):
            page.mouse.click(*at(x, y))
        page.keyboard.press("Enter")
        added = right_triangle(model.shape, tx, ty, 6)
        final = editor_mask(page)
        np.testing.assert_array_equal(final, erased | added)
        page.keyboard.press("Control+s")
        wait_for_item(page, "case00.jpg", "mask corrected")
        saved = np.asarray(Image.open(review_dir / "masks" / "case00.png"))
        assert saved.shape == model.shape and set(np.unique(saved)) <= {0, 255}
        inside = (rect & ~right_triangle(model.shape, ex, ey, 10)) | added
        assert (saved[inside] == 255).all()
        touched = rect | added
        np.testing.assert_array_equal(saved[~touched] > 0, model[~touched])
        np.testing.assert_array_equal(saved > 0, final)
        assert not tab.errors, tab.errors
        tab.close()


def test_quality_of_life(browser, service, tmp_path: Path):
    """Difference map, brightness/contrast, Grad-CAM opacity, the sample picker, disabled buttons,
    the token messages, and no sideways scrolling on a phone."""
    from polypseg.web.app import WebSettings

    with serving(service, WebSettings(token="s3cret")) as url:
        tab = Page.__new__(Page)  # the page asks for the token before it is ready
        tab.context = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
        tab.context.set_default_timeout(HANG_MS)
        tab.page, tab.base, tab.requests, tab.errors = tab.context.new_page(), url, [], []
        page = tab.page
        page.on("request", lambda request: tab.requests.append(request.url))
        page.goto(f"{url}/")
        page.wait_for_selector("#token-form", state="visible")
        assert page.inner_text("#token-label") == "This server needs an access token:"
        page.fill("#token-input", "wrong")
        page.click("#token-form button")
        page.wait_for_function("() => document.getElementById('status').textContent.includes('refused')")
        assert page.inner_text("#token-label").startswith("The access token was refused")
        page.fill("#token-input", "s3cret")
        page.click("#token-form button")
        page.wait_for_function("() => document.getElementById('status').textContent === 'Ready.'")

        # the disabled ground-truth button looks disabled, not like the enabled secondary buttons
        disabled = page.evaluate("getComputedStyle(document.getElementById('truth-button')).backgroundColor")
        enabled = page.evaluate("getComputedStyle(document.getElementById('folder-button')).backgroundColor")
        assert disabled != enabled

        # the desktop layout gives the image most of the width
        sample = SAMPLES[8]
        page.wait_for_selector("#sample-select option:nth-child(2)", state="attached")
        page.select_option("#sample-select", sample.name)
        tab.wait_for_result(sample.name)
        assert page.evaluate("document.getElementById('view-outline').getBoundingClientRect().width") > 600

        # with ground truth: a false-positive / false-negative map matching the masks on screen
        truth = np.asarray(Image.open(MASKS / f"{sample.stem}.png").convert("RGB")).max(axis=2) > 127
        shown = tab.canvas_gray("view-mask") > 127
        assert page.is_visible("#diff-panel")
        assert page.get_attribute("#results", "data-false-positives") == str(int((shown & ~truth).sum()))
        assert page.get_attribute("#results", "data-false-negatives") == str(int((~shown & truth).sum()))

        # brightness and contrast change the image under the overlays; Grad-CAM opacity the heatmap's share
        Page.wait_for_cam(tab, "0.50")
        before = tab.canvas_rgb("view-outline").astype(int)
        cam_before = tab.canvas_rgb("view-cam").astype(int)
        for slider, value in (("brightness", 150), ("contrast", 80), ("cam-opacity", 0)):
            page.fill(f"#{slider}", str(value))
            page.dispatch_event(f"#{slider}", "input")
            page.wait_for_function(
                "([id, v]) => document.getElementById(id + '-value').textContent === v + ' %'", arg=[slider, value]
            )
        page.wait_for_timeout(200)  # the redraw waits for the next animation frame
        outside = ~shown
        assert tab.canvas_rgb("view-outline").astype(int)[outside].mean() > before[outside].mean() + 10
        if page.get_attribute("#cam-panel", "data-state") == "ready":
            assert np.abs(tab.canvas_rgb("view-cam").astype(int) - cam_before).max() > 10

        # analysing a file resets the sample picker: it never names an image that is not on screen
        tab.upload(SAMPLES[9])
        tab.wait_for_result(SAMPLES[9].name)
        assert page.input_value("#sample-select") == ""

        # a phone (390 px): nothing scrolls sideways
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert not [e for e in tab.errors if "status of 401" not in e], tab.errors
        tab.context.close()


# ----------------------------------------------------------------------------------- the editor keeps no one's edits by mistake


def paint(page, start: tuple[int, int], end: tuple[int, int], width: int = 128) -> None:
    """A brush stroke in the editor between two image pixels (x, y)."""
    canvas = page.locator("#editor-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    scale = box["width"] / width
    page.mouse.move(box["x"] + start[0] * scale, box["y"] + start[1] * scale)
    page.mouse.down()
    page.mouse.move(box["x"] + end[0] * scale, box["y"] + end[1] * scale, steps=4)
    page.mouse.up()


def wait_for_editor(page, name: str, source: str) -> None:
    page.wait_for_function(
        "([name, source]) => editor.name === name && editor.source === source && !editor.loading", arg=[name, source]
    )


def held_requests(page, pattern: str, method: str) -> list:
    """Requests to ``pattern`` with ``method`` are held (not sent) until the test continues them."""
    held: list = []
    page.route(pattern, lambda route: held.append(route) if route.request.method == method else route.continue_())
    return held


def wait_until(page, condition: Callable[[], object]) -> None:
    """Wait for a condition outside the page (a held request, the server's state), letting the page run."""
    deadline = time.monotonic() + HANG_MS / 1000
    while not condition():
        assert time.monotonic() < deadline, "the state never came"
        page.wait_for_timeout(20)


def test_a_new_image_starts_with_its_own_mask_and_an_empty_history(browser, service, tmp_path: Path):
    """Undo on a fresh image never brings back the previous image's mask; while an image's saved
    correction loads, the editor shows no mask and its tools and Ctrl+S do nothing."""
    review_dir = tmp_path / "review"
    folder = write_synthetic_dataset(tmp_path / "study", n=2, size=(96, 128))
    with reviewing(browser, service, review_dir, folder) as tab:
        page = tab.page
        wait_for_editor(page, "case00.jpg", "model")
        paint(page, (10, 10), (100, 80))  # case00's mask, very unlike case01's
        page.keyboard.press("Control+s")
        wait_for_item(page, "case00.jpg", "mask corrected")
        corrected = editor_mask(page)

        page.keyboard.press("n")
        wait_for_editor(page, "case01.jpg", "model")
        model = editor_mask(page)
        assert page.evaluate("editor.undo.length") == 0 and page.is_disabled("#editor-undo")
        page.keyboard.press("Control+z")
        np.testing.assert_array_equal(editor_mask(page), model)
        assert page.get_attribute("#editor", "data-dirty") == "false"
        tab.set_threshold(0.3)  # an untouched editor follows the slider; that is no step to undo
        page.wait_for_function("() => editor.threshold === 0.3")
        assert page.evaluate("editor.undo.length") == 0 and page.is_disabled("#editor-undo")

        # back to case00 with its saved mask held on the way: nothing of case01 is shown or saved as case00's
        held = held_requests(page, "**/v1/reviews/case00.jpg/mask", "GET")
        page.keyboard.press("p")
        tab.wait_for_result("case00.jpg")
        wait_until(page, lambda: held)
        assert page.evaluate("editor.name === 'case00.jpg' && editor.mask === null")
        assert page.inner_text("#editor-state").startswith("Loading")
        puts: list[str] = []
        page.on("request", lambda request: puts.append(request.url) if request.method == "PUT" else None)
        paint(page, (20, 60), (60, 60))
        page.keyboard.press("Control+s")
        page.click("#editor-save")
        held[0].continue_()
        wait_for_editor(page, "case00.jpg", "saved")
        np.testing.assert_array_equal(editor_mask(page), corrected)
        assert page.get_attribute("#editor", "data-dirty") == "false"
        assert puts == []
        assert not tab.errors, tab.errors
        tab.close()


def test_strokes_made_while_a_save_is_in_flight_stay_unsaved(browser, service, tmp_path: Path):
    review_dir = tmp_path / "review"
    folder = write_synthetic_dataset(tmp_path / "study", n=1, size=(96, 128))
    with reviewing(browser, service, review_dir, folder) as tab:
        page = tab.page
        wait_for_editor(page, "case00.jpg", "model")
        page.evaluate("() => setBrushSize(9)")
        paint(page, (10, 10), (60, 10))
        first = editor_mask(page)
        held = held_requests(page, "**/v1/reviews/case00.jpg/mask?*", "PUT")
        page.click("#editor-save")
        wait_until(page, lambda: held)
        paint(page, (10, 80), (60, 80))  # while the first stroke's mask is on its way
        both = editor_mask(page)
        held[0].continue_()
        wait_for_item(page, "case00.jpg", "mask corrected")
        np.testing.assert_array_equal(np.asarray(Image.open(review_dir / "masks" / "case00.png")) > 0, first)
        assert page.get_attribute("#editor", "data-dirty") == "true"
        assert "not saved" in page.inner_text("#editor-state")
        np.testing.assert_array_equal(editor_mask(page), both)
        assert not tab.errors, tab.errors
        tab.close()


def test_leaving_an_image_asks_about_unsaved_edits_and_keeps_the_note(browser, service, tmp_path: Path):
    review_dir = tmp_path / "review"
    folder = write_synthetic_dataset(tmp_path / "study", n=2, size=(96, 128))
    with reviewing(browser, service, review_dir, folder) as tab:
        page = tab.page
        wait_for_editor(page, "case00.jpg", "model")
        paint(page, (10, 10), (60, 10))
        edited = editor_mask(page)
        dialogs: list[str] = []

        def answer(dialog, accept: bool) -> None:
            dialogs.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        # Next with unsaved edits asks; "cancel" stays on the image with the edits
        page.once("dialog", lambda dialog: answer(dialog, False))
        page.click("#nav-next")
        assert dialogs and "case00.jpg" in dialogs[0]
        assert page.evaluate("state.result.name") == "case00.jpg"
        np.testing.assert_array_equal(editor_mask(page), edited)
        # "OK" leaves them
        page.once("dialog", lambda dialog: answer(dialog, True))
        page.click(".review-item[data-name='case01.jpg']")
        tab.wait_for_result("case01.jpg")
        assert len(dialogs) == 2

        # a note is saved while it is typed, and one typed just before a reload is not lost
        url = f"{tab.base}/v1/reviews/case01.jpg"
        page.fill("#review-note", "flat lesion at 3 o'clock")
        wait_until(page, lambda: httpx.get(url).status_code == 200)
        assert httpx.get(url).json()["note"] == "flat lesion at 3 o'clock"
        page.fill("#review-note", "flat lesion at 4 o'clock")
        page.reload(wait_until="networkidle")
        wait_until(page, lambda: httpx.get(url).json()["note"] == "flat lesion at 4 o'clock")
        assert len(dialogs) == 2  # no unsaved mask edits: the reload did not ask
        tab.close()


def test_the_page_reads_the_review_record_of_each_image_it_opens(browser, service, tmp_path: Path):
    """A correction or verdict saved in another tab is what the page starts from, and a note sent
    from this page keeps a verdict set elsewhere."""
    review_dir = tmp_path / "review"
    folder = write_synthetic_dataset(tmp_path / "study", n=2, size=(96, 128))
    with reviewing(browser, service, review_dir, folder) as tab:
        page = tab.page
        wait_for_editor(page, "case00.jpg", "model")
        elsewhere = np.zeros((96, 128), np.uint8)
        elsewhere[20:40, 30:70] = 255
        image = (folder / "images" / "case01.jpg").read_bytes()
        api = f"{tab.base}/v1/reviews"
        answer = httpx.put(
            f"{api}/case01.jpg/mask",
            files={"mask": ("case01.png", _png(elsewhere), "image/png"), "file": ("case01.jpg", image, "image/jpeg")},
        )
        assert answer.status_code == 200, answer.text
        assert httpx.put(f"{api}/case00.jpg", json={"status": "reject"}).status_code == 200

        page.fill("#review-note", "seen twice")  # on case00, whose verdict was set in the other tab
        wait_until(page, lambda: httpx.get(f"{api}/case00.jpg").json()["note"] == "seen twice")
        assert httpx.get(f"{api}/case00.jpg").json()["status"] == "reject"

        page.focus("#zoom-reset")
        page.keyboard.press("n")
        wait_for_editor(page, "case01.jpg", "saved")
        np.testing.assert_array_equal(editor_mask(page), elsewhere > 0)
        wait_for_item(page, "case01.jpg", "mask corrected")
        assert not tab.errors, tab.errors
        tab.close()


def test_a_model_threshold_between_slider_steps_is_used_exactly(browser, tmp_path: Path):
    config = tiny_config(image_size=64)
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "tiny", create_model(config.model), config, threshold=0.4375)
    with BackgroundServer(create_app(InferenceService.from_checkpoint(path, device="cpu"))) as url:
        tab = Page(browser, url)
        page = tab.page
        assert "threshold 0.4375" in page.inner_text("#model-info")
        tab.upload(SAMPLES[0])
        tab.wait_for_result(SAMPLES[0].name)
        assert page.inner_text("#threshold-value") == "0.4375"
        assert page.get_attribute("#results", "data-rendered-threshold") == "0.4375"
        served = httpx.post(f"{url}/v1/segment", files={"file": (SAMPLES[0].name, SAMPLES[0].read_bytes())}).json()
        assert served["threshold"] == 0.4375 and tab.shown_area() == served["area_pixels"]
        tab.wait_for_cam("0.4375")
        assert tab.download("#download-mask").suggested_filename.endswith("_mask_t0.4375.png")
        tab.set_threshold(0.6)
        page.click("#threshold-reset")
        page.wait_for_function("() => document.getElementById('results').dataset.renderedThreshold === '0.4375'")
        assert not tab.errors, tab.errors
        tab.close()


def test_ground_truth_is_read_by_the_library_rule_or_refused(browser, service, tmp_path: Path):
    """A 0/1 label map is foreground where 1, as polypseg reads it; a file the browser cannot read
    the same way is refused with polypseg's Dice, never shown with a wrong one."""
    sample = SAMPLES[0]
    truth = np.asarray(Image.open(MASKS / f"{sample.stem}.png").convert("L")) > 127
    labels = tmp_path / "labels.png"
    Image.fromarray(truth.astype(np.uint8)).save(labels)
    tiff = tmp_path / "truth.tif"
    Image.fromarray(truth.astype(np.uint8) * 255).save(tiff)
    with serving(service) as url:
        tab = Page(browser, url)
        page = tab.page
        tab.upload(sample)
        tab.wait_for_result(sample.name)
        page.set_input_files("#truth-input", str(labels))
        page.wait_for_function(
            "() => document.getElementById('status').textContent.includes('compared with labels.png')"
        )
        shown = tab.canvas_gray("view-mask") > 127
        assert page.inner_text("#dice") == f"{2 * (shown & truth).sum() / (shown.sum() + truth.sum()):.3f}"
        assert page.evaluate("state.result.truth.reduce((s, v) => s + v, 0)") == int(truth.sum())

        page.set_input_files("#truth-input", str(tiff))
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('truth.tif')")
        assert "polypseg's Dice" in page.inner_text("#status")
        assert page.evaluate("state.result.truthName") == "labels.png"  # the refused file replaced nothing
        tab.close()
