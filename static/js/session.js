// Signing in when the service has an API key: on a 401 the page asks for the key and sends it to
// POST /session, which answers with an HttpOnly cookie (a signed token, never the key). The page cannot
// read that cookie, so it learns it is signed out from the service's 401s, or when it signs out itself.
import { ApiError, request, whenUnauthorized } from "./api.js";

export function setupSession({ onSignedIn }) {
  const dialog = document.getElementById("signin");
  const form = document.getElementById("signin-form");
  const key = document.getElementById("signin-key");
  const error = document.getElementById("signin-error");
  const submit = document.getElementById("signin-submit");
  const button = document.getElementById("session");
  let needsKey = false; // from /health: "auth": "key"
  let signedIn = true; // until the service says otherwise

  function render() {
    button.hidden = !needsKey;
    button.textContent = signedIn ? "Sign out" : "Sign in";
  }

  function ask() {
    signedIn = false;
    render();
    error.hidden = true;
    if (!dialog.open) dialog.showModal();
    key.focus();
  }

  whenUnauthorized(() => { needsKey = true; ask(); });

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!key.value) {
      error.textContent = "Type the service's API key.";
      error.hidden = false;
      return;
    }
    submit.disabled = true;
    try {
      const response = await fetch("/session", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key: key.value }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new ApiError(body.detail || `${response.status} ${response.statusText}`, response.status);
      }
      form.reset();
      dialog.close();
      signedIn = true;
      render();
      onSignedIn();
    } catch (err) {
      error.textContent = err instanceof ApiError ? err.message : "The service cannot be reached. Is it running?";
      error.hidden = false;
      key.select();
    } finally {
      submit.disabled = false;
    }
  });

  button.addEventListener("click", async () => {
    if (!signedIn) return ask();
    try {
      await request("DELETE", "/session");
    } catch { /* a 401 has asked for the key already */ }
    ask();
  });

  return {
    /** What /health says: "open" or "key". */
    mode(auth) { needsKey = auth === "key"; render(); },
  };
}
