// The "Add an image" form: drag and drop, a file picker or a URL; a progress bar while the bytes go up,
// then a busy state while the service detects objects.
import { upload } from "./api.js";

export function setupUpload({ onAdded, onError }) {
  const form = document.getElementById("add-form");
  const drop = document.getElementById("drop");
  const file = document.getElementById("file");
  const fileName = document.getElementById("file-name");
  const url = document.getElementById("url");
  const label = document.getElementById("label");
  const detect = document.getElementById("detect");
  const submit = document.getElementById("add-submit");
  const progress = document.getElementById("progress");
  const bar = document.getElementById("progress-bar");
  const text = document.getElementById("progress-text");
  let dropped = null; // a File dropped on the zone (file inputs cannot be set from a drop everywhere)

  const showName = () => {
    const chosen = dropped || file.files[0];
    fileName.textContent = chosen ? `${chosen.name} (${Math.ceil(chosen.size / 1024)} KB)` : "";
  };
  file.addEventListener("change", () => { dropped = null; showName(); });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) { dropped = e.dataTransfer.files[0]; showName(); }
  });

  const busy = (on, message = "") => {
    submit.disabled = on;
    progress.hidden = !on;
    text.textContent = message;
  };

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const chosen = dropped || file.files[0];
    const link = url.value.trim();
    if (!chosen && !link) return onError("Choose or drop a photo, or paste an image URL.");
    if (chosen && link) return onError("Send either a file or a URL, not both: clear one of them.");
    const data = new FormData();
    if (chosen) data.append("image", chosen, chosen.name); else data.append("url", link);
    if (label.value.trim()) data.append("label", label.value.trim());
    data.append("detect", detect.checked ? "true" : "false");
    const working = detect.checked ? "Detecting objects…" : "Storing…";
    bar.value = 0;
    busy(true, chosen ? "Uploading…" : `Downloading and ${working.toLowerCase()}`);
    try {
      const image = await upload("/images", data, {
        onProgress: (f) => { bar.value = Math.round(f * 100); text.textContent = `Uploading… ${bar.value}%`; },
        onSent: () => { bar.removeAttribute("value"); text.textContent = working; }, // indeterminate
      });
      form.reset();
      detect.checked = !detect.disabled;
      dropped = null;
      showName();
      onAdded(image);
    } catch (err) {
      onError(err.message);
    } finally {
      busy(false);
    }
  });

  return {
    /** Reflect whether the service can detect objects now. */
    detectionAvailable(ready, why) {
      const note = document.getElementById("detect-note");
      detect.disabled = !ready;
      detect.checked = ready;
      note.hidden = ready;
      note.textContent = ready ? "" : `Object detection is unavailable: ${why}`;
    },
  };
}
