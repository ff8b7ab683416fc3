// The REST API as the dashboard uses it: the key lives in sessionStorage only (gone when the
// tab closes), every error is an ApiError carrying the problem+json body.

const KEY = "galvani.apiKey";

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY);
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${apiKey()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const problem = typeof data === "object" ? data : { detail: String(data) };
    if (response.status === 401) window.dispatchEvent(new CustomEvent("galvani:unauthorized"));
    throw new ApiError(response.status, problem);
  }
  return data;
}

export const get = (path) => api("GET", path);
export const post = (path, body) => api("POST", path, body);

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

// Server-Sent Events over fetch: EventSource cannot send the Authorization header.
// Calls onAlert for each alert event; reconnects with Last-Event-ID until signal aborts.
export async function streamAlerts(onAlert, signal, onState = () => {}) {
  let lastId = null;
  let retryMs = 3000;
  while (!signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${apiKey()}` };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await fetch("/v1/alerts/stream", { headers, signal });
      if (!response.ok) throw new ApiError(response.status, await response.json());
      onState("live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const event = {};
          for (const line of block.split("\n")) {
            if (line.startsWith(":")) continue;
            const at = line.indexOf(": ");
            if (at > 0) event[line.slice(0, at)] = line.slice(at + 2);
          }
          if (event.retry) retryMs = Number(event.retry);
          if (event.id) lastId = event.id;
          if (event.event === "alert" && event.data) onAlert(JSON.parse(event.data));
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status === 401) return;
    }
    onState("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, retryMs));
  }
}
