"use strict";
// polypseg page: talks to /v1 only (same origin), re-thresholds the probability map in the
// browser so the slider never reruns the model. No external hosts, no analytics.

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "polypseg-token";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  retry: null,          // action to repeat once a token is entered
  width: 0,
  height: 0,
  prob: null,           // Uint8Array, round(p * 255), row-major
  image: null,          // ImageBitmap of the decoded input
  modelThreshold: 0.5,
  name: "image",
  busy: false,
};

// ------------------------------------------------------------------ API

class ApiError extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  if (response.status === 401) {
    $("token-form").hidden = false;
    $("token-input").focus();
    throw new ApiError("This server needs an access token; enter it above.");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error) message = body.error;
    } catch (_) { /* not JSON */ }
    if (response.status === 503) message += " (the server is busy; try again in a moment)";
    throw new ApiError(message);
  }
  return response;
}

const apiJson = async (path, options) => (await api(path, options)).json();

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = `status ${kind}`;
}

// ------------------------------------------------------------------ model info and samples

function formatMetric(value) {
  if (Array.isArray(value)) return `${value[0].toFixed(3)} ± ${value[1].toFixed(3)}`;
  if (typeof value === "number") return value.toFixed(3);
  return null;
}

function pickDice(info) {
  const cv = info.cross_validation;
  if (cv && cv.mean_std) {
    const block = cv.mean_std.at_chosen || cv.mean_std["at_0.5"];
    if (block && block.dice !== undefined) return `CV Dice ${formatMetric(block.dice)}`;
  }
  const metrics = info.metrics || {};
  for (const key of ["dice", "val_dice", "test_dice"]) {
    if (typeof metrics[key] === "number") return `${key.replace("_", " ")} ${metrics[key].toFixed(3)}`;
  }
  return null;
}

async function loadModelInfo() {
  const info = await apiJson("/v1/model");
  const arch = info.architecture || {};
  const parts = [`${arch.arch || "model"} / ${arch.encoder || "?"}`];
  if (info.ensemble && info.ensemble.models > 1) parts.push(`${info.ensemble.models}-model ensemble`);
  parts.push(`${arch.input_size}px input`);
  parts.push(`threshold ${Number(info.threshold).toFixed(2)}`);
  const dice = pickDice(info);
  if (dice) parts.push(dice);
  if (info.training && info.training.data) parts.push(`trained on ${info.training.data}`);
  $("model-info").textContent = parts.join(" · ");
  state.modelThreshold = Number(info.threshold);
  setThreshold(state.modelThreshold);
}

async function loadSamples() {
  const body = await apiJson("/v1/samples");
  const select = $("sample-select");
  for (const name of body.samples) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.append(option);
  }
  select.disabled = body.samples.length === 0;
}

async function init() {
  try {
    const health = await apiJson("/v1/health");
    $("max-frames").textContent = String(health.limits.max_video_frames);
    await loadModelInfo();
    await loadSamples();
    $("token-form").hidden = true;
    setStatus("Ready.");
  } catch (error) {
    state.retry = init;
    setStatus(error.message, "error");
  }
}

// ------------------------------------------------------------------ analysis

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new ApiError("the browser could not decode the server's image"));
    img.src = src;
  });
}

async function decodeGrayPng(base64, width, height) {
  const img = await loadImage(`data:image/png;base64,${base64}`);
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const gray = new Uint8Array(width * height);
  for (let i = 0; i < gray.length; i++) gray[i] = rgba[i * 4];
  return gray;
}

async function analyse(blob, name) {
  if (state.busy) return;
  state.busy = true;
  state.retry = () => analyse(blob, name);
  setStatus(`Analysing ${name}…`, "busy");
  try {
    const form = () => { const f = new FormData(); f.append("file", blob, name); return f; };
    const [seg, cam] = await Promise.all([
      apiJson("/v1/segment?include_probability=true&include_image=true", { method: "POST", body: form() }),
      // Segmentation is shown even when Grad-CAM fails (e.g. a server running an ONNX model).
      apiJson("/v1/explain?include_overlay=true", { method: "POST", body: form() }).catch((error) => ({ error: error.message })),
    ]);
    state.width = seg.width;
    state.height = seg.height;
    state.name = name.replace(/\.[^.]+$/, "");
    state.prob = await decodeGrayPng(seg.probability_png_base64, seg.width, seg.height);
    state.image = await loadImage(`data:image/jpeg;base64,${seg.image_jpeg_base64}`);
    state.modelThreshold = seg.threshold;
    if (cam.error) {
      $("view-cam").removeAttribute("src");
      $("cam-caption").textContent = `Grad-CAM unavailable: ${cam.error}`;
    } else {
      $("view-cam").src = `data:image/png;base64,${cam.overlay_png_base64}`;
      $("cam-caption").textContent = `Grad-CAM (final decoder block${seg.n_models > 1 ? ", fold 0" : ""})`;
    }
    drawMap($("view-prob"), state.prob, seg.width, seg.height);
    const hasUncertainty = Boolean(seg.uncertainty_png_base64);
    $("uncertainty-panel").hidden = !hasUncertainty;
    $("uncertainty-stat").hidden = !hasUncertainty;
    if (hasUncertainty) {
      const unc = await decodeGrayPng(seg.uncertainty_png_base64, seg.width, seg.height);
      drawMap($("view-uncertainty"), unc, seg.width, seg.height);
      $("uncertainty").textContent = `mean std ${seg.mean_uncertainty.toFixed(3)}`;
    }
    $("image-size").textContent = `${seg.width} × ${seg.height} px`;
    $("video-results").hidden = true;
    $("results").hidden = false;
    setThreshold(seg.threshold);
    setStatus(`${name}: done in ${seg.seconds.toFixed(2)} s.`, "ok");
  } catch (error) {
    setStatus(`${name}: ${error.message}`, "error");
  } finally {
    state.busy = false;
  }
}

// ------------------------------------------------------------------ drawing

// Perceptually ordered dark-to-bright map (viridis anchors), interpolated to 256 entries.
const LUT = (() => {
  const anchors = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const lut = new Uint8ClampedArray(256 * 3);
  for (let v = 0; v < 256; v++) {
    const x = (v / 255) * (anchors.length - 1);
    const i = Math.min(Math.floor(x), anchors.length - 2);
    const f = x - i;
    for (let c = 0; c < 3; c++) lut[v * 3 + c] = anchors[i][c] + f * (anchors[i + 1][c] - anchors[i][c]);
  }
  return lut;
})();

function drawMap(canvas, values, width, height) {
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(width, height);
  for (let i = 0; i < values.length; i++) {
    const v = values[i] * 3;
    out.data[i * 4] = LUT[v];
    out.data[i * 4 + 1] = LUT[v + 1];
    out.data[i * 4 + 2] = LUT[v + 2];
    out.data[i * 4 + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
}

function render() {
  if (!state.prob) return;
  const { width, height, prob } = state;
  const threshold = Number($("threshold").value);
  // Same rule as the server: foreground where p >= threshold (p quantised to 1/255 here).
  const cut = threshold * 255;
  const mask = new Uint8Array(width * height);
  let area = 0;
  let confidence = 0;
  for (let i = 0; i < prob.length; i++) {
    if (prob[i] >= cut) {
      mask[i] = 1;
      area++;
      confidence += prob[i];
    }
  }

  const maskCanvas = $("view-mask");
  maskCanvas.width = width;
  maskCanvas.height = height;
  const mctx = maskCanvas.getContext("2d");
  const mdata = mctx.createImageData(width, height);
  for (let i = 0; i < mask.length; i++) {
    const v = mask[i] ? 255 : 0;
    mdata.data[i * 4] = v;
    mdata.data[i * 4 + 1] = v;
    mdata.data[i * 4 + 2] = v;
    mdata.data[i * 4 + 3] = 255;
  }
  mctx.putImageData(mdata, 0, 0);

  const outline = $("view-outline");
  outline.width = width;
  outline.height = height;
  const octx = outline.getContext("2d", { willReadFrequently: true });
  octx.drawImage(state.image, 0, 0, width, height);
  const over = octx.getImageData(0, 0, width, height);
  const radius = Math.max(1, Math.round(Math.max(width, height) / 300));
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      if (!mask[i]) continue;
      const edge = x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
        !mask[i - 1] || !mask[i + 1] || !mask[i - width] || !mask[i + width];
      if (!edge) continue;
      for (let dy = -radius + 1; dy < radius; dy++) {
        for (let dx = -radius + 1; dx < radius; dx++) {
          const yy = y + dy;
          const xx = x + dx;
          if (yy < 0 || xx < 0 || yy >= height || xx >= width) continue;
          const j = (yy * width + xx) * 4;
          over.data[j] = 0;
          over.data[j + 1] = 255;
          over.data[j + 2] = 120;
        }
      }
    }
  }
  octx.putImageData(over, 0, 0);

  const total = width * height;
  $("area").textContent = `${((100 * area) / total).toFixed(2)} % (${area.toLocaleString("en")} px)`;
  $("confidence").textContent = area ? (confidence / area / 255).toFixed(3) : "– (no polyp above threshold)";
  updateDownload($("download-mask"), maskCanvas, `${state.name}_mask.png`);
  updateDownload($("download-overlay"), outline, `${state.name}_overlay.png`);
  $("results").dataset.renderedThreshold = threshold.toFixed(2);
}

function updateDownload(link, canvas, filename) {
  canvas.toBlob((blob) => {
    if (!blob) return;
    if (link.dataset.url) URL.revokeObjectURL(link.dataset.url);
    const url = URL.createObjectURL(blob);
    link.dataset.url = url;
    link.href = url;
    link.download = filename;
  }, "image/png");
}

function setThreshold(value) {
  const slider = $("threshold");
  slider.value = String(value);
  $("threshold-value").textContent = Number(slider.value).toFixed(2);
  render();
}


// ------------------------------------------------------------------ video

const video = { result: null, masks: new Map(), url: null, frame: -1 };

function decodeRle(rle) {
  // COCO uncompressed RLE, column-major -> row-major Uint8Array
  const [height, width] = rle.size;
  const mask = new Uint8Array(height * width);
  let position = 0;
  rle.counts.forEach((count, run) => {
    if (run % 2 === 1) {
      for (let k = position; k < position + count; k++) {
        const x = Math.floor(k / height);
        const y = k - x * height;
        mask[y * width + x] = 1;
      }
    }
    position += count;
  });
  return mask;
}

function frameAt(seconds) {
  const rows = video.result.per_frame;
  let lo = 0;
  let hi = rows.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (rows[mid].time_s <= seconds + 1e-3) lo = mid; else hi = mid - 1;
  }
  return lo;
}

function drawVideoOverlay(index) {
  if (!video.result || index === video.frame) return;
  video.frame = index;
  const { width, height } = video.result;
  const canvas = $("video-overlay");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(width, height);
  if (video.result.masks_rle) {
    if (!video.masks.has(index)) video.masks.set(index, decodeRle(video.result.masks_rle[index]));
    const mask = video.masks.get(index);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const i = y * width + x;
        if (!mask[i]) continue;
        const edge = x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
          !mask[i - 1] || !mask[i + 1] || !mask[i - width] || !mask[i + width];
        const j = i * 4;
        out.data[j + 1] = 255;
        out.data[j + 2] = 120;
        out.data[j + 3] = edge ? 255 : 50;
      }
    }
  }
  ctx.putImageData(out, 0, 0);
  const row = video.result.per_frame[index];
  $("video-current").textContent =
    `${index + 1} / ${video.result.frames} · area ${(100 * row.area_fraction).toFixed(2)} % · confidence ${row.mean_confidence.toFixed(3)}`;
  drawChart(index);
  $("video-results").dataset.renderedFrame = String(index);
}

function drawChart(cursor) {
  const canvas = $("video-chart");
  const ctx = canvas.getContext("2d");
  const rows = video.result.per_frame;
  const w = canvas.width;
  const h = canvas.height;
  const pad = 30;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, w, h);
  ctx.strokeStyle = "#d8dde6";
  ctx.fillStyle = "#5b6474";
  ctx.font = "12px system-ui, sans-serif";
  for (const v of [0, 0.5, 1]) {
    const y = h - pad - v * (h - 2 * pad);
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w - 10, y); ctx.stroke();
    ctx.fillText(v.toFixed(1), 4, y + 4);
  }
  const x = (i) => pad + (rows.length > 1 ? (i / (rows.length - 1)) * (w - pad - 10) : 0);
  const series = [["area_fraction", "#1a7f37"], ["mean_confidence", "#d97706"]];
  for (const [key, color] of series) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    rows.forEach((row, i) => {
      const y = h - pad - row[key] * (h - 2 * pad);
      if (i === 0) ctx.moveTo(x(i), y); else ctx.lineTo(x(i), y);
    });
    ctx.stroke();
  }
  ctx.lineWidth = 1;
  ctx.strokeStyle = "#1f6feb";
  ctx.beginPath(); ctx.moveTo(x(cursor), pad / 2); ctx.lineTo(x(cursor), h - pad); ctx.stroke();
  ctx.fillStyle = "#5b6474";
  ctx.fillText("frame", w / 2 - 15, h - 8);
}

function followVideo() {
  const element = $("video");
  const tick = () => {
    if (video.result) drawVideoOverlay(frameAt(element.currentTime));
    if (!element.paused && !element.ended) requestAnimationFrame(tick);
  };
  element.addEventListener("play", () => requestAnimationFrame(tick));
  element.addEventListener("seeked", tick);
  element.addEventListener("loadeddata", tick);
  element.addEventListener("error", () => {
    $("video-caption").textContent = "This browser cannot play the file; the outline shows the first frame's mask only.";
  });
}

async function analyseVideo(file, name) {
  if (state.busy) return;
  state.busy = true;
  state.retry = () => analyseVideo(file, name);
  setStatus(`Analysing ${name} frame by frame…`, "busy");
  try {
    const form = new FormData();
    form.append("file", file, name);
    const result = await apiJson("/v1/segment-video?include_masks=true", { method: "POST", body: form });
    video.result = result;
    video.masks.clear();
    video.frame = -1;
    if (video.url) URL.revokeObjectURL(video.url);
    video.url = URL.createObjectURL(file);
    $("video").src = video.url;
    $("video-frames").textContent = String(result.frames);
    $("video-fps").textContent = `${result.fps} fps`;
    $("video-threshold").textContent = result.threshold.toFixed(2);
    $("video-consistency").textContent = result.consistency.toFixed(3);
    $("video-warning").hidden = !result.warning;
    $("video-warning").textContent = result.warning || "";
    $("results").hidden = true;
    $("video-results").hidden = false;
    drawVideoOverlay(0);
    setStatus(`${name}: ${result.frames} frames done in ${result.seconds.toFixed(2)} s.`, "ok");
  } catch (error) {
    setStatus(`${name}: ${error.message}`, "error");
  } finally {
    state.busy = false;
  }
}

followVideo();

// ------------------------------------------------------------------ events

let frame = 0;
$("threshold").addEventListener("input", () => {
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  cancelAnimationFrame(frame);
  frame = requestAnimationFrame(render);
});
$("threshold-reset").addEventListener("click", () => setThreshold(state.modelThreshold));

const VIDEO_EXTENSIONS = /\.(mp4|m4v|avi|mov|mkv|webm|mpe?g)$/i;
const isVideo = (file) => (file.type || "").startsWith("video/") || VIDEO_EXTENSIONS.test(file.name);
const analyseFile = (file) => (isVideo(file) ? analyseVideo(file, file.name) : analyse(file, file.name));

$("file-input").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) analyseFile(file);
  event.target.value = "";
});

$("sample-select").addEventListener("change", async (event) => {
  const name = event.target.value;
  if (!name) return;
  try {
    const blob = await (await api(`/v1/samples/${encodeURIComponent(name)}`)).blob();
    await analyse(blob, name);
  } catch (error) {
    setStatus(`${name}: ${error.message}`, "error");
  }
});

const zone = $("drop-zone");
zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) analyseFile(file);
});
zone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") $("file-input").click();
});

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token-input").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("token-form").hidden = true;
  const retry = state.retry || init;
  state.retry = null;
  if (retry !== init) init();
  retry();
});

init();
