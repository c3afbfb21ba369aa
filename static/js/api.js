// Talking to the service. Every error becomes an ApiError whose message is the problem+json `detail`,
// so the page can show people what the service said, in its words.

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// Called on every 401 (the API needs its key): the page then asks for it. See session.js.
let unauthorized = () => {};
export function whenUnauthorized(callback) { unauthorized = callback; }

async function errorFrom(response) {
  let detail = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.detail) detail = body.detail;
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(detail, response.status);
}

/** GET or send JSON; resolves to {body, headers}. */
export async function request(method, url, json) {
  let response;
  try {
    response = await fetch(url, {
      method,
      headers: json === undefined ? {} : { "Content-Type": "application/json" },
      body: json === undefined ? undefined : JSON.stringify(json),
    });
  } catch {
    throw new ApiError("The service cannot be reached. Is it running?", 0);
  }
  if (response.status === 401) unauthorized();
  if (!response.ok) throw await errorFrom(response);
  const body = response.status === 204 ? null : await response.json();
  return { body, headers: response.headers };
}

/** POST a FormData with upload progress (fetch cannot report it): onProgress(fraction), then onSent(). */
export function upload(url, form, { onProgress, onSent } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total); };
    xhr.upload.onload = () => onSent && onSent();
    xhr.onerror = () => reject(new ApiError("The service cannot be reached. Is it running?", 0));
    xhr.onload = () => {
      const body = xhr.response;
      if (xhr.status === 401) unauthorized();
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError((body && body.detail) || `${xhr.status} ${xhr.statusText}`, xhr.status));
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
