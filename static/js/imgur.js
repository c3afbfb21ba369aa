// The Imgur panel: submit URLs, follow the job until it completes, list every link uploaded so far.
import { request } from "./api.js";

const POLL_MS = 1000;

export function setupImgur({ onError }) {
  const form = document.getElementById("imgur-form");
  const urls = document.getElementById("imgur-urls");
  const submit = document.getElementById("imgur-submit");
  const job = document.getElementById("job");
  const summary = document.getElementById("job-summary");
  const items = document.getElementById("job-items");
  const links = document.getElementById("links");

  function link(href) {
    const a = Object.assign(document.createElement("a"), { href, textContent: href, target: "_blank", rel: "noopener" });
    return a;
  }

  async function refreshLinks() {
    try {
      const { body } = await request("GET", "/v1/images");
      links.replaceChildren(...body.uploaded.map((href) => { const li = document.createElement("li"); li.append(link(href)); return li; }));
    } catch (err) {
      onError(err.message);
    }
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

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const list = urls.value.split("\n").map((s) => s.trim()).filter(Boolean);
    if (!list.length) return onError("Paste one or more image URLs, one per line.");
    submit.disabled = true;
    try {
      const { body } = await request("POST", "/v1/images/upload", { urls: list });
      job.hidden = false;
      summary.textContent = "Job submitted…";
      items.replaceChildren();
      await follow(`/v1/images/upload/${body.jobId}`);
      await refreshLinks();
    } catch (err) {
      onError(err.message);
    } finally {
      submit.disabled = false;
    }
  });

  return { refreshLinks };
}
