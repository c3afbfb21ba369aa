// The detail view: the picture (a 640 or 1280 px thumbnail) with its detections drawn, the list of
// detections under it, a slider that hides boxes below a confidence, a switch for the labels.
//
// Opening an image puts a fresh <img> in a hidden stage and shows "Loading the picture…" until that
// <img> has loaded and decoded: Chromium keeps painting an <img>'s old picture while its new `src`
// loads, so reusing one element showed the last image under the new boxes. An answer for an image
// that is no longer the one open is dropped.
import { isAbort, request } from "./api.js";
import { el } from "./gallery.js";
import { retryOnError, setPicture } from "./pictures.js";

const pct = (c) => `${Math.round(c * 100)}%`;

/**
 * Where each label goes (most confident first): beside its box (above it, inside its top, below it,
 * inside its bottom, at its left or right edge), else further along the box's sides, else the free spot
 * of the picture nearest the box; always inside the picture, and over as little of the labels already
 * placed as can be. `items`: [{box, w, h}] in pixels of a `width` x `height` picture; sets x and y.
 */
export function placeLabels(items, width, height) {
  const placed = [];
  const overlap = (a, b) =>
    Math.max(0, Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x)) *
    Math.max(0, Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y));
  for (const it of items) {
    const { w, h } = it;
    const [x0, y0, x1, y1] = [it.box.x_min * width, it.box.y_min * height, it.box.x_max * width, it.box.y_max * height];
    let best = null;
    const consider = (sx, sy) => {
      const spot = { x: Math.min(Math.max(sx, 0), Math.max(width - w, 0)), y: Math.min(Math.max(sy, 0), Math.max(height - h, 0)), w, h };
      const cost = placed.reduce((sum, p) => sum + overlap(spot, p), 0);
      const far = Math.hypot(spot.x - x0, spot.y - (y0 - h));
      if (!best || cost < best.cost || (cost === best.cost && far < best.far)) best = { ...spot, cost, far };
    };
    for (const x of [x0, x1 - w]) for (const y of [y0 - h, y0, y1, y1 - h]) consider(x, y);
    for (let k = 1; best.cost > 0 && k <= Math.ceil((y1 - y0) / h) + 3; k++) {
      for (const x of [x0, x1 - w]) { consider(x, y0 + k * h); consider(x, y0 - h - k * h); }
    }
    if (best.cost > 0) { // crowded: the nearest free spot anywhere on the picture
      for (let y = 0; y <= height - h; y += h / 2) for (let x = 0; x <= width - w; x += w / 4) consider(x, y);
    }
    placed.push(best);
    it.x = best.x;
    it.y = best.y;
  }
  return items;
}

export function setupDetail({ gallery, onDeleted }) {
  const dialog = document.getElementById("detail");
  const title = document.getElementById("detail-title");
  const stage = document.getElementById("stage");
  const loading = document.getElementById("detail-loading");
  const boxes = document.getElementById("boxes");
  const list = document.getElementById("detections");
  const slider = document.getElementById("min-confidence");
  const sliderValue = document.getElementById("min-confidence-value");
  const labelsSwitch = document.getElementById("show-labels");
  const error = document.getElementById("detail-error");
  let current = null;
  let opened = 0; // bumped by each show(): a late picture of an earlier image is dropped
  let controller = new AbortController();

  function drawBoxes(image) {
    const made = image.detections.map((d) => {
      const b = d.box;
      const box = el("div", { className: "box", dataset: { label: d.label, confidence: String(d.confidence) } });
      // Percentages of the stage, which is exactly the displayed image: right at any size.
      Object.assign(box.style, {
        left: `${b.x_min * 100}%`, top: `${b.y_min * 100}%`,
        width: `${(b.x_max - b.x_min) * 100}%`, height: `${(b.y_max - b.y_min) * 100}%`,
      });
      const tag = el("span", { className: "box-label", dataset: { label: d.label } }, `${d.label} ${pct(d.confidence)}`);
      return { d, box, tag };
    });
    boxes.replaceChildren(...made.map((m) => m.box), ...made.map((m) => m.tag));
    boxes.made = made;
    refresh();
  }

  /** Apply the slider and the switch, then place the labels that are shown. */
  function refresh() {
    const min = Number(slider.value) / 100;
    sliderValue.textContent = `${slider.value}%`;
    boxes.classList.toggle("no-labels", !labelsSwitch.checked);
    const made = boxes.made || [];
    for (const m of made) {
      const hide = m.d.confidence < min;
      m.box.hidden = hide;
      m.tag.hidden = hide || !labelsSwitch.checked;
    }
    for (const li of list.children) li.classList.toggle("below", Number(li.dataset.confidence) < min);
    const width = stage.clientWidth;
    const height = stage.clientHeight;
    if (!width || !height) return;
    const shown = made.filter((m) => !m.tag.hidden).sort((a, b) => b.d.confidence - a.d.confidence);
    for (const m of shown) m.tag.style.maxWidth = `${width}px`;
    const items = placeLabels(shown.map((m) => ({ m, box: m.d.box, w: m.tag.offsetWidth, h: m.tag.offsetHeight })), width, height);
    for (const it of items) Object.assign(it.m.tag.style, { left: `${it.x}px`, top: `${it.y}px` });
  }
  slider.addEventListener("input", refresh);
  labelsSwitch.addEventListener("change", refresh);
  new ResizeObserver(() => { if (!stage.hidden) refresh(); }).observe(stage);

  function listDetections(image) {
    if (!image.detections.length) {
      list.replaceChildren(el("li", { className: "none" }, image.detection_enabled ? "No objects found." : "Detection was off for this image."));
      return;
    }
    const sorted = [...image.detections].sort((a, b) => b.confidence - a.confidence);
    list.replaceChildren(...sorted.map((d) => el("li", { dataset: { confidence: String(d.confidence) } },
      el("span", { className: "name" }, d.label), " ", el("span", { className: "confidence" }, pct(d.confidence)))));
  }

  function show(image) {
    const mine = ++opened;
    controller.abort();
    controller = new AbortController();
    current = image;
    error.hidden = true;
    title.textContent = image.label;
    stage.hidden = true;
    boxes.replaceChildren();
    boxes.made = [];
    loading.hidden = false;
    loading.textContent = "Loading the picture…";
    const img = el("img", { id: "detail-img", alt: image.label });
    img.addEventListener("load", async () => {
      if (mine !== opened) return;
      try { await img.decode(); } catch { /* shown anyway: it loaded */ }
      if (mine !== opened) return;
      loading.hidden = true;
      stage.hidden = false;
      drawBoxes(image);
    }, { signal: controller.signal });
    retryOnError(img, {
      signal: controller.signal,
      onFailed: (err) => { if (mine === opened) loading.textContent = `The picture could not be loaded: ${err.message}`; },
    });
    setPicture(img, image, 640, 1280);
    document.getElementById("detail-img").replaceWith(img);
    listDetections(image);
    const meta = document.getElementById("detail-meta");
    const rows = [
      ["Objects", image.detection_enabled ? (image.objects.join(", ") || "none found") : "detection was off"],
      ["Label", `${image.label}${image.label_generated ? " (generated)" : ""}`],
      ["File", image.filename || "not known"],
      ["Size", `${image.width} × ${image.height}, ${(image.size / 1024).toFixed(0)} KB, ${image.content_type}`],
      ["Added", new Date(image.created_at).toLocaleString()],
      ["Source", image.source_url || "upload"],
      ["sha256", image.sha256],
    ];
    meta.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    document.getElementById("detail-file").href = image.file_url;
    if (!dialog.open) dialog.showModal();
  }

  const close = () => dialog.close();
  dialog.addEventListener("close", () => { // the Close button, the backdrop, Escape
    opened++; // a picture still on its way is for nobody now
    controller.abort();
  });
  document.getElementById("detail-close").addEventListener("click", close);
  dialog.addEventListener("click", (e) => { if (e.target === dialog) close(); }); // the backdrop
  document.getElementById("detail-delete").addEventListener("click", async () => {
    const image = current;
    if (!image || !confirm(`Delete "${image.label}"?`)) return;
    try {
      await request("DELETE", `/images/${image.id}`);
    } catch (err) {
      if (isAbort(err)) return;
      error.textContent = `It was not deleted: ${err.message}`;
      error.hidden = false;
      return;
    }
    const focus = gallery.remove(image.id);
    close();
    focus.focus(); // after close(), which would hand focus back to the card that is gone
    onDeleted();
  });

  return { show };
}
