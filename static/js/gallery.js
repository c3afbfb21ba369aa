// The gallery: newest first, "Load more" follows the Link header. Each view change (a search, a chip,
// "Show all") cancels the requests of the view before it, and an answer that still arrives for an older
// view is dropped: the gallery shows only what the newest view asked for. "Load more" sends one request
// at a time and never adds an id the gallery already shows.
import { isAbort, nextLink, request } from "./api.js";
import { retryOnError, setPictureWhenNear, showNearNow } from "./pictures.js";

export const el = (tag, { dataset = {}, ...props } = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset); // dataset itself cannot be assigned, only its keys
  node.append(...children);
  return node;
};

/** Where an image came from, for people: the uploaded file's name, else the URL's last segment. */
export function sourceName(image) {
  if (image.filename) return image.filename;
  if (!image.source_url) return "";
  try {
    const u = new URL(image.source_url);
    const last = decodeURIComponent(u.pathname.split("/").filter(Boolean).pop() || "");
    return last || u.host;
  } catch {
    return image.source_url;
  }
}

function tags(objects) {
  return el("div", { className: "tags" }, ...objects.map((o) => el("span", { className: "tag" }, o)));
}

export function setupGallery({ onOpen }) {
  const list = document.getElementById("gallery");
  const more = document.getElementById("more");
  const status = document.getElementById("gallery-status");
  const error = document.getElementById("gallery-error");
  const shown = new Set(); // ids in the gallery
  let view = 0; // bumped by each load(): answers for an older view are dropped
  let controller = new AbortController();
  let next = null;
  let moreBusy = false;
  let emptyText = "No images yet.";

  function showError(message) {
    error.textContent = message;
    error.hidden = !message;
  }

  function card(image) {
    const thumb = el("img", { alt: image.label, decoding: "async", width: 320, height: 240 });
    retryOnError(thumb, { signal: controller.signal });
    setPictureWhenNear(thumb, image, 320, 640);
    const source = sourceName(image);
    const caption = el("div", { className: "caption" }, el("div", { className: "title" }, image.label));
    if (source && source !== image.label) caption.append(el("div", { className: "source" }, source));
    caption.append(tags(image.objects));
    const open = el("button", { type: "button", title: `Open ${image.label}` }, thumb, caption);
    open.addEventListener("click", () => onOpen(image));
    return el("li", { className: "card", dataset: { id: String(image.id) } }, open);
  }

  function add(images) {
    for (const image of images) {
      if (shown.has(image.id)) continue;
      shown.add(image.id);
      list.append(card(image));
    }
    showNearNow();
  }

  function renderStatus() {
    status.textContent = list.children.length ? "" : emptyText;
    more.hidden = !next;
  }

  /** Replace the gallery with the answer to `url`; `empty` is said when it has no image. */
  async function load(url, empty = "No images yet.") {
    controller.abort();
    controller = new AbortController();
    const mine = ++view;
    const { signal } = controller;
    next = null;
    moreBusy = false;
    more.disabled = false;
    more.hidden = true;
    list.setAttribute("aria-busy", "true");
    showError("");
    try {
      const { body, headers } = await request("GET", url, undefined, { signal });
      if (mine !== view) return;
      list.replaceChildren();
      shown.clear();
      emptyText = empty;
      add(body);
      next = nextLink(headers);
      renderStatus();
    } catch (err) {
      if (mine === view && !isAbort(err)) showError(err.message);
    } finally {
      if (mine === view) list.removeAttribute("aria-busy");
    }
  }

  async function loadMore() {
    if (moreBusy || !next) return; // one at a time: a second click waits for nothing and adds nothing
    moreBusy = true;
    more.disabled = true;
    const mine = view;
    try {
      const { body, headers } = await request("GET", next, undefined, { signal: controller.signal });
      if (mine !== view) return;
      add(body);
      next = nextLink(headers);
      showError("");
    } catch (err) {
      if (mine === view && !isAbort(err)) showError(`More images could not be loaded: ${err.message}`);
    } finally {
      if (mine === view) {
        moreBusy = false;
        more.disabled = false;
        renderStatus();
      }
    }
  }
  more.addEventListener("click", loadMore);

  return {
    load,
    prepend(image) {
      if (shown.has(image.id)) return;
      shown.add(image.id);
      list.prepend(card(image));
      showNearNow();
      renderStatus();
    },
    /** Take an image's card out; returns the element to focus next (the next card, or the heading). */
    remove(id) {
      const item = list.querySelector(`[data-id="${id}"]`);
      const after = item && (item.nextElementSibling || item.previousElementSibling);
      item?.remove();
      shown.delete(id);
      renderStatus();
      return after ? after.querySelector("button") : document.getElementById("gallery-title");
    },
  };
}
