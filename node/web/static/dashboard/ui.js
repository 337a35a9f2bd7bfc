// Small DOM helpers. Data from the API is always inserted as text, never as markup.

/** h("td", {class: "x", dataset: {id: 1}, onclick: fn}, "text", childNode, [more]) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export const $ = (id) => document.getElementById(id);

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

const TONES = {
  ok: ["sent", "done", "succeeded", "ready", "ok", "admin"],
  info: ["receiving", "complete", "processing", "running", "reported", "queued", "pending"],
  bad: ["failed", "not ready", "unreachable"],
  warn: ["read", "store", "disabled", "not_analysed"],
};

export function tone(state) {
  for (const [name, states] of Object.entries(TONES)) if (states.includes(state)) return name;
  return "";
}

export function badge(text, state = text, attrs = {}) {
  return h("span", { class: `badge ${tone(state)}`.trim(), ...attrs }, text);
}

/** One message line: kind is "", "ok" or "error"; an empty text hides it. */
export function say(el, text, kind = "") {
  el.textContent = text || "";
  el.className = `message ${kind}`.trim();
  el.hidden = !text;
}

export function shortUid(uid) {
  if (!uid) return "";
  return uid.length > 28 ? `${uid.slice(0, 12)}…${uid.slice(-12)}` : uid;
}

export function uid(value) {
  return h("span", { class: "uid", title: value }, shortUid(value));
}

const sameDay = (a, b) => a.toDateString() === b.toDateString();

export function time(iso) {
  if (!iso) return "";
  const at = new Date(iso);
  const clock = at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return sameDay(at, new Date())
    ? clock
    : `${at.toLocaleDateString([], { year: "numeric", month: "short", day: "numeric" })} ${clock}`;
}

export function duration(fromIso, toIso) {
  if (!fromIso || !toIso) return "";
  const seconds = Math.max(0, (new Date(toIso) - new Date(fromIso)) / 1000);
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

/** Run an async action with its button disabled; errors go to the message element. */
export async function busy(button, action) {
  if (button) button.disabled = true;
  try {
    return await action();
  } finally {
    if (button) button.disabled = false;
  }
}
