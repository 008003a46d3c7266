"use strict";
// The review loop of the page (when the server runs with --review-dir): a verdict and a note per
// image, a mask editor at the image's full resolution, and the review's status, summary and export.
// Shares app.js's globals (state, api, $, setStatus, ...); app.js calls the review* hooks below.

const STATUS_LABELS = { accept: "accepted", reject: "rejected", needs_correction: "needs correction" };
const MAX_UNDO = 50;

const NOTE_DELAY_MS = 500;  // a note is saved once typing pauses this long

const review = {
  enabled: false,
  records: new Map(),   // file name -> record of /v1/reviews
  summary: null,
  note: null,           // {name, text} typed but not yet sent
  noteTimer: 0,
};

// The mask editor's state: the mask being corrected, its history, the tool and the view.
const editor = {
  name: null, width: 0, height: 0, mask: null, image: null,
  source: "",           // "model" (at editor.threshold) or "saved"
  threshold: null,
  dirty: false,
  loading: false,       // the image's record or saved correction is still on its way
  ticket: 0,            // every image shown increments it; late answers for an older one are dropped
  edits: 0,             // every change of the mask increments it (a save clears "dirty" only if none came since)
  undo: [], redo: [],
  tool: "brush", size: 12,
  view: { scale: 1, x: 0, y: 0 },
  stroke: null,         // {last: [x, y]} while painting
  pan: null,
  polygon: null,        // {points: [[x, y], ...], pointer: [x, y] | null, erase} while a polygon is drawn
};

const POLYGON_TOOLS = new Set(["polygon", "polygon-erase"]);
const CLOSE_RADIUS_PX = 8;  // a click this close to the first vertex (on screen) closes the polygon

// ------------------------------------------------------------------ records and summary

async function reviewInit(enabled) {
  review.enabled = enabled;  // the server keeps a review folder (GET /v1/health says so)
  if (enabled) await refreshRecords();
  $("review").hidden = !review.enabled;
  $("review-tools").hidden = !review.enabled;
  reviewOnNavigate();
}

// The server's records now: another tab or reviewer may have changed them since the page last looked.
// (The whole list rather than GET /v1/reviews/{name}, which answers 404 for an image not yet reviewed.)
async function refreshRecords() {
  const body = await apiJson("/v1/reviews");
  review.records = new Map(body.records.map((r) => [r.file, r]));
  review.summary = body.summary;
}

function statusOf(name) {
  const record = review.records.get(name);
  if (!record) return "not reviewed";
  const verdict = record.status ? STATUS_LABELS[record.status] : "no verdict";
  return record.corrected ? `${verdict}, mask corrected` : verdict;
}

function navNames() {
  const nav = state.nav;
  if (!nav) return [];
  return nav.items.map((item) => (nav.kind === "samples" ? item : item.file.name));
}

// The list of images being stepped through with each one's status, and the summary of what is left.
function reviewOnNavigate() {
  const list = $("review-list");
  const names = navNames();
  list.replaceChildren();
  if (!review.enabled || names.length === 0) {
    list.hidden = true;
    $("review-summary").textContent = review.enabled && review.summary ? summaryText(review.summary) : "";
    return;
  }
  list.hidden = false;
  const counts = { accept: 0, reject: 0, needs_correction: 0, corrected: 0, reviewed: 0 };
  names.forEach((name, index) => {
    const record = review.records.get(name);
    if (record && record.status) { counts[record.status] += 1; counts.reviewed += 1; }
    if (record && record.corrected) counts.corrected += 1;
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "review-item";
    button.dataset.status = record && record.status ? record.status : "none";
    button.dataset.name = name;
    if (state.nav.index === index) button.setAttribute("aria-current", "true");
    button.textContent = `${name} — ${statusOf(name)}`;
    button.addEventListener("click", () => { if (mayLeave()) openNavItem(index); });
    item.append(button);
    list.append(item);
  });
  const left = names.length - counts.reviewed;
  $("review-summary").textContent =
    `${counts.reviewed} of ${names.length} reviewed: ${counts.accept} accepted, ` +
    `${counts.needs_correction} need correction, ${counts.reject} rejected; ${plural(counts.corrected, "mask")} corrected; ` +
    `${left} left.`;
  $("review-summary").dataset.left = String(left);
}

function summaryText(summary) {
  return `Review folder: ${summary.records} images reviewed (${summary.accept} accepted, ` +
    `${summary.needs_correction} need correction, ${summary.reject} rejected; ${plural(summary.corrected, "mask")} corrected).`;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function storeRecord(record) {
  review.records.set(record.file, record);
  reviewOnNavigate();
  showRecord();
}

// The verdict buttons and the note of the image on screen.
function showRecord() {
  const r = state.result;
  if (!review.enabled || !r) return;
  const record = review.records.get(r.name);
  for (const button of document.querySelectorAll("#review .verdict")) {
    button.setAttribute("aria-pressed", String(Boolean(record && record.status === button.dataset.status)));
  }
  if (document.activeElement !== $("review-note")) $("review-note").value = record ? record.note : "";
  let text = `${r.name}: ${statusOf(r.name)}`;
  if (record && record.updated) text += ` (updated ${record.updated})`;
  if (record && record.corrected && record.dice_vs_model !== null) {
    text += `; Dice of the corrected mask vs the model's at ${thresholdText(record.threshold)}: ${record.dice_vs_model.toFixed(3)}`;
  }
  $("review-state").textContent = text;
  $("review").dataset.status = record && record.status ? record.status : "none";
}

// A verdict for the image on screen; the note goes with it only if it has unsent text (a null note
// keeps the stored one, which another tab may have changed).
async function putVerdict(status) {
  const r = state.result;
  if (!review.enabled || !r) return;
  const name = r.name;
  const note = takeNote(name);
  try {
    const record = await putRecord(name, { status, note });
    storeRecord(record);
    setStatus(`${name}: ${statusOf(name)}.`, "ok");
  } catch (error) {
    setStatus(named(name, error.message), "error");
  }
}

const putRecord = (name, body, options = {}) => apiJson(`/v1/reviews/${encodeURIComponent(name)}`, {
  method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), ...options,
});

function noteTyped() {
  const r = state.result;
  if (!review.enabled || !r) return;
  review.note = { name: r.name, text: $("review-note").value };
  clearTimeout(review.noteTimer);
  review.noteTimer = setTimeout(saveNote, NOTE_DELAY_MS);
}

// The unsent note text of `name` (null if none), now counted as sent.
function takeNote(name) {
  if (!review.note || review.note.name !== name) return null;
  const { text } = review.note;
  review.note = null;
  clearTimeout(review.noteTimer);
  return text;
}

// Send the unsent note alone: the server keeps the stored verdict, so one set in another tab stays.
async function saveNote() {
  if (!review.note) return;
  const { name } = review.note;
  const note = takeNote(name);
  try {
    const record = await putRecord(name, { note });
    storeRecord(record);
  } catch (error) {
    setStatus(named(name, `the note was not saved: ${error.message}`), "error");
  }
}

// ------------------------------------------------------------------ the mask editor

// Called by app.js when an image is shown. The editor forgets the previous image at once (its mask,
// history and source), then starts from the saved correction, if any, else from the model's mask at
// the slider's threshold. Until then it has no mask: tools, undo and save do nothing.
async function reviewOnResult(result) {
  if (!review.enabled) return;
  if (review.note && review.note.name !== result.name) saveNote();
  const unsaved = editor.dirty && editor.name && editor.name !== result.name ? editor.name : null;
  const ticket = resetEditor(result);
  showRecord();
  if (unsaved) $("review-state").textContent += ` — the edits to ${unsaved}'s mask were not saved`;
  const stale = () => editor.ticket !== ticket || state.result !== result;
  try {
    await refreshRecords();
    if (stale()) return;
    reviewOnNavigate();
    showRecord();
  } catch (error) {
    if (stale()) return;
    setStatus(named(result.name, `the review records could not be loaded: ${error.message}`), "error");
  }
  const record = review.records.get(result.name);
  if (record && record.corrected) {
    try {
      const blob = await (await api(`/v1/reviews/${encodeURIComponent(result.name)}/mask`)).blob();
      const saved = await decodeMaskBlob(blob, `${result.name} (saved mask)`);
      if (stale()) return;
      if (saved.width === result.width && saved.height === result.height) {
        editor.loading = false;
        editor.mask = saved.mask;
        editor.source = "saved";
        drawEditor();
        return;
      }
    } catch (error) {
      if (stale()) return;
      setStatus(named(result.name, `the saved mask could not be loaded: ${error.message}`), "error");
    }
  }
  editor.loading = false;
  startFromModel();
}

// An empty editor for `result`; returns the ticket that answers for this image must carry.
function resetEditor(result) {
  editor.ticket += 1;
  editor.edits += 1;
  editor.name = result.name;
  editor.width = result.width;
  editor.height = result.height;
  editor.image = result.image;
  editor.mask = null;
  editor.source = "";
  editor.threshold = null;
  editor.loading = true;
  editor.undo = [];
  editor.redo = [];
  editor.dirty = false;
  editor.stroke = null;
  editor.view = { scale: 1, x: 0, y: 0 };
  editor.polygon = null;
  const canvas = $("editor-canvas");
  canvas.width = result.width;  // also clears the previous image's drawing
  canvas.height = result.height;
  $("editor-overlay").setAttribute("viewBox", `0 0 ${result.width} ${result.height}`);
  drawPolygonPreview();
  delete $("editor").dataset.area;
  $("editor").dataset.dirty = "false";
  $("editor-state").textContent = `Loading the mask of ${result.name}…`;
  $("editor-undo").disabled = true;
  $("editor-redo").disabled = true;
  applyEditorView();
  return editor.ticket;
}

// The editor holds a mask of the image on screen: only then do tools, undo and save act.
const editorReady = () =>
  Boolean(review.enabled && editor.mask && !editor.loading && state.result && editor.name === state.result.name);

function markEdited() {
  editor.dirty = true;
  editor.edits += 1;
}

// Before the page leaves the image on screen: unsent note text is sent, and unsaved mask edits are
// kept unless the reviewer agrees to drop them. Returns whether to go on.
function reviewCanLeave() {
  if (!review.enabled) return true;
  if (review.note) saveNote();
  if (!editor.dirty || !editor.mask) return true;
  return window.confirm(`The edits to ${editor.name}'s mask are not saved. Leave them unsaved?`);
}

// Called by app.js after every redraw: an untouched editor follows the slider's threshold.
function reviewOnRender() {
  const r = state.result;
  if (!review.enabled || !r || editor.name !== r.name || editor.loading || editor.dirty || editor.source === "saved") return;
  if (editor.threshold !== r.threshold) startFromModel({ undoable: false });  // following the slider is no edit
}

// The model's mask at the slider's threshold; `undoable`: the mask it replaces is kept in the history.
function startFromModel({ undoable = true } = {}) {
  const r = state.result;
  if (!r || !r.mask) return;
  if (editor.mask && undoable) pushUndo();
  editor.mask = Uint8Array.from(r.mask);
  editor.source = "model";
  editor.threshold = r.threshold;
  editor.dirty = false;
  drawEditor();
}

function pushUndo(before = Uint8Array.from(editor.mask)) {
  editor.undo.push(before);
  if (editor.undo.length > MAX_UNDO) editor.undo.shift();
  editor.redo = [];
}

function undo() {
  if (!editorReady() || !editor.undo.length) return;
  editor.redo.push(editor.mask);
  editor.mask = editor.undo.pop();
  markEdited();
  drawEditor();
}

function redo() {
  if (!editorReady() || !editor.redo.length) return;
  editor.undo.push(editor.mask);
  editor.mask = editor.redo.pop();
  markEdited();
  drawEditor();
}

const EDIT_RGB = [255, 0, 170];  // magenta: distinct from the prediction's blue and the truth's yellow

function drawEditor() {
  const { width, height, mask } = editor;
  if (!mask) return;
  const canvas = $("editor-canvas");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  drawBase(ctx, editor.image, width, height);
  const data = ctx.getImageData(0, 0, width, height);
  const alpha = Number($("editor-opacity").value) / 100;
  let area = 0;
  for (let i = 0; i < mask.length; i++) {
    if (!mask[i]) continue;
    area++;
    const j = i * 4;
    for (let c = 0; c < 3; c++) data.data[j + c] = (1 - alpha) * data.data[j + c] + alpha * EDIT_RGB[c];
  }
  outlineOf(mask, width, height, 1, (j) => { data.data[j] = EDIT_RGB[0]; data.data[j + 1] = EDIT_RGB[1]; data.data[j + 2] = EDIT_RGB[2]; });
  ctx.putImageData(data, 0, 0);
  const from = editor.source === "saved" ? "the saved correction" : `the model's mask at ${thresholdText(Number(editor.threshold))}`;
  $("editor-state").textContent =
    `${area.toLocaleString("en")} px (${((100 * area) / (width * height)).toFixed(2)} %), from ${from}` +
    (editor.dirty ? ", edited, not saved" : "");
  $("editor").dataset.area = String(area);
  $("editor").dataset.dirty = String(editor.dirty);
  $("editor-undo").disabled = editor.undo.length === 0;
  $("editor-redo").disabled = editor.redo.length === 0;
  canvas.setAttribute("aria-label",
    `Mask being corrected for ${editor.name}, in magenta over the image: ${area.toLocaleString("en")} px`);
  applyEditorView();
}

function setTool(tool) {
  if (editor.polygon && !POLYGON_TOOLS.has(tool) && tool !== "pan") cancelPolygon();
  // Switching between the two polygon tools keeps the points and changes what closing does; the
  // pan tool keeps both, so a polygon can be finished after panning.
  if (editor.polygon && POLYGON_TOOLS.has(tool)) editor.polygon.erase = tool === "polygon-erase";
  editor.tool = tool;
  for (const button of document.querySelectorAll("#editor .tool")) {
    button.setAttribute("aria-pressed", String(button.dataset.tool === tool));
  }
  $("editor").dataset.tool = tool;
  drawPolygonPreview();
}

function setBrushSize(size) {
  editor.size = Math.max(1, Math.min(200, Math.round(size)));
  $("editor-size").value = String(editor.size);
  $("editor-size-value").textContent = `${editor.size} px`;
}

// Image pixel under a pointer event (the canvas is drawn at the image's full resolution).
function pixelAt(event) {
  const box = $("editor-canvas").getBoundingClientRect();
  return [
    Math.floor(((event.clientX - box.left) / box.width) * editor.width),
    Math.floor(((event.clientY - box.top) / box.height) * editor.height),
  ];
}

function dab(cx, cy, value) {
  const r = editor.size / 2;
  const r2 = r * r;
  const { width, height, mask } = editor;
  for (let y = Math.max(0, Math.floor(cy - r)); y <= Math.min(height - 1, Math.ceil(cy + r)); y++) {
    for (let x = Math.max(0, Math.floor(cx - r)); x <= Math.min(width - 1, Math.ceil(cx + r)); x++) {
      const dx = x - cx;
      const dy = y - cy;
      if (dx * dx + dy * dy <= r2 || (r < 1 && dx === 0 && dy === 0)) mask[y * width + x] = value;
    }
  }
}

function paintLine(from, to, value) {
  const steps = Math.max(1, Math.ceil(Math.hypot(to[0] - from[0], to[1] - from[1]) / Math.max(1, editor.size / 4)));
  for (let s = 0; s <= steps; s++) {
    dab(from[0] + ((to[0] - from[0]) * s) / steps, from[1] + ((to[1] - from[1]) * s) / steps, value);
  }
}

// Fill the 4-connected region of equal value under (x, y) with polyp.
function fill(x, y) {
  const { width, height, mask } = editor;
  if (x < 0 || y < 0 || x >= width || y >= height) return false;
  const start = y * width + x;
  const from = mask[start];
  if (from === 1) return false;
  const stack = [start];
  mask[start] = 1;
  while (stack.length) {
    const i = stack.pop();
    const px = i % width;
    for (const j of [px > 0 ? i - 1 : -1, px < width - 1 ? i + 1 : -1, i - width, i + width]) {
      if (j >= 0 && j < mask.length && mask[j] === from) { mask[j] = 1; stack.push(j); }
    }
  }
  return true;
}

// ------------------------------------------------------------------ the polygon tool

// Fill (value 1) or erase (0) a closed polygon whose vertices are pixel indices, at full resolution.
// Rasterised here rather than with a canvas path fill: canvas fills are always antialiased
// (imageSmoothingEnabled only governs scaled images), so their edge pixels come out partly covered,
// and thresholding that coverage would make the saved mask depend on the browser's rasteriser. This
// sets every pixel whose centre lies inside (even-odd rule, for an outline that crosses itself) and
// every pixel of the outline, so the pixels clicked as vertices always belong to the polygon, in
// every browser alike; the mask stays 0/1 (saved as 0/255).
function fillPolygon(points, value) {
  const { width, height, mask } = editor;
  const n = points.length;
  const ys = points.map((p) => p[1]);
  for (let y = Math.max(0, Math.min(...ys)); y <= Math.min(height - 1, Math.max(...ys)); y++) {
    const crossings = [];
    for (let i = 0; i < n; i++) {
      const [x0, y0] = points[i];
      const [x1, y1] = points[(i + 1) % n];
      if ((y0 <= y && y < y1) || (y1 <= y && y < y0)) crossings.push(x0 + ((y - y0) * (x1 - x0)) / (y1 - y0));
    }
    crossings.sort((a, b) => a - b);
    for (let c = 0; c + 1 < crossings.length; c += 2) {
      const end = Math.min(width - 1, Math.floor(crossings[c + 1]));
      for (let x = Math.max(0, Math.ceil(crossings[c])); x <= end; x++) mask[y * width + x] = value;
    }
  }
  for (let i = 0; i < n; i++) rasterLine(points[i], points[(i + 1) % n], value);
}

// Bresenham's line between two pixels (both inside the image).
function rasterLine([x0, y0], [x1, y1], value) {
  const dx = Math.abs(x1 - x0);
  const dy = -Math.abs(y1 - y0);
  const sx = x0 < x1 ? 1 : -1;
  const sy = y0 < y1 ? 1 : -1;
  let err = dx + dy;
  for (;;) {
    editor.mask[y0 * editor.width + x0] = value;
    if (x0 === x1 && y0 === y1) return;
    const e2 = 2 * err;
    if (e2 >= dy) { err += dy; x0 += sx; }
    if (e2 <= dx) { err += dx; y0 += sy; }
  }
}

// The pixel under the pointer, kept inside the image (a click just past an edge means the edge).
function clampedPixelAt(event) {
  const [x, y] = pixelAt(event);
  return [Math.min(editor.width - 1, Math.max(0, x)), Math.min(editor.height - 1, Math.max(0, y))];
}

function nearFirstVertex(event) {
  const first = editor.polygon.points[0];
  const box = $("editor-canvas").getBoundingClientRect();
  const sx = box.left + ((first[0] + 0.5) / editor.width) * box.width;
  const sy = box.top + ((first[1] + 0.5) / editor.height) * box.height;
  return Math.hypot(event.clientX - sx, event.clientY - sy) <= CLOSE_RADIUS_PX;
}

// A click with a polygon tool adds a vertex, or closes the polygon on its first vertex.
function polygonClick(event) {
  if (!editor.polygon) editor.polygon = { points: [], pointer: null, erase: editor.tool === "polygon-erase" };
  const { points } = editor.polygon;
  if (points.length >= 3 && nearFirstVertex(event)) { closePolygon(); return; }
  const point = clampedPixelAt(event);
  const last = points[points.length - 1];
  if (!last || last[0] !== point[0] || last[1] !== point[1]) points.push(point);
  editor.polygon.pointer = point;
  drawPolygonPreview();
}

// Fill the polygon (or, with the polygon eraser, remove it) as one undo step.
function closePolygon() {
  const polygon = editor.polygon;
  if (!editorReady()) return;
  if (!polygon || polygon.points.length < 3) {
    if (polygon) $("editor-polygon-hint").textContent = "A polygon needs at least 3 points.";
    return;
  }
  editor.polygon = null;
  const before = Uint8Array.from(editor.mask);
  fillPolygon(polygon.points, polygon.erase ? 0 : 1);
  if (editor.mask.some((v, i) => v !== before[i])) {
    pushUndo(before);
    markEdited();
  }
  drawPolygonPreview();
  drawEditor();
}

function cancelPolygon() {
  editor.polygon = null;
  drawPolygonPreview();
}

function removeLastVertex() {
  if (!editor.polygon) return;
  editor.polygon.points.pop();
  if (!editor.polygon.points.length) editor.polygon = null;
  drawPolygonPreview();
}

// The polygon in progress, drawn over the canvas in an SVG of the image's size (same transform as
// the canvas): its outline so far, the edge to the pointer, and the first vertex as the close target.
function drawPolygonPreview() {
  const polygon = editor.polygon;
  const shape = $("editor-polygon");
  const start = $("editor-polygon-start");
  $("editor").dataset.polygonPoints = String(polygon ? polygon.points.length : 0);
  $("editor").dataset.polygonErase = String(polygon ? polygon.erase : editor.tool === "polygon-erase");
  if (!polygon || !polygon.points.length) {
    shape.setAttribute("points", "");
    start.setAttribute("r", "0");
    $("editor-polygon-hint").textContent = POLYGON_TOOLS.has(editor.tool)
      ? "Click to add points; double-click, Enter or a click on the first point fills the polygon." : "";
    return;
  }
  const points = polygon.pointer ? [...polygon.points, polygon.pointer] : polygon.points;
  shape.setAttribute("points", points.map(([x, y]) => `${x + 0.5},${y + 0.5}`).join(" "));
  const box = $("editor-canvas").getBoundingClientRect();
  const unitsPerPx = box.width ? editor.width / box.width : 1;
  const [fx, fy] = polygon.points[0];
  start.setAttribute("cx", String(fx + 0.5));
  start.setAttribute("cy", String(fy + 0.5));
  start.setAttribute("r", String(CLOSE_RADIUS_PX * unitsPerPx * 0.6));
  const action = polygon.erase ? "removes" : "fills";
  $("editor-polygon-hint").textContent =
    `Polygon: ${plural(polygon.points.length, "point")}. Double-click, Enter or a click on the first point ${action} it; ` +
    "Backspace removes the last point, Escape cancels.";
}

function applyEditorView() {
  const { scale, x, y } = editor.view;
  $("editor-canvas").style.transform = `translate(${x}%, ${y}%) scale(${scale})`;
  $("editor-overlay").style.transform = `translate(${x}%, ${y}%) scale(${scale})`;
  $("editor-zoom").textContent = `${Math.round(scale * 100)} %`;
  $("editor").dataset.zoom = String(scale);
  if (editor.polygon) drawPolygonPreview();  // the close target keeps its size on screen
}

function editorZoom(factor, u = 0.5, v = 0.5) {
  const view = editor.view;
  const px = (u * 100 - view.x) / view.scale;
  const py = (v * 100 - view.y) / view.scale;
  view.scale = Math.min(32, Math.max(1, view.scale * factor));
  const min = -(view.scale - 1) * 100;
  view.x = Math.min(0, Math.max(min, u * 100 - px * view.scale));
  view.y = Math.min(0, Math.max(min, v * 100 - py * view.scale));
  applyEditorView();
}

function editorResetView() {
  editor.view = { scale: 1, x: 0, y: 0 };
  applyEditorView();
}

async function saveCorrection() {
  const r = state.result;
  if (!editorReady()) return;
  const name = r.name;
  const { ticket, edits } = editor;
  const gray = new Uint8Array(editor.mask.length);
  for (let i = 0; i < gray.length; i++) gray[i] = editor.mask[i] ? 255 : 0;
  const form = new FormData();
  form.append("mask", await encodeGrayPng(gray, editor.width, editor.height), `${stem(name)}.png`);
  form.append("file", r.blob, name);
  $("editor-save").disabled = true;
  try {
    const record = await apiJson(
      `/v1/reviews/${encodeURIComponent(name)}/mask?threshold=${thresholdText(currentThreshold())}`,
      { method: "PUT", body: form });
    // Edits made while the mask was on its way are not in the saved file: they stay unsaved.
    const later = editor.ticket === ticket && editor.edits !== edits;
    if (editor.ticket === ticket && !later) { editor.dirty = false; editor.source = "saved"; drawEditor(); }
    storeRecord(record);
    setStatus(`${name}: corrected mask saved${later ? "; the edits made since are not saved yet" : ""}.`, "ok");
  } catch (error) {
    setStatus(named(name, `the mask was not saved: ${error.message}`), "error");
  } finally {
    $("editor-save").disabled = false;
  }
}

async function exportReview(format) {
  try {
    const blob = await (await api(`/v1/reviews/export?format=${format}`)).blob();
    saveBlob(blob, format === "zip" ? "review-dataset.zip" : `review.${format}`);
  } catch (error) {
    setStatus(`Export failed: ${error.message}`, "error");
  }
}

// ------------------------------------------------------------------ events

for (const button of document.querySelectorAll("#review .verdict")) {
  button.addEventListener("click", () => putVerdict(button.dataset.status));
}
$("review-note").addEventListener("input", noteTyped);
$("review-note").addEventListener("change", saveNote);
for (const button of document.querySelectorAll("#editor .tool")) {
  button.addEventListener("click", () => setTool(button.dataset.tool));
}
$("editor-size").addEventListener("input", () => setBrushSize(Number($("editor-size").value)));
$("editor-opacity").addEventListener("input", drawEditor);
$("editor-undo").addEventListener("click", undo);
$("editor-redo").addEventListener("click", redo);
$("editor-from-model").addEventListener("click", () => {
  if (!editorReady()) return;
  startFromModel();
  markEdited();
  drawEditor();
});
$("editor-save").addEventListener("click", saveCorrection);
$("editor-zoom-in").addEventListener("click", () => editorZoom(1.5));
$("editor-zoom-out").addEventListener("click", () => editorZoom(1 / 1.5));
$("editor-zoom-reset").addEventListener("click", editorResetView);
for (const format of ["csv", "json", "zip"]) {
  $(`review-export-${format}`).addEventListener("click", () => exportReview(format));
}

{
  const viewport = $("editor-viewport");
  viewport.addEventListener("wheel", (event) => {
    event.preventDefault();
    const box = viewport.getBoundingClientRect();
    editorZoom(event.deltaY < 0 ? 1.25 : 0.8, (event.clientX - box.left) / box.width, (event.clientY - box.top) / box.height);
  }, { passive: false });
  viewport.addEventListener("contextmenu", (event) => event.preventDefault());
  viewport.addEventListener("pointerdown", (event) => {
    if (!editorReady()) return;
    viewport.setPointerCapture(event.pointerId);
    // Middle or right button, or the pan tool: pan. Otherwise the tool paints.
    if (event.button === 1 || event.button === 2 || editor.tool === "pan") {
      editor.pan = { x: event.clientX, y: event.clientY, view: { ...editor.view } };
      return;
    }
    if (POLYGON_TOOLS.has(editor.tool)) return;  // vertices are added on click (see below)
    const point = pixelAt(event);
    if (editor.tool === "fill") {
      const before = Uint8Array.from(editor.mask);
      if (fill(point[0], point[1])) {
        pushUndo(before);
        markEdited();
        drawEditor();
      }
      return;
    }
    pushUndo();
    editor.stroke = { last: point };
    paintLine(point, point, editor.tool === "eraser" ? 0 : 1);
    markEdited();
    drawEditor();
  });
  viewport.addEventListener("pointermove", (event) => {
    if (editor.pan) {
      const box = viewport.getBoundingClientRect();
      const view = editor.view;
      const min = -(view.scale - 1) * 100;
      view.x = Math.min(0, Math.max(min, editor.pan.view.x + ((event.clientX - editor.pan.x) / box.width) * 100));
      view.y = Math.min(0, Math.max(min, editor.pan.view.y + ((event.clientY - editor.pan.y) / box.height) * 100));
      applyEditorView();
      return;
    }
    if (editor.polygon && POLYGON_TOOLS.has(editor.tool)) {
      editor.polygon.pointer = clampedPixelAt(event);
      drawPolygonPreview();
      return;
    }
    if (!editor.stroke || !editorReady()) return;
    const point = pixelAt(event);
    paintLine(editor.stroke.last, point, editor.tool === "eraser" ? 0 : 1);
    editor.stroke.last = point;
    markEdited();
    drawEditor();
  });
  const stop = () => { editor.stroke = null; editor.pan = null; };
  viewport.addEventListener("pointerup", stop);
  viewport.addEventListener("pointercancel", stop);
  // Polygon vertices: the first click of a double-click adds one, the second (detail 2) none, and
  // the double-click closes the polygon.
  viewport.addEventListener("click", (event) => {
    if (!editorReady() || !POLYGON_TOOLS.has(editor.tool) || event.button !== 0 || event.detail > 1) return;
    polygonClick(event);
  });
  viewport.addEventListener("dblclick", (event) => {
    if (editorReady() && POLYGON_TOOLS.has(editor.tool)) { event.preventDefault(); closePolygon(); }
  });
  viewport.addEventListener("pointerleave", () => {
    if (editor.polygon) { editor.polygon.pointer = null; drawPolygonPreview(); }
  });
}

// Review and editor keys; like the page's other keys, none act while a form control has the focus.
document.addEventListener("keydown", (event) => {
  if (!review.enabled || !state.result) return;
  const target = event.target;
  if (target instanceof HTMLElement && (target.closest("input, select, textarea, video") || target.isContentEditable)) return;
  const key = event.key.toLowerCase();
  const ctrl = event.ctrlKey || event.metaKey;
  let handled = true;
  if (ctrl && key === "z" && !event.shiftKey) undo();
  else if (ctrl && (key === "y" || (key === "z" && event.shiftKey))) redo();
  else if (ctrl && key === "s") saveCorrection();
  else if (ctrl || event.altKey) handled = false;
  else if (key === "a") putVerdict("accept");
  else if (key === "r") putVerdict("reject");
  else if (key === "c") putVerdict("needs_correction");
  else if (key === "b") setTool("brush");
  else if (key === "e") setTool("eraser");
  else if (key === "f") setTool("fill");
  else if (key === "h") setTool("pan");
  else if (key === "l") setTool(event.shiftKey ? "polygon-erase" : "polygon");
  else if (editor.polygon && key === "enter") closePolygon();
  else if (editor.polygon && key === "escape") cancelPolygon();
  else if (editor.polygon && key === "backspace") removeLastVertex();
  else if (key === "[") setBrushSize(editor.size / 1.25);
  else if (key === "]") setBrushSize(editor.size * 1.25 + 1);
  else handled = false;
  if (handled) event.preventDefault();
});

// Before the tab is closed or reloaded: unsent note text is sent alone (keepalive outlives the page;
// the server keeps the stored verdict), and for unsaved mask edits the browser asks.
window.addEventListener("beforeunload", (event) => {
  if (!review.enabled) return;
  if (review.note) {
    const { name } = review.note;
    putRecord(name, { note: takeNote(name) }, { keepalive: true }).catch(() => {});
  }
  if (editor.dirty && editor.mask) event.preventDefault();
});

setTool("brush");
setBrushSize(editor.size);
