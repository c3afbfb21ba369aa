// Pictures come as the service's thumbnails (GET /images/{id}/thumbnail?size=160|320|640|1280), the
// original only behind "Open the file". A thumbnail the service could not make just then (503: its decode
// budget was busy) is fetched again after the answer's Retry-After.
import { fetchPicture, isAbort, wait } from "./api.js";

// What the service says in Retry-After when its decode budget is busy (at least 1 s): an <img> cannot
// read the header, so its first retry waits this long (a little more for each, so a screenful of failed
// pictures does not come back at once); fetch() then reads every later Retry-After itself.
const FIRST_WAIT_S = 1;

const sized = (url, size) => `${url}${url.includes("?") ? "&" : "?"}size=${size}`;

/** Point `img` at the image's thumbnail: `size` at 1x, `size2x` on dense screens (rows older than
 * thumbnails, or a service without them, fall back to the original file). */
export function setPicture(img, image, size, size2x) {
  if (image.thumbnail_url) {
    img.srcset = `${sized(image.thumbnail_url, size)} 1x, ${sized(image.thumbnail_url, size2x)} 2x`;
    img.src = sized(image.thumbnail_url, size);
  } else {
    img.src = image.file_url;
  }
}

// The gallery's pictures are asked for when they come near the screen. (Chromium's own loading="lazy"
// starts 1,250-2,500 px ahead, so on a desktop it asked for every card's picture at once: the pictures
// below the fold took the bandwidth, and the service's decode budget, from the first screen's.)
const MARGIN_PX = 120; // how far below the screen a picture is asked for
const waiting = new WeakMap(); // img -> what sets its picture
const nearScreen = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (!e.isIntersecting) continue;
    nearScreen.unobserve(e.target);
    waiting.get(e.target)?.();
    waiting.delete(e.target);
  }
}, { rootMargin: `0px 0px ${MARGIN_PX}px 0px` });

let added = []; // imgs given to setPictureWhenNear since the last showNearNow()

/** setPicture() once `img` is within about half a card's height of the screen. */
export function setPictureWhenNear(img, image, size, size2x) {
  waiting.set(img, () => setPicture(img, image, size, size2x));
  nearScreen.observe(img);
  added.push(img);
}

/**
 * Set at once the pictures of the imgs just added that are near the screen already (one layout), rather
 * than a frame later when the observer first reports: the first screen's pictures are asked for in the
 * same task as their cards are made. The others still wait for the observer.
 */
export function showNearNow() {
  const imgs = added;
  added = [];
  for (const img of imgs) {
    if (!img.isConnected || !waiting.has(img)) continue;
    const r = img.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue; // not laid out (hidden): the observer decides
    if (r.bottom >= 0 && r.top <= innerHeight + MARGIN_PX && r.right >= 0 && r.left <= innerWidth) {
      nearScreen.unobserve(img);
      waiting.get(img)();
      waiting.delete(img);
    }
  }
}

/**
 * When `img` fails, wait, then ask for the same URL with fetch(), which can read the status and Retry-After
 * that an <img> hides: wait out 503s, then show the bytes from an object URL. Other failures go to `onFailed`.
 */
export function retryOnError(img, { signal, onFailed = () => {} } = {}) {
  img.addEventListener("error", async () => {
    if (img.src.startsWith("blob:")) return onFailed(new Error("the picture cannot be shown"));
    const url = img.currentSrc || img.src;
    try {
      await wait(FIRST_WAIT_S + Math.random() / 2, signal);
      const objectUrl = await fetchPicture(url, { signal });
      img.addEventListener("load", () => URL.revokeObjectURL(objectUrl), { once: true });
      img.removeAttribute("srcset");
      img.src = objectUrl;
    } catch (err) {
      if (!isAbort(err)) onFailed(err);
    }
  }, { signal });
}
