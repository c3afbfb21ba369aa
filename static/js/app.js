// The page: health, the object search (kept in the page URL, so a search can be bookmarked), and the
// three parts wired together.
import { request } from "./api.js";
import { setupGallery } from "./gallery.js";
import { setupImgur } from "./imgur.js";
import { setupSession } from "./session.js";
import { setupUpload } from "./upload.js";

const alertBox = document.getElementById("alert");
const alertText = document.getElementById("alert-text");

function showError(message) {
  alertText.textContent = message;
  alertBox.hidden = false;
}
document.getElementById("alert-close").addEventListener("click", () => { alertBox.hidden = true; });

// ----- the search, read from and written to the page URL (?objects=dog,cat&match=all) -----

function filterFromUrl() {
  const q = new URLSearchParams(location.search);
  const objects = (q.get("objects") || "").split(",").map((s) => s.trim().toLowerCase()).filter(Boolean);
  return { objects: new Set(objects), match: q.get("match") === "all" ? "all" : "any" };
}

let filter = filterFromUrl();

function apiUrl() {
  if (!filter.objects.size) return "/images?limit=24";
  const q = new URLSearchParams({ objects: [...filter.objects].join(","), match: filter.match, limit: "24" });
  return `/images?${q}`;
}

function pageUrl() {
  if (!filter.objects.size) return location.pathname;
  return `${location.pathname}?${new URLSearchParams({ objects: [...filter.objects].join(","), match: filter.match })}`;
}

const gallery = setupGallery({ onError: showError, onChanged: () => refreshChips() });

async function refreshChips() {
  const chips = document.getElementById("chips");
  try {
    const { body } = await request("GET", "/objects");
    const names = new Set(body.map((o) => o.name));
    const missing = [...filter.objects].filter((n) => !names.has(n)).map((name) => ({ name, images: 0 }));
    chips.replaceChildren(...[...body, ...missing].map(({ name, images }) => {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "chip";
      chip.dataset.name = name;
      chip.setAttribute("aria-pressed", String(filter.objects.has(name)));
      chip.append(name, Object.assign(document.createElement("span"), { className: "count", textContent: `(${images})` }));
      chip.addEventListener("click", () => {
        if (filter.objects.has(name)) filter.objects.delete(name); else filter.objects.add(name);
        apply(true);
      });
      return chip;
    }));
    if (!chips.children.length) chips.textContent = "Objects appear here once images are analysed.";
  } catch (err) {
    showError(err.message);
  }
}

function apply(push) {
  if (push) history.pushState(null, "", pageUrl());
  for (const chip of document.querySelectorAll(".chip")) {
    chip.setAttribute("aria-pressed", String(filter.objects.has(chip.dataset.name)));
  }
  for (const radio of document.querySelectorAll("input[name=match]")) radio.checked = radio.value === filter.match;
  document.getElementById("clear-filter").hidden = !filter.objects.size;
  gallery.load(apiUrl());
}

for (const radio of document.querySelectorAll("input[name=match]")) {
  radio.addEventListener("change", () => { filter.match = radio.value; if (filter.objects.size) apply(true); });
}
document.getElementById("clear-filter").addEventListener("click", () => { filter.objects.clear(); apply(true); });
window.addEventListener("popstate", () => { filter = filterFromUrl(); apply(false); });

// ----- the rest -----

const uploader = setupUpload({
  onError: showError,
  onAdded(image) {
    alertBox.hidden = true;
    refreshChips();
    if (filter.objects.size) apply(false); else gallery.prepend(image);
    gallery.show(image);
  },
});
const imgur = setupImgur({ onError: showError });
const session = setupSession({
  onSignedIn() {
    alertBox.hidden = true;
    loadAll();
  },
});

async function checkHealth() {
  const health = document.getElementById("health");
  try {
    const { body } = await request("GET", "/health");
    const d = body.detector;
    health.textContent = d.ready
      ? `Version ${body.version} · detecting with ${d.model.split("/").pop()} (${d.runtime})`
      : `Version ${body.version} · object detection is unavailable`;
    health.classList.toggle("bad", !d.ready);
    uploader.detectionAvailable(d.ready, d.error || "");
    session.mode(body.auth);
  } catch (err) {
    health.textContent = err.message;
    health.classList.add("bad");
  }
}

function loadAll() {
  checkHealth();
  refreshChips();
  apply(false);
  imgur.refreshLinks();
}

loadAll();
