// The page's REST client: the public API with the user's key (docs/API.md). No validation here: the
// server checks every field once and answers a 422 naming it, which the page shows.

const KEY_STORAGE = "ebca.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.field = error.field || null;
  }
}

export function storedKey() {
  return window.localStorage.getItem(KEY_STORAGE) || "";
}

export function storeKey(key) {
  if (key) window.localStorage.setItem(KEY_STORAGE, key);
  else window.localStorage.removeItem(KEY_STORAGE);
}

/** A key handed over in the address (`/#key=...`, what scripts/serve.sh prints): kept in the
 * browser's storage and removed from the address bar, so it is not left in the history. A fragment
 * never reaches the server or its logs. */
export function takeKeyFromLocation() {
  const params = new URLSearchParams(window.location.hash.slice(1));
  const key = params.get("key");
  if (!key) return;
  storeKey(key);
  params.delete("key");
  const rest = params.toString();
  window.history.replaceState(null, "", window.location.pathname + (rest ? `#${rest}` : ""));
}

function headers(extra = {}) {
  const key = storedKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return new ApiError(response.status, body);
}

export async function request(method, path, { json, form, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

export const api = {
  me: () => request("GET", "/keys/me"),
  models: () => request("GET", "/models"),
  generate: (body) => request("POST", "/generate", { json: body }),
  edit: (body) => request("POST", "/edit", { json: body }),
  editUpload: (body, files) => {
    const form = new FormData();
    form.append("request", JSON.stringify(body));
    for (const [name, blob] of Object.entries(files)) form.append(name, blob, `${name}.png`);
    return request("POST", "/edit", { form });
  },
  job: (id) => request("GET", `/jobs/${encodeURIComponent(id)}`),
  cancel: (id) => request("DELETE", `/jobs/${encodeURIComponent(id)}`),
  jobs: (limit = 20) => request("GET", `/jobs?limit=${limit}`),
};

/** The bytes of an image URL of the API (it needs the key, so no plain <img src>). */
export async function imageBlob(url) {
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.blob();
}

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

/** Follow a job until it ends, calling `onUpdate(state)` with each state (status, progress,
 * queue_position, result, error). Reads the live event stream (`GET /jobs/{id}/events`, text/event-stream
 * read with fetch so the key can be sent; EventSource cannot send headers) and polls `GET /jobs/{id}`
 * where the stream is not available or breaks off. Resolves with the final job record. */
export async function follow(jobId, onUpdate, { signal } = {}) {
  try {
    const last = await streamEvents(jobId, onUpdate, signal);
    if (last && TERMINAL.has(last.status)) return api.job(jobId);
  } catch (error) {
    if (signal && signal.aborted) throw error;
  }
  return poll(jobId, onUpdate, signal);
}

async function streamEvents(jobId, onUpdate, signal) {
  const response = await fetch(`/jobs/${encodeURIComponent(jobId)}/events`, {
    headers: headers({ Accept: "text/event-stream" }),
    signal,
  });
  const type = response.headers.get("Content-Type") || "";
  if (!response.ok || !type.startsWith("text/event-stream") || !response.body) return null;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return last;
    buffer += value;
    let newline;
    while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
      if (line === "") {
        if (data.length) {
          last = JSON.parse(data.join("\n"));
          onUpdate(last);
          data = [];
          if (TERMINAL.has(last.status)) {
            reader.cancel().catch(() => {});
            return last;
          }
        }
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

async function poll(jobId, onUpdate, signal) {
  for (;;) {
    const job = await api.job(jobId);
    onUpdate(job);
    if (TERMINAL.has(job.status)) return job;
    await new Promise((resolve, reject) => {
      const timer = window.setTimeout(resolve, 400);
      if (signal) signal.addEventListener("abort", () => { window.clearTimeout(timer); reject(signal.reason); }, { once: true });
    });
  }
}
