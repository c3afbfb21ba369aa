// The "Add images" form: drag and drop, a file picker (several files) or a URL. The files go up one after
// another, each with its own line: a progress bar while its bytes go up, then "Detecting objects…" while
// the service works, then "Added" or what went wrong. A 503 (the service is busy) is tried again after
// its Retry-After.
import { upload, wait } from "./api.js";
import { el } from "./gallery.js";

const TRIES = 5; // per file, counting the first

export function setupUpload({ onAdded, onShow }) {
  const form = document.getElementById("add-form");
  const drop = document.getElementById("drop");
  const file = document.getElementById("file");
  const fileName = document.getElementById("file-name");
  const url = document.getElementById("url");
  const label = document.getElementById("label");
  const detect = document.getElementById("detect");
  const submit = document.getElementById("add-submit");
  const error = document.getElementById("add-error");
  const uploads = document.getElementById("uploads");
  let dropped = []; // Files dropped on the zone (file inputs cannot be set from a drop everywhere)
  let detectReady = null;

  const chosen = () => (dropped.length ? dropped : [...file.files]);
  const showName = () => {
    const files = chosen();
    const kb = (n) => `${Math.ceil(n / 1024)} KB`;
    fileName.textContent = files.length === 1 ? `${files[0].name} (${kb(files[0].size)})`
      : files.length ? `${files.length} files (${kb(files.reduce((s, f) => s + f.size, 0))})` : "";
  };
  const showError = (message) => {
    error.textContent = message;
    error.hidden = !message;
  };
  file.addEventListener("change", () => { dropped = []; showName(); showError(""); });
  url.addEventListener("input", () => showError(""));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) { dropped = [...e.dataTransfer.files]; showName(); showError(""); }
  });

  /** One line of the list: its name, a progress bar, what is happening. */
  function line(name) {
    const bar = el("progress", { max: 100, value: 0 });
    bar.setAttribute("aria-label", `Progress of ${name}`);
    const state = el("span", { className: "upload-state" }, "Waiting");
    const li = el("li", { className: "upload", dataset: { status: "waiting" } }, el("span", { className: "upload-name" }, name), bar, state);
    uploads.append(li);
    const say = (status, text) => { li.dataset.status = status; state.textContent = text; };
    return { li, bar, say };
  }

  async function send(make, { bar, say }, isFile, working) {
    for (let attempt = 1; ; attempt++) {
      bar.value = 0;
      say("sending", isFile ? "Uploading…" : `Downloading and ${working.toLowerCase()}`);
      try {
        return await upload("/images", make(), {
          onProgress: (f) => { bar.value = Math.round(f * 100); say("sending", `Uploading… ${bar.value}%`); },
          onSent: () => { bar.removeAttribute("value"); say("working", working); }, // indeterminate
        });
      } catch (err) {
        if (err.status !== 503 || attempt >= TRIES) throw err;
        const seconds = Math.ceil(err.retryAfter ?? 2);
        bar.value = 0;
        say("retrying", `The service is busy; trying again in ${seconds} s…`);
        await wait(seconds);
      }
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const files = chosen();
    const link = url.value.trim();
    if (!files.length && !link) return showError("Nothing to add: choose or drop a photo, or paste an image URL.");
    if (files.length && link) return showError("Send either files or a URL, not both: clear one of them.");
    showError("");
    const fields = (data) => {
      if (label.value.trim()) data.append("label", label.value.trim());
      data.append("detect", detect.checked ? "true" : "false");
      return data;
    };
    const work = files.length
      ? files.map((f) => ({ name: f.name, make: () => { const d = new FormData(); d.append("image", f, f.name); return fields(d); } }))
      : [{ name: link, make: () => { const d = new FormData(); d.append("url", link); return fields(d); } }];
    const working = detect.checked ? "Detecting objects…" : "Storing…";
    uploads.replaceChildren();
    const lines = work.map((w) => line(w.name));
    submit.disabled = true;
    const failures = [];
    let last = null;
    try {
      for (const [i, w] of work.entries()) {
        try {
          last = await send(w.make, lines[i], files.length > 0, working);
          lines[i].bar.value = 100;
          lines[i].say("added", "Added");
          onAdded(last);
        } catch (err) {
          failures.push(err.message);
          lines[i].bar.value = 0;
          lines[i].say("failed", `Not added: ${err.message}`);
        }
      }
    } finally {
      submit.disabled = false;
    }
    if (failures.length === work.length && work.length === 1) showError(failures[0]);
    else if (failures.length) showError(`${failures.length} of ${work.length} were not added; the list below says why.`);
    if (!failures.length) {
      form.reset();
      if (detectReady !== null) detect.checked = detectReady;
      dropped = [];
      showName();
    }
    if (work.length === 1 && last) onShow(last);
  });

  return {
    /** Reflect whether the service can detect objects now (the switch is set only when that changes). */
    detectionAvailable(ready, why) {
      const note = document.getElementById("detect-note");
      if (ready !== detectReady) detect.checked = ready;
      detectReady = ready;
      detect.disabled = !ready;
      note.hidden = ready;
      note.textContent = ready ? "" : `Object detection is unavailable: ${why}`;
    },
  };
}
