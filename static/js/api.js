// Talking to the service. Every error becomes an ApiError whose message is the problem+json `detail`,
// so the page can show people what the service said, in its words.

export class ApiError extends Error {
  /** `body`: the problem+json object (or null); `retryAfter`: seconds from a Retry-After header, or null. */
  constructor(message, status, body = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
  }
}

// Called on every 401 (the API needs its key): the page then asks for it. See session.js.
let unauthorized = () => {};
export function whenUnauthorized(callback) { unauthorized = callback; }

const UNREACHABLE = "The service cannot be reached. Is it running?";
const MAX_WAIT_S = 30; // a Retry-After longer than this is cut short: the page tries again anyway

/** Seconds to wait from a Retry-After value (seconds or an HTTP date); null when absent or unreadable. */
export function retryAfterSeconds(value) {
  if (!value) return null;
  const s = /^\d+$/.test(value.trim()) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
  return Number.isFinite(s) ? Math.min(Math.max(s, 0), MAX_WAIT_S) : null;
}

/** Resolves after `seconds`, or rejects with an AbortError when `signal` aborts first. */
export function wait(seconds, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(resolve, seconds * 1000);
    signal?.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); }, { once: true });
  });
}

async function errorFrom(response) {
  let detail = `${response.status} ${response.statusText}`;
  let body = null;
  try {
    body = await response.json();
    if (body && body.detail) detail = body.detail;
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(detail, response.status, body, retryAfterSeconds(response.headers.get("Retry-After")));
}

/** GET or send JSON; resolves to {body, headers}. `signal` (an AbortSignal) cancels it: then it rejects
 * with the signal's AbortError, which callers ignore (a newer view replaced theirs). */
export async function request(method, url, json, { signal } = {}) {
  let response;
  try {
    response = await fetch(url, {
      method,
      signal,
      headers: json === undefined ? {} : { "Content-Type": "application/json" },
      body: json === undefined ? undefined : JSON.stringify(json),
    });
  } catch (err) {
    if (signal?.aborted) throw err;
    throw new ApiError(UNREACHABLE, 0);
  }
  if (response.status === 401) unauthorized();
  if (!response.ok) throw await errorFrom(response);
  const body = response.status === 204 ? null : await response.json();
  return { body, headers: response.headers };
}

/** Whether an error is the cancelling of a request (not something to show anyone). */
export const isAbort = (err) => err?.name === "AbortError";

/**
 * A picture's bytes as an object URL, waiting out each 503's Retry-After (the service's decode budget
 * was busy) up to `tries` times. An <img> cannot read response headers, so an <img> that failed comes
 * here (see pictures.js). The caller revokes the URL.
 */
export async function fetchPicture(url, { signal, tries = 5 } = {}) {
  for (let attempt = 1; ; attempt++) {
    let response;
    try {
      response = await fetch(url, { signal });
    } catch (err) {
      if (signal?.aborted) throw err;
      throw new ApiError(UNREACHABLE, 0);
    }
    if (response.ok) return URL.createObjectURL(await response.blob());
    if (response.status === 401) unauthorized();
    const err = await errorFrom(response);
    if (response.status !== 503 || attempt >= tries) throw err;
    await wait(err.retryAfter ?? 1, signal);
  }
}

/**
 * POST a FormData with upload progress (fetch cannot report it): onProgress(fraction), then onSent().
 * Rejects with an ApiError carrying `retryAfter` from the answer's Retry-After.
 */
export function upload(url, form, { onProgress, onSent } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total); };
    xhr.upload.onload = () => onSent && onSent();
    xhr.onerror = () => reject(new ApiError(UNREACHABLE, 0));
    xhr.onload = () => {
      const body = xhr.response;
      if (xhr.status === 401) unauthorized();
      if (xhr.status >= 200 && xhr.status < 300) return resolve(body);
      reject(new ApiError((body && body.detail) || `${xhr.status} ${xhr.statusText}`, xhr.status, body,
        retryAfterSeconds(xhr.getResponseHeader("Retry-After"))));
    };
    xhr.send(form);
  });
}

/** The rel="next" target of a Link header, or null. */
export function nextLink(headers) {
  const link = headers.get("Link") || "";
  const match = link.match(/<([^>]+)>\s*;\s*rel="next"/);
  return match ? match[1] : null;
}
