// The page: health (read again whenever the page comes back into view), the object search (kept in the
// page URL, so a search can be bookmarked), and the parts wired together.
import { request } from "./api.js";
import { setupDetail } from "./detail.js";
import { setupGallery } from "./gallery.js";
import { setupImgur } from "./imgur.js";
import { setupSession } from "./session.js";
import { setupUpload } from "./upload.js";

const alertBox = document.getElementById("alert");
const alertText = document.getElementById("alert-text");

// The alert at the top is for what belongs to no control (the health check, the object list); each form
// shows its own errors beside it.
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
const PAGE = "24";

function apiUrl() {
  if (!filter.objects.size) return `/images?limit=${PAGE}`;
  const q = new URLSearchParams({ objects: [...filter.objects].join(","), match: filter.match, limit: PAGE });
  return `/images?${q}`;
}

function pageUrl() {
  if (!filter.objects.size) return location.pathname;
  return `${location.pathname}?${new URLSearchParams({ objects: [...filter.objects].join(","), match: filter.match })}`;
}

function emptyText() {
  if (!filter.objects.size) return "No images yet.";
  const names = [...filter.objects].join(filter.match === "all" ? " and " : " or ");
  return `Nothing matches: no image shows ${names}.`;
}

const gallery = setupGallery({ onOpen: (image) => detail.show(image) });
const detail = setupDetail({ gallery, onDeleted: () => refreshChips() });

let chipsAsked = 0; // the newest /objects answer wins
async function refreshChips() {
  const chips = document.getElementById("chips");
  const mine = ++chipsAsked;
  try {
    const { body } = await request("GET", "/objects");
    if (mine !== chipsAsked) return;
    const names = new Set(body.map((o) => o.name));
    // A searched word that is no object's name (a plural, a category such as "animal", or a name no image
    // has) gets a chip without a count: the service expands it, so a count of 0 would be wrong.
    const missing = [...filter.objects].filter((n) => !names.has(n)).map((name) => ({ name, images: null }));
    chips.replaceChildren(...[...body, ...missing].map(({ name, images }) => {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = "chip";
      chip.dataset.name = name;
      chip.setAttribute("aria-pressed", String(filter.objects.has(name)));
      chip.append(name);
      if (images !== null) chip.append(Object.assign(document.createElement("span"), { className: "count", textContent: `(${images})` }));
      chip.addEventListener("click", () => {
        if (filter.objects.has(name)) filter.objects.delete(name); else filter.objects.add(name);
        apply(true);
      });
      return chip;
    }));
    if (!chips.children.length) chips.textContent = "Objects appear here once images are analysed.";
  } catch (err) {
    if (mine === chipsAsked) showError(`The list of objects could not be read: ${err.message}`);
  }
}

function apply(push) {
  if (push) history.pushState(null, "", pageUrl());
  for (const chip of document.querySelectorAll(".chip")) {
    chip.setAttribute("aria-pressed", String(filter.objects.has(chip.dataset.name)));
  }
  for (const radio of document.querySelectorAll("input[name=match]")) radio.checked = radio.value === filter.match;
  document.getElementById("clear-filter").hidden = !filter.objects.size;
  gallery.load(apiUrl(), emptyText());
}

for (const radio of document.querySelectorAll("input[name=match]")) {
  radio.addEventListener("change", () => { filter.match = radio.value; if (filter.objects.size) apply(true); });
}
document.getElementById("clear-filter").addEventListener("click", () => { filter.objects.clear(); apply(true); });
window.addEventListener("popstate", () => { filter = filterFromUrl(); apply(false); });

// ----- the rest -----

const uploader = setupUpload({
  onAdded(image) {
    refreshChips();
    if (filter.objects.size) apply(false); else gallery.prepend(image);
  },
  onShow: (image) => detail.show(image),
});
const imgur = setupImgur();
const session = setupSession({
  onSignedIn() {
    alertBox.hidden = true;
    loadAll();
  },
});

let healthBusy = false;
async function checkHealth() {
  if (healthBusy) return;
  healthBusy = true;
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
    imgur.check(body);
  } catch (err) {
    health.textContent = err.message;
    health.classList.add("bad");
  } finally {
    healthBusy = false;
  }
}
// A model added, or Imgur set up, while the page sat in another tab shows when the page is back.
document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") checkHealth(); });
window.addEventListener("focus", checkHealth);

function loadAll() {
  checkHealth();
  refreshChips();
  apply(false);
  imgur.refreshLinks();
}

loadAll();
