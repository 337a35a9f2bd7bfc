// Talking to the node's HTTP API with the bearer token kept for this browser tab.

const BASE = new URL("../", window.location.href); // the API root, also behind a path prefix
const TOKEN_KEY = "curia-node.dashboard.token";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

export const session = {
  get token() {
    return window.sessionStorage.getItem(TOKEN_KEY);
  },
  set token(value) {
    if (value) window.sessionStorage.setItem(TOKEN_KEY, value);
    else window.sessionStorage.removeItem(TOKEN_KEY);
  },
};

let unauthorized = () => {};

/** Called (once per refused request) when the API answers 401: the token is no longer good. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

function describe(detail, fallback) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    // FastAPI's validation errors: [{loc: ["body", "field"], msg}]
    return detail
      .map((e) => {
        const where = (e.loc || []).filter((p) => p !== "body").join(".");
        return where ? `${where}: ${e.msg}` : e.msg;
      })
      .join("; ");
  }
  return detail === undefined ? fallback : JSON.stringify(detail);
}

/** Call the API; resolves to parsed JSON (or text for HTML), rejects with ApiError. */
export async function api(path, { method = "GET", body, as = "json", token } = {}) {
  const headers = { Authorization: `Bearer ${token ?? session.token ?? ""}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(new URL(path, BASE), init);
  } catch (error) {
    throw new ApiError(0, `the node did not answer (${error.message})`);
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      detail = describe((await response.json()).detail, detail);
    } catch {
      // not JSON: keep the status line
    }
    const error = new ApiError(response.status, detail);
    if (response.status === 401 && token === undefined) unauthorized(error);
    throw error;
  }
  if (response.status === 204) return null;
  return as === "text" ? response.text() : response.json();
}

/** The routes that need no token: liveness (with the version) and readiness. */
export async function publicGet(path) {
  const response = await fetch(new URL(path, BASE), { cache: "no-store" });
  return { ok: response.ok, status: response.status, body: await response.json() };
}
