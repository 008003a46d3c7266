"use strict";
// polypseg page: talks to /v1 only (same origin), re-thresholds the probability map in the
// browser so the slider never reruns the segmentation model. No external hosts, no analytics.

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "polypseg-token";

// Colour-blind-safe colours: prediction blue, ground truth yellow (Okabe-Ito), distinguishable
// with any common colour-vision deficiency and against reddish mucosa.
const PRED_RGB = [0, 180, 255];
const TRUTH_RGB = [255, 200, 0];

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  retry: null,          // action to repeat once a token is entered
  generation: 0,        // every new analysis increments it; late answers of older ones are dropped
  controller: null,     // AbortController of the analysis in flight
  modelThreshold: 0.5,
  threshold: 0.5,       // in use: the model's own, exactly, until the slider is moved (see currentThreshold)
  modelLabel: "",
  samples: [],
  sampleMasks: new Set(),
  nav: null,            // {kind: "samples" | "files", items: [...], index}
  result: null,         // the image on screen (see showResult)
  measurements: new Map(), // file name -> row of the CSV export
  view: { scale: 1, x: 0, y: 0 }, // zoom and pan shared by every panel (x, y in % of the panel)
};

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  if (response.status === 401) {
    $("token-form").hidden = false;
    $("token-input").focus();
    const refused = Boolean(state.token);
    $("token-label").textContent = refused ? "The access token was refused; enter the right one:"
      : "This server needs an access token:";
    throw new ApiError(refused ? "The access token was refused; enter the right one above."
      : "This server needs an access token; enter it above.", 401);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error) message = body.error;
    } catch (_) { /* not JSON */ }
    if (response.status === 503) message += " (the server is busy; try again in a moment)";
    throw new ApiError(message, response.status);
  }
  return response;
}

const apiJson = async (path, options) => (await api(path, options)).json();

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = `status ${kind}`;
}

// "name: message", without repeating the name when the server's message already starts with it.
function named(name, message) {
  return message.startsWith(`${name}:`) || message.startsWith(`${name} `) ? message : `${name}: ${message}`;
}

const isAbort = (error) => error && error.name === "AbortError";

// The threshold of the mask on screen. The slider moves in steps of 0.01, so it cannot hold a model
// threshold such as 0.4375: the page keeps the exact value until the reviewer moves the slider.
const currentThreshold = () => state.threshold;

// Two decimals, or as many as the threshold needs (0.4375 stays 0.4375).
function thresholdText(threshold) {
  const two = threshold.toFixed(2);
  return Math.abs(Number(two) - threshold) < 1e-9 ? two : String(Number(threshold.toFixed(6)));
}

// Whether the page may leave the image on screen (the review script asks about unsaved edits).
const mayLeave = () => (typeof reviewCanLeave === "function" ? reviewCanLeave() : true);

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
  if (metrics.test && typeof metrics.test.dice === "number") return `held-out Dice ${metrics.test.dice.toFixed(3)}`;
  const validation = metrics.validation || metrics;
  for (const key of ["val_dice", "dice", "test_dice"]) {
    if (typeof validation[key] === "number") return `${key.replace("_", " ")} ${validation[key].toFixed(3)}`;
  }
  return null;
}

async function loadModelInfo() {
  const info = await apiJson("/v1/model");
  const arch = info.architecture || {};
  const parts = [`${arch.arch || "model"} / ${arch.encoder || "?"}`];
  if (info.ensemble && info.ensemble.models > 1) parts.push(`${info.ensemble.models}-model ensemble`);
  parts.push(`${arch.input_size}px input`);
  parts.push(`threshold ${thresholdText(Number(info.threshold))}`);
  const dice = pickDice(info);
  if (dice) parts.push(dice);
  if (info.training && info.training.data) parts.push(`trained on ${info.training.data}`);
  state.modelLabel = parts.join(" · ");
  $("model-info").textContent = state.modelLabel;
  state.modelThreshold = Number(info.threshold);
  state.threshold = state.modelThreshold;
  $("threshold").value = String(state.modelThreshold);
  $("threshold-value").textContent = thresholdText(state.threshold);
}

async function loadSamples() {
  const body = await apiJson("/v1/samples");
  state.samples = body.samples;
  state.sampleMasks = new Set(body.masks || []);
  const select = $("sample-select");
  for (const name of body.samples) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = state.sampleMasks.has(name) ? `${name} (with ground truth)` : name;
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
    if (typeof reviewInit === "function") await reviewInit(Boolean(health.review));
    $("token-form").hidden = true;
    setStatus("Ready.");
  } catch (error) {
    state.retry = init;
    setStatus(error.message, "error");
  }
}

// ------------------------------------------------------------------ decoding helpers

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new ApiError("the browser could not decode the image"));
    img.src = src;
  });
}

async function pixelsOf(src, width, height) {
  const img = await loadImage(src);
  if (width === undefined) { width = img.naturalWidth; height = img.naturalHeight; }
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  return { img, data: ctx.getImageData(0, 0, width, height).data, width, height };
}

async function decodeGrayPng(base64, width, height) {
  const { data } = await pixelsOf(`data:image/png;base64,${base64}`, width, height);
  const gray = new Uint8Array(width * height);
  for (let i = 0; i < gray.length; i++) gray[i] = data[i * 4];
  return gray;
}

// The exact probabilities (little-endian float32): the page thresholds what the server thresholds,
// so screen, API and Grad-CAM agree on every pixel at every threshold.
function decodeFloat32(base64, count) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  if (bytes.length !== count * 4) throw new ApiError(`probability map of ${bytes.length} bytes, expected ${count * 4}`);
  const view = new DataView(bytes.buffer);
  const values = new Float32Array(count);
  for (let i = 0; i < count; i++) values[i] = view.getFloat32(i * 4, true);
  return values;
}

// A mask file as the browser decodes it: the brightest colour channel of each pixel, 8 bits.
async function maskPixels(blob, name) {
  const url = URL.createObjectURL(blob);
  try {
    const probe = await loadImage(url).catch(() => { throw new ApiError(`${name}: the browser cannot read this mask file`); });
    const { data, width, height } = await pixelsOf(url, probe.naturalWidth, probe.naturalHeight);
    const values = new Uint8Array(width * height);
    for (let i = 0; i < values.length; i++) values[i] = Math.max(data[i * 4], data[i * 4 + 1], data[i * 4 + 2]);
    return { values, width, height };
  } finally {
    URL.revokeObjectURL(url);
  }
}

// A 0/255 mask file (a saved correction) -> Uint8Array 0/1 at its own size.
async function decodeMaskBlob(blob, name) {
  const { values, width, height } = await maskPixels(blob, name);
  return { mask: values.map((v) => (v > 127 ? 1 : 0)), width, height };
}

// ------------------------------------------------------------------ analysis

function clearResults() {
  // Nothing of the previous image may stay on screen under the next one's name.
  state.result = null;
  $("results").hidden = true;
  $("video-results").hidden = true;
  $("truth-button").disabled = true;
}

// Starts a new analysis: cancels the one in flight (the newest choice wins) and clears the screen.
function beginAnalysis(name) {
  if (state.controller) state.controller.abort();
  clearTimeout(explainTimer);
  if (explainController) explainController.abort();
  state.controller = new AbortController();
  state.generation += 1;
  clearResults();
  setStatus(`Analysing ${name}…`, "busy");
  return { generation: state.generation, signal: state.controller.signal };
}

const current = (job) => job.generation === state.generation;

// source: {name, blob, truth?: {blob, name} | null} or {name, load: async (signal) => ({blob, truth})}
async function analyse(source) {
  const { name } = source;
  const job = beginAnalysis(name);
  state.retry = () => analyse(source);
  try {
    if (source.load) source = { name, ...(await source.load(job.signal)) };
    if (!current(job)) return;
    const { blob, truth } = source;
    let truthNote = "";
    let seg;
    try {
      seg = await segmentForPage(blob, name, truth, job.signal);
    } catch (error) {
      // A ground truth the server cannot use (unreadable, another size) leaves the image analysed without it.
      if (!truth || isAbort(error) || !error.message.startsWith(`${uploadName(truth.name)}:`)) throw error;
      truthNote = ` Ground truth not shown: ${error.message}`;
      seg = await segmentForPage(blob, name, null, job.signal);
    }
    if (!current(job)) return;
    const prob = decodeFloat32(seg.probability_f32_base64, seg.width * seg.height);
    const image = await loadImage(`data:image/jpeg;base64,${seg.image_jpeg_base64}`);
    let uncertainty = null;
    if (seg.uncertainty_png_base64) uncertainty = await decodeGrayPng(seg.uncertainty_png_base64, seg.width, seg.height);
    if (!current(job)) return;
    const result = {
      name, blob, width: seg.width, height: seg.height, prob, image, uncertainty,
      meanUncertainty: seg.mean_uncertainty, nModels: seg.n_models,
      truth: null, truthName: null, cam: null, camThreshold: null, camPending: null,
      mask: null, area: 0, seconds: seg.seconds,
    };
    if (truth && !truthNote) {
      try {
        await attachTruth(result, truth.blob, truth.name, seg);
      } catch (error) {
        truthNote = ` Ground truth not shown: ${error.message}`;
      }
      if (!current(job)) return;
    }
    state.modelThreshold = seg.threshold;
    showResult(result);
    setStatus(`${name}: done in ${seg.seconds.toFixed(2)} s.${truthNote}`, truthNote ? "error" : "ok");
    requestExplain();
  } catch (error) {
    if (isAbort(error) || !current(job)) return;
    clearResults();
    setStatus(named(name, error.message), "error");
  } finally {
    if (current(job)) state.controller = null;
  }
}

const uploadName = (path) => path.split("/").pop();

function checkTruthSize({ width, height }, result, truthName) {
  if (width !== result.width || height !== result.height) {
    throw new ApiError(`${truthName} is ${width} × ${height} px, the image ${result.width} × ${result.height} px`);
  }
}

// The page's /v1/segment request: the exact probabilities and the image; with a ground truth, the
// server's Dice and truth area too (the server reads the truth by polypseg's mask rule).
async function segmentForPage(blob, name, truth, signal) {
  const form = new FormData();
  form.append("file", blob, name);
  if (truth) form.append("mask", truth.blob, uploadName(truth.name));
  return apiJson("/v1/segment?include_probability=true&probability_format=float32&include_image=true",
    { method: "POST", body: form, signal });
}

// Ground truth is read by one rule, polypseg's (0/1 label maps, 16-bit files, TIFF...), which the
// server applies. The page needs the pixels themselves to redraw Dice and outlines at every
// threshold, and a browser decodes a mask file to 8 bits its own way; so the truth is shown only
// when the page's pixels agree with the server's reading of the same file at the served threshold
// (same polyp area, same Dice), and refused otherwise rather than shown with a wrong Dice.
// served: the /v1/segment answer for this image and truth (threshold, truth_area_pixels, dice).
async function attachTruth(result, blob, truthName, served) {
  const { values, width, height } = await maskPixels(blob, truthName).catch((error) => {
    throw new ApiError(`${error.message} (polypseg's Dice at ${thresholdText(served.threshold)}: ${served.dice.toFixed(3)})`);
  });
  checkTruthSize({ width, height }, result, truthName);
  const cut = Math.fround(served.threshold);
  const readings = [values.map((v) => (v > 127 ? 1 : 0))];
  // A lossless 0/1 label map is foreground where 1 (polypseg's rule; the server's answer confirms it).
  if (values.every((v) => v <= 1)) readings.push(values);
  for (const truth of readings) {
    let area = 0;
    let predicted = 0;
    let inter = 0;
    for (let i = 0; i < truth.length; i++) {
      const p = result.prob[i] >= cut ? 1 : 0;
      area += truth[i];
      predicted += p;
      inter += p & truth[i];
    }
    const dice = area + predicted === 0 ? 1 : (2 * inter) / (area + predicted);
    if (area === served.truth_area_pixels && Math.abs(dice - served.dice) < 1e-9) {
      result.truth = truth;
      result.truthName = truthName;
      return;
    }
  }
  throw new ApiError(`${truthName}: the browser reads this mask file differently from polypseg ` +
    `(${served.truth_area_pixels.toLocaleString("en")} polyp pixels; Dice at ${thresholdText(served.threshold)}: ` +
    `${served.dice.toFixed(3)}); save it as an 8-bit PNG of 0 and 255 to compare on the page`);
}

function showResult(result) {
  state.result = result;
  const title = $("result-title");
  title.textContent = `Results for ${result.name}`;
  title.dataset.name = result.name;
  $("image-size").textContent = `${result.width} × ${result.height} px`;
  const hasUncertainty = Boolean(result.uncertainty);
  $("uncertainty-panel").hidden = !hasUncertainty;
  $("uncertainty-stat").hidden = !hasUncertainty;
  if (hasUncertainty) $("uncertainty").textContent = `mean std ${result.meanUncertainty.toFixed(3)}`;
  drawMaps();
  $("video-results").hidden = true;
  $("results").hidden = false;
  $("truth-button").disabled = false;
  render();  // at the slider's threshold: a threshold the reviewer chose is kept from image to image
  updateNavigator();
  if (typeof reviewOnResult === "function") reviewOnResult(result);
}

// ------------------------------------------------------------------ Grad-CAM of the mask on screen

let explainTimer = 0;
let explainController = null;

// Grad-CAM explains the mask at the slider's threshold; the caption always says which.
function requestExplain(delay = 0) {
  clearTimeout(explainTimer);
  const result = state.result;
  if (!result || state.explainUnavailable) return;
  const threshold = currentThreshold();
  if (result.camThreshold === threshold && !result.camPending) return;
  result.camPending = threshold;
  updateCamCaption();
  explainTimer = setTimeout(() => runExplain(result, threshold), delay);
}

async function runExplain(result, threshold) {
  if (explainController) explainController.abort();
  explainController = new AbortController();
  const form = new FormData();
  form.append("file", result.blob, result.name);
  try {
    const cam = await apiJson(`/v1/explain?include_overlay=false&threshold=${thresholdText(threshold)}`,
      { method: "POST", body: form, signal: explainController.signal });
    if (state.result !== result || result.camPending !== threshold) return;  // superseded
    result.cam = { ...cam, heat: await decodeGrayPng(cam.heatmap_png_base64, cam.width, cam.height) };
    result.camThreshold = threshold;
    result.camPending = null;
    result.camError = null;
    drawCam();
  } catch (error) {
    if (isAbort(error) || state.result !== result || result.camPending !== threshold) return;
    if (error.status === 501) state.explainUnavailable = true;  // an ONNX model: no Grad-CAM at all
    result.camPending = null;
    result.camError = error.message;
    drawCam();
  }
}

function updateCamCaption() {
  const result = state.result;
  const caption = $("cam-caption");
  const panel = $("cam-panel");
  if (!result) return;
  const slider = thresholdText(currentThreshold());
  let text;
  if (result.camError) {
    text = `Grad-CAM unavailable: ${result.camError}`;
  } else if (!result.cam) {
    text = `Grad-CAM of the mask at threshold ${slider}: computing…`;
  } else {
    const cam = result.cam;
    const models = cam.models && cam.models.length > 1 ? `mean of ${cam.models.length} fold models` :
      (result.nModels > 1 ? `fold ${cam.model_index} only` : "the model");
    text = cam.heatmap_max > 0
      ? `Grad-CAM of the mask shown at threshold ${thresholdText(result.camThreshold)} (${models}, final decoder block)`
      : `Nothing to explain: the mask is empty at threshold ${thresholdText(result.camThreshold)}`;
    if (result.camPending !== null && result.camPending !== undefined) {
      text += ` — updating for ${thresholdText(result.camPending)}…`;
    }
  }
  caption.textContent = text;
  panel.dataset.explainedThreshold = result.cam && !result.camError ? thresholdText(result.camThreshold) : "";
  panel.dataset.state = result.camError ? "error" : (result.camPending !== null && result.camPending !== undefined ? "updating" : "ready");
  $("view-cam").setAttribute("aria-label", `${text}. ${paletteWords()}`);
}

// ------------------------------------------------------------------ palettes and drawing

const PALETTES = {
  viridis: [[68, 1, 84], [72, 24, 106], [71, 45, 123], [66, 64, 134], [59, 82, 139], [51, 99, 141], [44, 114, 142],
    [38, 130, 142], [33, 145, 140], [31, 160, 136], [40, 174, 128], [63, 188, 115], [94, 201, 98], [132, 212, 75],
    [173, 220, 48], [216, 226, 25], [253, 231, 37]],
  cividis: [[0, 34, 78], [0, 46, 106], [26, 56, 111], [50, 67, 109], [67, 78, 108], [83, 90, 109], [97, 101, 111],
    [111, 112, 115], [125, 124, 120], [140, 136, 120], [155, 148, 118], [171, 160, 114], [188, 174, 108],
    [205, 187, 99], [222, 201, 88], [240, 216, 70], [254, 232, 56]],
};
const PALETTE_WORDS = { viridis: "dark purple = low, yellow = high", cividis: "dark blue = low, yellow = high" };

function makeLut(anchors) {
  const lut = new Uint8ClampedArray(256 * 3);
  for (let v = 0; v < 256; v++) {
    const x = (v / 255) * (anchors.length - 1);
    const i = Math.min(Math.floor(x), anchors.length - 2);
    const f = x - i;
    for (let c = 0; c < 3; c++) lut[v * 3 + c] = anchors[i][c] + f * (anchors[i + 1][c] - anchors[i][c]);
  }
  return lut;
}
const LUTS = Object.fromEntries(Object.entries(PALETTES).map(([k, v]) => [k, makeLut(v)]));
const palette = () => $("palette").value;
const paletteWords = () => `Colours ${palette()}: ${PALETTE_WORDS[palette()]}`;

// The image under every overlay, with the reviewer's brightness and contrast (overlays stay unchanged).
function drawBase(ctx, image, width, height) {
  const brightness = Number($("brightness").value);
  const contrast = Number($("contrast").value);
  ctx.filter = brightness === 100 && contrast === 100 ? "none" : `brightness(${brightness}%) contrast(${contrast}%)`;
  ctx.drawImage(image, 0, 0, width, height);
  ctx.filter = "none";
}

function drawMap(canvas, values, width, height, scale = 1) {
  const lut = LUTS[palette()];
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(width, height);
  for (let i = 0; i < values.length; i++) {
    const v = Math.min(255, Math.round(values[i] * scale)) * 3;
    out.data[i * 4] = lut[v];
    out.data[i * 4 + 1] = lut[v + 1];
    out.data[i * 4 + 2] = lut[v + 2];
    out.data[i * 4 + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
}

function drawColorbars() {
  const lut = LUTS[palette()];
  for (const id of ["bar-prob", "bar-cam", "bar-uncertainty"]) {
    const canvas = $(id);
    const ctx = canvas.getContext("2d");
    const out = ctx.createImageData(canvas.width, canvas.height);
    for (let x = 0; x < canvas.width; x++) {
      const v = Math.round((x / (canvas.width - 1)) * 255) * 3;
      for (let y = 0; y < canvas.height; y++) {
        const j = (y * canvas.width + x) * 4;
        out.data[j] = lut[v]; out.data[j + 1] = lut[v + 1]; out.data[j + 2] = lut[v + 2]; out.data[j + 3] = 255;
      }
    }
    ctx.putImageData(out, 0, 0);
  }
  $("bar-prob").setAttribute("aria-label", `Colour scale of the probability map from 0 to 1: ${PALETTE_WORDS[palette()]}`);
  $("bar-cam").setAttribute("aria-label", `Colour scale of the Grad-CAM heatmap from 0 to its maximum: ${PALETTE_WORDS[palette()]}`);
  $("bar-uncertainty").setAttribute("aria-label", `Colour scale of the fold disagreement, std from 0 to 0.5: ${PALETTE_WORDS[palette()]}`);
}

function drawMaps() {
  const r = state.result;
  drawColorbars();
  if (!r) return;
  drawMap($("view-prob"), r.prob, r.width, r.height, 255);
  $("view-prob").setAttribute("aria-label", `Probability map of ${r.name}. ${paletteWords()}`);
  if (r.uncertainty) {
    drawMap($("view-uncertainty"), r.uncertainty, r.width, r.height);
    $("view-uncertainty").setAttribute("aria-label",
      `Fold disagreement map of ${r.name}, mean std ${r.meanUncertainty.toFixed(3)}. ${paletteWords()}`);
  }
  drawCam();
}

function drawCam() {
  const r = state.result;
  if (!r) return;
  const canvas = $("view-cam");
  canvas.width = r.width;
  canvas.height = r.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  drawBase(ctx, r.image, r.width, r.height);
  if (r.cam && !r.camError && r.cam.heatmap_max > 0) {
    // The heatmap blended over the image (opacity slider), in the page's colour-blind-safe palette.
    const lut = LUTS[palette()];
    const out = ctx.getImageData(0, 0, r.width, r.height);
    const heat = r.cam.heat;
    const alpha = Number($("cam-opacity").value) / 100;
    for (let i = 0; i < heat.length; i++) {
      const v = heat[i] * 3;
      const j = i * 4;
      out.data[j] = (1 - alpha) * out.data[j] + alpha * lut[v];
      out.data[j + 1] = (1 - alpha) * out.data[j + 1] + alpha * lut[v + 1];
      out.data[j + 2] = (1 - alpha) * out.data[j + 2] + alpha * lut[v + 2];
    }
    ctx.putImageData(out, 0, 0);
  }
  updateCamCaption();
}

// A mask pixel on the outline: at the image border or beside a background pixel (4-neighbourhood).
function onOutline(mask, i, x, y, width, height) {
  return x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
    !mask[i - 1] || !mask[i + 1] || !mask[i - width] || !mask[i + width];
}

function outlineOf(mask, width, height, radius, paint) {
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      if (!mask[i]) continue;
      const edge = onOutline(mask, i, x, y, width, height);
      if (!edge) continue;
      for (let dy = -radius + 1; dy < radius; dy++) {
        for (let dx = -radius + 1; dx < radius; dx++) {
          const yy = y + dy;
          const xx = x + dx;
          if (yy >= 0 && xx >= 0 && yy < height && xx < width) paint((yy * width + xx) * 4);
        }
      }
    }
  }
}

function render() {
  const r = state.result;
  if (!r) return;
  const { width, height, prob } = r;
  const threshold = currentThreshold();
  // The server's rule exactly: foreground where p >= threshold, both as float32.
  const cut = Math.fround(threshold);
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
  r.mask = mask;
  r.area = area;
  r.threshold = threshold;
  r.confidence = area ? confidence / area : null;

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

  const radius = Math.max(1, Math.round(Math.max(width, height) / 300));
  const outline = $("view-outline");
  outline.width = width;
  outline.height = height;
  const octx = outline.getContext("2d", { willReadFrequently: true });
  drawBase(octx, r.image, width, height);
  const showOverlay = $("overlay-toggle").checked;
  if (showOverlay) {
    const over = octx.getImageData(0, 0, width, height);
    const alpha = Number($("overlay-opacity").value) / 100;
    if (alpha > 0) {
      for (let i = 0; i < mask.length; i++) {
        if (!mask[i]) continue;
        const j = i * 4;
        for (let c = 0; c < 3; c++) over.data[j + c] = (1 - alpha) * over.data[j + c] + alpha * PRED_RGB[c];
      }
    }
    outlineOf(mask, width, height, radius, (j) => {
      over.data[j] = PRED_RGB[0]; over.data[j + 1] = PRED_RGB[1]; over.data[j + 2] = PRED_RGB[2];
    });
    octx.putImageData(over, 0, 0);
  }

  const total = width * height;
  const areaText = `${((100 * area) / total).toFixed(2)} % (${area.toLocaleString("en")} px)`;
  $("area").textContent = areaText;
  $("confidence").textContent = area ? r.confidence.toFixed(3) : "– (no polyp above threshold)";
  const t = thresholdText(threshold);
  $("outline-caption").textContent = showOverlay
    ? `Image, predicted outline and fill (${$("overlay-opacity").value} %)` : "Image (overlay off)";
  outline.setAttribute("aria-label", showOverlay
    ? `${r.name} with the predicted polyp outlined and filled in blue at threshold ${t}: ${areaText}`
    : `${r.name} without overlay`);
  maskCanvas.setAttribute("aria-label", `Predicted mask of ${r.name} at threshold ${t}: white = polyp, ${areaText}`);

  renderTruth(radius);
  recordMeasurement();
  $("results").dataset.renderedThreshold = t;
  $("download-mask").dataset.threshold = t;
  updateCamCaption();
  if (typeof reviewOnRender === "function") reviewOnRender();
}

function renderTruth(radius) {
  const r = state.result;
  const has = Boolean(r.truth);
  $("truth-panel").hidden = !has;
  $("diff-panel").hidden = !has;
  $("dice-stat").hidden = !has;
  $("iou-stat").hidden = !has;
  if (!has) { r.dice = null; r.iou = null; return; }
  const { width, height, mask, truth } = r;
  let inter = 0;
  let predicted = 0;
  let actual = 0;
  for (let i = 0; i < mask.length; i++) {
    predicted += mask[i];
    actual += truth[i];
    inter += mask[i] & truth[i];
  }
  const sum = predicted + actual;
  r.dice = sum === 0 ? 1 : (2 * inter) / sum;
  r.iou = sum - inter === 0 ? 1 : inter / (sum - inter);
  $("dice").textContent = r.dice.toFixed(3);
  $("iou").textContent = r.iou.toFixed(3);

  const canvas = $("view-truth");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  drawBase(ctx, r.image, width, height);
  const over = ctx.getImageData(0, 0, width, height);
  outlineOf(truth, width, height, radius + 1, (j) => {
    over.data[j] = TRUTH_RGB[0]; over.data[j + 1] = TRUTH_RGB[1]; over.data[j + 2] = TRUTH_RGB[2];
  });
  outlineOf(mask, width, height, radius, (j) => {
    over.data[j] = PRED_RGB[0]; over.data[j + 1] = PRED_RGB[1]; over.data[j + 2] = PRED_RGB[2];
  });
  ctx.putImageData(over, 0, 0);
  renderDifference(inter, predicted - inter, actual - inter);
  $("truth-caption").dataset.truth = r.truthName;
  canvas.setAttribute("aria-label",
    `${r.name}: ground truth ${r.truthName} outlined in yellow, prediction at threshold ${thresholdText(r.threshold)} in blue; Dice ${r.dice.toFixed(3)}, IoU ${r.iou.toFixed(3)}`);
}

// Where the prediction and the ground truth disagree: false positives (predicted, not in the truth)
// orange, false negatives (in the truth, missed) purple, agreement white; Okabe-Ito colours that stay
// distinct with common colour-vision deficiencies.
const FP_RGB = [230, 97, 0];
const FN_RGB = [94, 60, 153];

function renderDifference(tp, fp, fn) {
  const r = state.result;
  const { width, height, mask, truth } = r;
  const canvas = $("view-diff");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  drawBase(ctx, r.image, width, height);
  const out = ctx.getImageData(0, 0, width, height);
  for (let i = 0; i < mask.length; i++) {
    const j = i * 4;
    const colour = mask[i] ? (truth[i] ? [255, 255, 255] : FP_RGB) : (truth[i] ? FN_RGB : null);
    if (colour) {
      for (let c = 0; c < 3; c++) out.data[j + c] = 0.25 * out.data[j + c] + 0.75 * colour[c];
    } else {
      for (let c = 0; c < 3; c++) out.data[j + c] *= 0.5;  // agreement on background: dimmed image
    }
  }
  ctx.putImageData(out, 0, 0);
  const fmt = (n) => n.toLocaleString("en");
  $("diff-caption").textContent = `Errors at ${thresholdText(r.threshold)}: false positives ${fmt(fp)} px (orange), ` +
    `false negatives ${fmt(fn)} px (purple), agreement ${fmt(tp)} px (white)`;
  canvas.setAttribute("aria-label", `Difference of the prediction at threshold ${thresholdText(r.threshold)} and ` +
    `ground truth ${r.truthName} for ${r.name}: false positives in orange (${fmt(fp)} px), false negatives in purple ` +
    `(${fmt(fn)} px), agreement in white (${fmt(tp)} px)`);
  $("results").dataset.falsePositives = String(fp);
  $("results").dataset.falseNegatives = String(fn);
}

function setThreshold(value) {
  state.threshold = Number(value);
  $("threshold").value = String(value);
  $("threshold-value").textContent = thresholdText(state.threshold);
  render();
  requestExplain(250);
}

// ------------------------------------------------------------------ downloads (what is on screen)

function ensureRendered() {
  // A slider step waiting for the next animation frame is drawn now, so the file is the mask shown.
  const r = state.result;
  if (r && r.threshold !== currentThreshold()) {
    cancelAnimationFrame(frame);
    render();
  }
}

function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function saveCanvas(canvas, filename) {
  // toBlob copies the canvas when it is called: the file is exactly what this click saw, however
  // late the encoding finishes and whatever the slider does meanwhile.
  canvas.toBlob((blob) => { if (blob) saveBlob(blob, filename); }, "image/png");
}

const stem = (name) => name.replace(/\.[^.]+$/, "");

// PNG encoding of a single-channel 8-bit image: a canvas can only encode RGBA, and a mask file
// must be what `polypseg` and other tools read as a mask (one channel, 0/255).
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function pngChunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

async function encodeGrayPng(gray, width, height) {
  const raw = new Uint8Array((width + 1) * height);  // each row: filter byte 0, then the pixels
  for (let y = 0; y < height; y++) raw.set(gray.subarray(y * width, (y + 1) * width), y * (width + 1) + 1);
  const zlib = new Blob([raw]).stream().pipeThrough(new CompressionStream("deflate"));
  const compressed = new Uint8Array(await new Response(zlib).arrayBuffer());
  const header = new Uint8Array(13);
  const view = new DataView(header.buffer);
  view.setUint32(0, width);
  view.setUint32(4, height);
  header[8] = 8;  // bit depth; colour type 0 (gray), deflate, no filter method, no interlace
  const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
  return new Blob([signature, pngChunk("IHDR", header), pngChunk("IDAT", compressed), pngChunk("IEND", new Uint8Array())],
    { type: "image/png" });
}

$("download-mask").addEventListener("click", async () => {
  ensureRendered();
  const r = state.result;
  if (!r) return;
  // The mask is copied at the click: the file is what this click saw, whatever the slider does next.
  const gray = new Uint8Array(r.mask.length);
  for (let i = 0; i < gray.length; i++) gray[i] = r.mask[i] ? 255 : 0;
  const filename = `${stem(r.name)}_mask_t${thresholdText(r.threshold)}.png`;
  saveBlob(await encodeGrayPng(gray, r.width, r.height), filename);
});
$("download-overlay").addEventListener("click", () => {
  ensureRendered();
  const r = state.result;
  if (r) saveCanvas($("view-outline"), `${stem(r.name)}_overlay_t${thresholdText(r.threshold)}.png`);
});

// ------------------------------------------------------------------ measurements CSV

const CSV_COLUMNS = ["file", "width", "height", "threshold", "area_pixels", "area_percent", "mean_confidence",
  "mean_fold_disagreement", "ground_truth", "dice", "iou", "model"];

function recordMeasurement() {
  const r = state.result;
  state.measurements.delete(r.name);  // re-insert: the CSV lists images in the order last shown
  state.measurements.set(r.name, {
    file: r.name,
    width: r.width,
    height: r.height,
    threshold: thresholdText(r.threshold),
    area_pixels: r.area,
    area_percent: ((100 * r.area) / (r.width * r.height)).toFixed(4),
    mean_confidence: r.confidence === null ? "" : r.confidence.toFixed(4),
    mean_fold_disagreement: r.uncertainty ? r.meanUncertainty.toFixed(4) : "",
    ground_truth: r.truthName || "",
    dice: r.dice === null || r.dice === undefined ? "" : r.dice.toFixed(4),
    iou: r.iou === null || r.iou === undefined ? "" : r.iou.toFixed(4),
    model: state.modelLabel,
  });
  $("download-csv").textContent = `Export measurements CSV (${state.measurements.size})`;
}

function csvCell(value) {
  let text = String(value);
  if (/^[=+\-@\t\r]/.test(text)) text = `'${text}`;  // never a formula in a spreadsheet
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

$("download-csv").addEventListener("click", () => {
  ensureRendered();
  const lines = [CSV_COLUMNS.join(",")];
  for (const row of state.measurements.values()) lines.push(CSV_COLUMNS.map((c) => csvCell(row[c])).join(","));
  saveBlob(new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" }), "polypseg_measurements.csv");
});

// ------------------------------------------------------------------ zoom and pan (all panels together)

const MAX_ZOOM = 16;

function applyView() {
  const { scale, x, y } = state.view;
  for (const canvas of document.querySelectorAll(".viewport > canvas")) {
    canvas.style.transform = `translate(${x}%, ${y}%) scale(${scale})`;
  }
  $("zoom-value").textContent = `${Math.round(scale * 100)} %`;
  $("results").dataset.zoom = String(scale);
}

function clampView() {
  const v = state.view;
  v.scale = Math.min(MAX_ZOOM, Math.max(1, v.scale));
  const min = -(v.scale - 1) * 100;
  v.x = Math.min(0, Math.max(min, v.x));
  v.y = Math.min(0, Math.max(min, v.y));
}

// Zoom by `factor` keeping the point at (u, v) (fractions of the panel) where it is.
function zoomAt(factor, u = 0.5, v = 0.5) {
  const view = state.view;
  const px = (u * 100 - view.x) / view.scale;
  const py = (v * 100 - view.y) / view.scale;
  view.scale *= factor;
  clampView();
  view.x = u * 100 - px * view.scale;
  view.y = v * 100 - py * view.scale;
  clampView();
  applyView();
}

function resetView() {
  state.view = { scale: 1, x: 0, y: 0 };
  applyView();
}

$("zoom-in").addEventListener("click", () => zoomAt(1.5));
$("zoom-out").addEventListener("click", () => zoomAt(1 / 1.5));
$("zoom-reset").addEventListener("click", resetView);

for (const viewport of document.querySelectorAll(".viewport")) {
  viewport.addEventListener("wheel", (event) => {
    if (!event.ctrlKey && !event.metaKey) return;  // plain wheel scrolls the page
    event.preventDefault();
    const box = viewport.getBoundingClientRect();
    zoomAt(event.deltaY < 0 ? 1.25 : 0.8, (event.clientX - box.left) / box.width, (event.clientY - box.top) / box.height);
  }, { passive: false });
  let drag = null;
  viewport.addEventListener("pointerdown", (event) => {
    if (state.view.scale === 1) return;
    drag = { x: event.clientX, y: event.clientY, view: { ...state.view } };
    viewport.setPointerCapture(event.pointerId);
    viewport.classList.add("dragging");
  });
  viewport.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const box = viewport.getBoundingClientRect();
    state.view.x = drag.view.x + ((event.clientX - drag.x) / box.width) * 100;
    state.view.y = drag.view.y + ((event.clientY - drag.y) / box.height) * 100;
    clampView();
    applyView();
  });
  const stop = () => { drag = null; viewport.classList.remove("dragging"); };
  viewport.addEventListener("pointerup", stop);
  viewport.addEventListener("pointercancel", stop);
  viewport.addEventListener("dblclick", resetView);
}

// ------------------------------------------------------------------ stepping through samples or a folder

const IMAGE_FILE = /\.(jpe?g|png|tiff?|bmp|webp)$/i;
const MASK_FOLDERS = /(^|\/)(masks?|ground[ _-]?truth|gt|labels?)\//i;

function updateNavigator() {
  const nav = state.nav;
  $("navigator").hidden = !nav;
  if (!nav) {
    if (typeof reviewOnNavigate === "function") reviewOnNavigate();
    return;
  }
  const what = nav.kind === "samples" ? "samples" : "files";
  $("nav-position").textContent = `${nav.index + 1} / ${nav.items.length} ${what}`;
  $("nav-prev").disabled = nav.index <= 0;
  $("nav-next").disabled = nav.index >= nav.items.length - 1;
  if (typeof reviewOnNavigate === "function") reviewOnNavigate();
}

function sampleSource(name) {
  const load = async (signal) => {
    const path = `/v1/samples/${encodeURIComponent(name)}`;
    const blob = await (await api(path, { signal })).blob();
    let truth = null;
    if (state.sampleMasks.has(name)) {
      const mask = await (await api(`${path}/mask`, { signal })).blob();
      truth = { blob: mask, name: `masks/${stem(name)}` };
    }
    return { blob, truth };
  };
  return { name, load };
}

async function openNavItem(index) {
  const nav = state.nav;
  if (!nav || index < 0 || index >= nav.items.length) return;
  nav.index = index;
  updateNavigator();
  const item = nav.items[index];
  if (nav.kind === "samples") {
    $("sample-select").value = item;
    await analyse(sampleSource(item));
  } else {
    analyseFile(item.file, item.truth);
  }
}

const step = (delta) => {
  const nav = state.nav;
  if (!nav || nav.index + delta < 0 || nav.index + delta >= nav.items.length || !mayLeave()) return;
  openNavItem(nav.index + delta);
};
$("nav-prev").addEventListener("click", () => step(-1));
$("nav-next").addEventListener("click", () => step(1));

// Several files or a folder: images to step through, masks paired with them by file name.
function openFiles(files) {
  const list = Array.from(files);
  const path = (f) => f.webkitRelativePath || f.name;
  const masks = new Map();
  const images = [];
  for (const file of list) {
    if (MASK_FOLDERS.test(path(file)) && IMAGE_FILE.test(file.name)) masks.set(stem(file.name), file);
    else if (IMAGE_FILE.test(file.name) || isVideo(file)) images.push(file);
  }
  images.sort((a, b) => path(a).localeCompare(path(b)));
  if (images.length === 0) {
    setStatus("No image in that selection.", "error");
    return;
  }
  if (images.length === 1 && masks.size === 0) {
    state.nav = null;
    updateNavigator();
    analyseFile(images[0]);
    return;
  }
  state.nav = {
    kind: "files",
    items: images.map((file) => ({ file, truth: masks.get(stem(file.name)) || null })),
    index: 0,
  };
  openNavItem(0);
}

// ------------------------------------------------------------------ video

// result: the server's answer at its threshold. threshold: the slider's. rows, consistency: the
// per-frame numbers at that threshold, from the answer's threshold_levels when it differs.
const video = {
  result: null, masks: new Map(), levels: new Map(), url: null, frame: -1,
  threshold: null, rows: null, consistency: null, drawn: null,
};
const FRAME_CACHE = 64;  // decoded masks and level maps kept per kind (one byte per pixel each)

// Keep at most FRAME_CACHE entries in a Map, dropping the oldest: a long video must not hold every
// decoded frame in the tab's memory.
function remember(cache, key, value) {
  cache.set(key, value);
  if (cache.size > FRAME_CACHE) cache.delete(cache.keys().next().value);
  return value;
}

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
  const rows = video.rows;
  let lo = 0;
  let hi = rows.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (rows[mid].time_s <= seconds + 1e-3) lo = mid; else hi = mid - 1;
  }
  return lo;
}

const atServedThreshold = () => video.threshold === video.result.threshold;

// A frame's level map (pixel value: how many of the thresholds 0.01 ... 0.99 its probability
// reaches), decoded once and kept for the last FRAME_CACHE frames shown.
async function frameLevels(index) {
  if (video.levels.has(index)) return video.levels.get(index);
  const { width, height } = video.result;
  const levels = await decodeGrayPng(video.result.threshold_levels.frames[index].levels_png_base64, width, height);
  return remember(video.levels, index, levels);
}

// The mask of a frame at the slider's threshold: the server's at its own threshold, else level >= k.
async function frameMask(index) {
  if (atServedThreshold()) {
    if (video.masks.has(index)) return video.masks.get(index);
    return remember(video.masks, index, decodeRle(video.result.masks_rle[index]));
  }
  const levels = await frameLevels(index);
  const k = Math.round(video.threshold * 100);
  const mask = new Uint8Array(levels.length);
  for (let i = 0; i < mask.length; i++) mask[i] = levels[i] >= k ? 1 : 0;
  return mask;
}

async function drawVideoOverlay(index) {
  if (!video.result) return;
  const key = `${index}@${video.threshold}`;
  if (key === video.drawn) return;
  video.frame = index;
  video.drawn = key;
  const threshold = video.threshold;
  let mask;
  try {
    mask = await frameMask(index);
  } catch (error) {
    setStatus(named(video.name, `frame ${index + 1} could not be drawn: ${error.message}`), "error");
    return;
  }
  if (video.frame !== index || video.threshold !== threshold) return;  // a newer frame or threshold won
  const { width, height } = video.result;
  const canvas = $("video-overlay");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(width, height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      if (!mask[i]) continue;
      const edge = onOutline(mask, i, x, y, width, height);
      const j = i * 4;
      out.data[j] = PRED_RGB[0];
      out.data[j + 1] = PRED_RGB[1];
      out.data[j + 2] = PRED_RGB[2];
      out.data[j + 3] = edge ? 255 : 60;
    }
  }
  ctx.putImageData(out, 0, 0);
  const row = video.rows[index];
  const text = `${index + 1} / ${video.result.frames} · area ${(100 * row.area_fraction).toFixed(2)} % · confidence ${row.mean_confidence.toFixed(3)}`;
  $("video-current").textContent = text;
  canvas.setAttribute("aria-label", `Predicted polyp outline at threshold ${threshold.toFixed(2)} on frame ${text}`);
  drawChart(index);
  $("video-results").dataset.renderedFrame = String(index);
  $("video-results").dataset.renderedThreshold = threshold.toFixed(2);
}

// Re-threshold the video in the browser: the answer's threshold_levels hold every frame's mask and
// numbers at each threshold of the slider, so no request goes to the server.
function setVideoThreshold(threshold) {
  const result = video.result;
  if (!result) return;
  video.threshold = threshold;
  if (atServedThreshold()) {
    video.rows = result.per_frame;
    video.consistency = result.consistency;
  } else {
    const k = Math.round(threshold * 100);
    const pixels = result.width * result.height;
    video.rows = result.per_frame.map((row, index) => {
      const frame = result.threshold_levels.frames[index];
      const area = frame.area_pixels[k - 1];
      return {
        frame: row.frame,
        time_s: row.time_s,
        area_pixels: area,
        area_fraction: Math.round((area / pixels) * 1e6) / 1e6,
        mean_confidence: frame.mean_confidence[k - 1],
        iou_with_previous: frame.iou_with_previous ? frame.iou_with_previous[k - 1] : null,
      };
    });
    const ious = video.rows.map((row) => row.iou_with_previous).filter((v) => v !== null);
    video.consistency = ious.length ? ious.reduce((a, b) => a + b, 0) / ious.length : 1;
  }
  $("video-threshold").textContent = threshold.toFixed(2);
  $("video-consistency").textContent = video.consistency.toFixed(3);
  drawVideoOverlay(video.frame < 0 ? 0 : video.frame);
}

function drawChart(cursor) {
  const canvas = $("video-chart");
  const ctx = canvas.getContext("2d");
  const rows = video.rows;
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
  const series = [["area_fraction", "#0072b2"], ["mean_confidence", "#e69f00"]];
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
  ctx.strokeStyle = "#1d2330";
  ctx.beginPath(); ctx.moveTo(x(cursor), pad / 2); ctx.lineTo(x(cursor), h - pad); ctx.stroke();
  ctx.fillStyle = "#5b6474";
  ctx.fillText("frame", w / 2 - 15, h - 8);
  canvas.setAttribute("aria-label",
    `Polyp area and mean confidence for each of ${rows.length} frames; frame ${cursor + 1} marked`);
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
    if (!video.result) return;
    $("video-caption").textContent = "This browser cannot play the file; the outline shows the first frame's mask only.";
  });
}

async function analyseVideo(file, name, threshold = null) {
  const job = beginAnalysis(`${name} frame by frame`);
  state.retry = () => analyseVideo(file, name, threshold);
  try {
    const form = new FormData();
    form.append("file", file, name);
    const at = threshold === null ? "" : `&threshold=${threshold.toFixed(2)}`;
    const result = await apiJson(`/v1/segment-video?include_masks=true&include_levels=true${at}`,
      { method: "POST", body: form, signal: job.signal });
    if (!current(job)) return;
    video.result = result;
    video.file = file;
    video.name = name;
    $("video-threshold-input").value = String(result.threshold);
    $("video-threshold-value").textContent = result.threshold.toFixed(2);
    $("video-cam-panel").hidden = true;
    video.masks.clear();
    video.levels.clear();
    video.frame = -1;
    video.drawn = null;
    if (video.url) URL.revokeObjectURL(video.url);
    video.url = URL.createObjectURL(file);
    $("video").src = video.url;
    $("video-caption").textContent = "Video with the predicted outline";
    $("video-title").textContent = `Results for ${name}`;
    $("video-title").dataset.name = name;
    $("video-frames").textContent = String(result.frames);
    $("video-fps").textContent = `${result.fps} fps`;
    $("video-warning").hidden = !result.warning;
    $("video-warning").textContent = result.warning || "";
    $("results").hidden = true;
    $("video-results").hidden = false;
    setVideoThreshold(result.threshold);
    setStatus(`${name}: ${result.frames} frames done in ${result.seconds.toFixed(2)} s.`, "ok");
  } catch (error) {
    if (isAbort(error) || !current(job)) return;
    clearResults();
    setStatus(named(name, error.message), "error");
  } finally {
    if (current(job)) state.controller = null;
  }
}

// Frame stepping, per-frame CSV, re-analysis at another threshold, Grad-CAM of the paused frame.
function stepFrame(delta) {
  if (!video.result) return;
  const element = $("video");
  element.pause();
  const rows = video.rows;
  const index = Math.min(rows.length - 1, Math.max(0, frameAt(element.currentTime) + delta));
  // Seek into the middle of the frame, so rounding never shows its neighbour.
  const next = index + 1 < rows.length ? rows[index + 1].time_s : rows[index].time_s + 1 / (video.result.fps || 25);
  element.currentTime = (rows[index].time_s + next) / 2;
  drawVideoOverlay(index);
}

$("frame-prev").addEventListener("click", () => stepFrame(-1));
$("frame-next").addEventListener("click", () => stepFrame(1));
$("video-csv").addEventListener("click", () => {
  if (!video.result) return;
  const columns = ["frame", "time_s", "area_pixels", "area_fraction", "mean_confidence", "iou_with_previous", "threshold"];
  const lines = [columns.join(",")];
  for (const row of video.rows) {
    lines.push(columns.map((c) => csvCell(c === "threshold" ? video.threshold : (row[c] ?? ""))).join(","));
  }
  saveBlob(new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" }), `${stem(video.name)}_frames.csv`);
});
let videoFrame = 0;
$("video-threshold-input").addEventListener("input", () => {
  const threshold = Number($("video-threshold-input").value);
  $("video-threshold-value").textContent = threshold.toFixed(2);
  cancelAnimationFrame(videoFrame);
  videoFrame = requestAnimationFrame(() => setVideoThreshold(threshold));
});
$("video-cam").addEventListener("click", async () => {
  const element = $("video");
  if (!video.result || !element.videoWidth) return;
  element.pause();
  const index = frameAt(element.currentTime);
  const canvas = document.createElement("canvas");
  canvas.width = element.videoWidth;
  canvas.height = element.videoHeight;
  canvas.getContext("2d").drawImage(element, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  const form = new FormData();
  form.append("file", blob, `${stem(video.name)}_frame${index + 1}.png`);
  const threshold = video.threshold.toFixed(2);
  $("video-cam-caption").textContent = `Grad-CAM of frame ${index + 1}: computing…`;
  $("video-cam-panel").hidden = false;
  try {
    const cam = await apiJson(`/v1/explain?threshold=${threshold}&colormap=${palette()}`, { method: "POST", body: form });
    $("video-cam-image").src = `data:image/png;base64,${cam.overlay_png_base64}`;
    $("video-cam-caption").textContent = cam.heatmap_max > 0
      ? `Grad-CAM of the mask of frame ${index + 1} at threshold ${threshold}`
      : `Nothing to explain: the mask of frame ${index + 1} is empty at threshold ${threshold}`;
    $("video-cam-image").alt = $("video-cam-caption").textContent;
    $("video-results").dataset.camFrame = String(index);
  } catch (error) {
    $("video-cam-caption").textContent = `Grad-CAM unavailable: ${error.message}`;
  }
});
document.addEventListener("keydown", (event) => {
  if ($("video-results").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target instanceof HTMLElement && target.closest("input, select, textarea")) return;
  if (event.key === ",") { stepFrame(-1); event.preventDefault(); }
  else if (event.key === ".") { stepFrame(1); event.preventDefault(); }
});

followVideo();

// ------------------------------------------------------------------ events

let frame = 0;
$("threshold").addEventListener("input", () => {
  state.threshold = Number($("threshold").value);
  $("threshold-value").textContent = thresholdText(state.threshold);
  cancelAnimationFrame(frame);
  frame = requestAnimationFrame(render);
  requestExplain(400);  // Grad-CAM follows once the slider rests
});
$("threshold-reset").addEventListener("click", () => setThreshold(state.modelThreshold));
$("overlay-toggle").addEventListener("change", render);
$("overlay-opacity").addEventListener("input", () => {
  $("overlay-opacity-value").textContent = `${$("overlay-opacity").value} %`;
  cancelAnimationFrame(frame);
  frame = requestAnimationFrame(render);
});
$("palette").addEventListener("change", drawMaps);
$("cam-opacity").addEventListener("input", () => {
  $("cam-opacity-value").textContent = `${$("cam-opacity").value} %`;
  drawCam();
});
for (const id of ["brightness", "contrast"]) {
  $(id).addEventListener("input", () => {
    $(`${id}-value`).textContent = `${$(id).value} %`;
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => {
      render();
      drawCam();
      if (typeof drawEditor === "function") drawEditor();
    });
  });
}

const VIDEO_EXTENSIONS = /\.(mp4|m4v|avi|mov|mkv|webm|mpe?g)$/i;
const isVideo = (file) => (file.type || "").startsWith("video/") || VIDEO_EXTENSIONS.test(file.name);

function analyseFile(file, truthFile = null) {
  $("sample-select").value = "";  // the picker names the sample on screen only
  if (isVideo(file)) return analyseVideo(file, file.name);
  return analyse({ blob: file, name: file.name, truth: truthFile ? { blob: truthFile, name: truthFile.name } : null });
}

$("file-input").addEventListener("change", (event) => {
  const files = Array.from(event.target.files);
  event.target.value = "";
  if (files.length && !mayLeave()) return;
  if (files.length === 1) {
    state.nav = null;
    updateNavigator();
    analyseFile(files[0]);
  } else if (files.length > 1) {
    openFiles(files);
  }
});
$("folder-button").addEventListener("click", () => $("folder-input").click());
$("folder-input").addEventListener("change", (event) => {
  const files = Array.from(event.target.files);
  event.target.value = "";
  if (files.length && mayLeave()) openFiles(files);
});

$("truth-button").addEventListener("click", () => $("truth-input").click());
$("truth-input").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = "";
  const r = state.result;
  if (!file || !r) return;
  try {
    // a mask of another size is refused at once, without asking the server to segment the image again
    const seen = await maskPixels(file, file.name).catch(() => null);
    if (seen) checkTruthSize(seen, r, file.name);
    const form = new FormData();
    form.append("file", r.blob, r.name);
    form.append("mask", file, file.name);
    const served = await apiJson("/v1/segment?mask_format=rle", { method: "POST", body: form });
    if (state.result !== r) return;
    await attachTruth(r, file, file.name, served);
    if (state.result !== r) return;
    render();
    setStatus(`${r.name}: compared with ${file.name}.`, "ok");
  } catch (error) {
    setStatus(named(file.name, error.message), "error");
  }
});

$("sample-select").addEventListener("change", (event) => {
  const name = event.target.value;
  if (!name) return;
  if (!mayLeave()) {
    event.target.value = state.result && state.samples.includes(state.result.name) ? state.result.name : "";
    return;
  }
  state.nav = { kind: "samples", items: state.samples, index: state.samples.indexOf(name) };
  openNavItem(state.nav.index);
});

const zone = $("drop-zone");
zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  const files = Array.from(event.dataTransfer.files);
  if (files.length && !mayLeave()) return;
  if (files.length === 1) {
    state.nav = null;
    updateNavigator();
    analyseFile(files[0]);
  } else if (files.length > 1) {
    openFiles(files);
  }
});
zone.addEventListener("click", () => $("file-input").click());
zone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    $("file-input").click();
  }
});

// Keyboard shortcuts, except while typing or adjusting a control.
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target instanceof HTMLElement && (target.closest("input, select, textarea, video") || target.isContentEditable)) return;
  const key = event.key;
  let handled = true;
  if (key === "n" || key === "N" || key === "ArrowRight") step(1);
  else if (key === "p" || key === "P" || key === "ArrowLeft") step(-1);
  else if ((key === "o" || key === "O") && state.result) { $("overlay-toggle").checked = !$("overlay-toggle").checked; render(); }
  else if (key === "+" || key === "=") zoomAt(1.5);
  else if (key === "-" || key === "_") zoomAt(1 / 1.5);
  else if (key === "0") resetView();
  else handled = false;
  if (handled) event.preventDefault();
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

drawColorbars();
applyView();
// Both scripts are deferred and review.js may still be loading when this one runs (readyState is
// already "interactive" then): DOMContentLoaded fires once every deferred script has run.
document.addEventListener("DOMContentLoaded", init, { once: true });
