// The gallery (newest first, "load more" follows the Link header) and the detail view with its boxes.
import { nextLink, request } from "./api.js";

const el = (tag, { dataset = {}, ...props } = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset); // dataset itself cannot be assigned, only its keys
  node.append(...children);
  return node;
};

function tags(objects) {
  return el("div", { className: "tags" }, ...objects.map((o) => el("span", { className: "tag" }, o)));
}

export function setupGallery({ onError, onChanged }) {
  const list = document.getElementById("gallery");
  const more = document.getElementById("more");
  const status = document.getElementById("gallery-status");
  const dialog = document.getElementById("detail");
  let next = null;
  let current = null; // the image open in the detail view

  function card(image) {
    const thumb = el("img", { src: image.file_url, alt: image.label, loading: "lazy", decoding: "async" });
    const open = el("button", { type: "button", title: `Open ${image.label}` },
      thumb, el("div", { className: "caption" }, el("div", { className: "title" }, image.label), tags(image.objects)));
    open.addEventListener("click", () => show(image));
    return el("li", { className: "card", dataset: { id: String(image.id) } }, open);
  }

  async function load(url, replace) {
    try {
      const { body, headers } = await request("GET", url);
      if (replace) list.replaceChildren();
      list.append(...body.map(card));
      next = nextLink(headers);
      more.hidden = !next;
      status.textContent = list.children.length ? "" : "No images yet.";
    } catch (err) {
      onError(err.message);
    }
  }

  function drawBoxes(image) {
    const boxes = document.getElementById("boxes");
    boxes.replaceChildren(...image.detections.map((d) => {
      const b = d.box;
      const box = el("div", { className: b.y_min < 0.06 ? "box low" : "box" },
        el("span", {}, `${d.label} ${Math.round(d.confidence * 100)}%`));
      // Percentages of the stage, which is exactly the displayed image: right at any size.
      Object.assign(box.style, {
        left: `${b.x_min * 100}%`, top: `${b.y_min * 100}%`,
        width: `${(b.x_max - b.x_min) * 100}%`, height: `${(b.y_max - b.y_min) * 100}%`,
      });
      box.dataset.label = d.label;
      return box;
    }));
  }

  function show(image) {
    current = image;
    document.getElementById("detail-title").textContent = image.label;
    const img = document.getElementById("detail-img");
    img.alt = image.label;
    img.src = image.file_url;
    drawBoxes(image);
    const meta = document.getElementById("detail-meta");
    const rows = [
      ["Objects", image.detection_enabled ? (image.objects.join(", ") || "none found") : "detection was off"],
      ["Label", `${image.label}${image.label_generated ? " (generated)" : ""}`],
      ["Size", `${image.width} × ${image.height}, ${(image.size / 1024).toFixed(0)} KB, ${image.content_type}`],
      ["Added", new Date(image.created_at).toLocaleString()],
      ["Source", image.source_url || "upload"],
      ["sha256", image.sha256],
    ];
    meta.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    document.getElementById("detail-file").href = image.file_url;
    dialog.showModal();
  }

  document.getElementById("detail-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); }); // the backdrop
  document.getElementById("detail-delete").addEventListener("click", async () => {
    if (!current || !confirm(`Delete "${current.label}"?`)) return;
    try {
      await request("DELETE", `/images/${current.id}`);
      list.querySelector(`[data-id="${current.id}"]`)?.remove();
      dialog.close();
      onChanged();
    } catch (err) {
      onError(err.message);
    }
  });
  more.addEventListener("click", () => next && load(next, false));

  return {
    load: (url) => load(url, true),
    show,
    prepend(image) { list.prepend(card(image)); status.textContent = ""; },
  };
}
