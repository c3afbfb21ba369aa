// The Imgur panel: submit URLs, follow the job until it completes, list every link uploaded so far.
// Its errors are shown under its own text box, naming the line at fault; when the service has Imgur
// uploads off, the panel says so and takes no input.
import { request } from "./api.js";

const POLL_MS = 1000;

export function setupImgur() {
  const panel = document.getElementById("imgur");
  const form = document.getElementById("imgur-form");
  const urls = document.getElementById("imgur-urls");
  const submit = document.getElementById("imgur-submit");
  const error = document.getElementById("imgur-error");
  const off = document.getElementById("imgur-off");
  const job = document.getElementById("job");
  const summary = document.getElementById("job-summary");
  const items = document.getElementById("job-items");
  const links = document.getElementById("links");

  const showError = (message) => {
    error.textContent = message;
    error.hidden = !message;
    urls.setAttribute("aria-invalid", String(Boolean(message)));
  };
  urls.addEventListener("input", () => showError(""));

  function link(href) {
    return Object.assign(document.createElement("a"), { href, textContent: href, target: "_blank", rel: "noopener" });
  }

  async function refreshLinks() {
    try {
      const { body } = await request("GET", "/v1/images");
      links.replaceChildren(...body.uploaded.map((href) => { const li = document.createElement("li"); li.append(link(href)); return li; }));
    } catch (err) {
      showError(`The list of links could not be read: ${err.message}`);
    }
  }

  /** On or off, as the service says; `why` is its sentence when off. */
  function available(on, why = "") {
    panel.classList.toggle("is-off", !on);
    off.hidden = on;
    off.textContent = on ? "" : `Imgur uploads are off on this service: ${why || "it needs IMGUR_CLIENT_ID set (see README) and a restart"}`;
    form.inert = !on;
    urls.disabled = !on;
    submit.disabled = !on;
  }

  function render(view) {
    const u = view.uploaded;
    summary.textContent = `Job ${view.status}: ${u.complete.length} uploaded, ${u.failed.length} failed, ${u.pending.length} waiting.`;
    items.replaceChildren(...view.items.map((item) => {
      const li = document.createElement("li");
      const state = Object.assign(document.createElement("span"), { className: `state ${item.status}`, textContent: item.status });
      li.append(state, " ", item.url);
      if (item.link) li.append(" → ", link(item.link));
      if (item.error) li.append(Object.assign(document.createElement("span"), { className: "reason", textContent: item.error }));
      li.dataset.status = item.status;
      return li;
    }));
    job.dataset.status = view.status;
  }

  async function follow(location) {
    for (;;) {
      const { body } = await request("GET", location);
      render(body);
      if (body.status === "complete") return;
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  }

  /** A batch refused: each bad entry (the 400's `errors` member) by its line number in the text box. */
  function batchMessage(err, lineOf) {
    const bad = Array.isArray(err.body?.errors) ? err.body.errors : [];
    if (!bad.length) return err.message;
    const lines = bad.map((b) => `line ${lineOf[b.index] ?? b.index + 1} (${b.url}): ${b.reason}`);
    const head = bad.length === 1 ? "This line is not an image URL" : `${bad.length} lines are not image URLs`;
    return `${head}; fix it and send again. ${lines.map((l) => l[0].toUpperCase() + l.slice(1)).join(". ")}.`;
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const lines = urls.value.split("\n");
    const list = [];
    const lineOf = []; // the text box's line number of each URL sent (blank lines are skipped)
    lines.forEach((text, n) => { if (text.trim()) { list.push(text.trim()); lineOf.push(n + 1); } });
    if (!list.length) {
      showError("Nothing to upload: paste one or more image URLs, one per line.");
      urls.focus();
      return;
    }
    showError("");
    submit.disabled = true;
    try {
      const { body } = await request("POST", "/v1/images/upload", { urls: list });
      job.hidden = false;
      summary.textContent = "Job submitted…";
      items.replaceChildren();
      await follow(`/v1/images/upload/${body.jobId}`);
      await refreshLinks();
    } catch (err) {
      if (err.status === 503 && /imgur/i.test(err.message)) available(false, err.message);
      showError(err.status === 400 ? batchMessage(err, lineOf) : err.message);
    } finally {
      submit.disabled = !off.hidden; // stays disabled when the answer said Imgur is off
    }
  });

  /** Whether Imgur uploads are on, as GET /health's `imgur.enabled` says (read again with every health
   * check). A service that does not say leaves the panel as it is; a 503 to a submit turns it off. */
  function check(health) {
    const v = health?.imgur;
    if (v && typeof v === "object" && "enabled" in v) available(v.enabled === true);
  }

  return { refreshLinks, check };
}
