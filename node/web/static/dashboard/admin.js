// The admin panels: failed deliveries, peers (destinations, sources, audit), rules, queues.

import { api } from "./api.js";
import { $, badge, busy, h, replace, say, time, uid } from "./ui.js";

const MASK = "**********";
const empty = (columns, text) => h("tr", {}, h("td", { colspan: columns, class: "empty" }, text));

// ---- Failures -----------------------------------------------------------------------------

export async function loadFailures() {
  const failed = await api("api/v1/deliveries?state=failed");
  const body = $("failures-body");
  $("retry-all").disabled = failed.length === 0;
  if (!failed.length) {
    replace(body, empty(7, "No failed deliveries."));
    return failed;
  }
  replace(
    body,
    failed.map((d) =>
      h(
        "tr",
        { dataset: { delivery: d.id } },
        h("td", {}, String(d.id)),
        h("td", {}, h("strong", {}, d.destination)),
        h("td", {}, badge(d.result_kind.toUpperCase(), ""), " ", uid(d.result_uid)),
        h("td", {}, uid(d.series_uid)),
        h("td", {}, String(d.attempts)),
        h("td", {}, h("span", { class: "error-text" }, d.last_error || "")),
        h(
          "td",
          {},
          h(
            "button",
            { type: "button", class: "button small write", onclick: (e) => retry([d.id], e.currentTarget) },
            "Retry",
          ),
        ),
      ),
    ),
  );
  return failed;
}

async function retry(ids, button) {
  const message = $("failures-message");
  await busy(button, async () => {
    const done = [];
    try {
      for (const id of ids) {
        await api(`api/v1/deliveries/${id}/retry`, { method: "POST" });
        done.push(id);
      }
      say(message, `Re-queued delivery ${done.map((id) => `#${id}`).join(", ")}.`, "ok");
    } catch (error) {
      say(message, `Retry failed: ${error.message}`, "error");
    }
    await loadFailures().catch(() => {});
  });
}

export function setupFailures() {
  $("retry-all").addEventListener("click", async (event) => {
    const failed = await api("api/v1/deliveries?state=failed");
    await retry(
      failed.map((d) => d.id),
      event.currentTarget,
    );
  });
}

// ---- Destinations -------------------------------------------------------------------------

let editing = null; // the name of the destination in the form, or null when adding one
let destinations = [];

function target(spec) {
  if (spec.protocol === "dimse") {
    return `${spec.ae_title}@${spec.host}:${spec.port}${spec.tls ? " (TLS)" : ""}`;
  }
  return spec.url || "";
}

export async function loadDestinations() {
  destinations = await api("api/v1/destinations");
  const body = $("destinations-body");
  if (!destinations.length) {
    replace(body, empty(7, "No destination."));
    return;
  }
  replace(
    body,
    destinations.map((spec) => {
      const fromConfig = spec.source === "config";
      const check = h("td", { class: "check-result", dataset: { field: "check" } });
      return h(
        "tr",
        { dataset: { destination: spec.name } },
        h(
          "td",
          {},
          h("strong", {}, spec.name),
          fromConfig ? [" ", badge("config", "", { title: "from the configuration file (read-only)" })] : null,
        ),
        h("td", {}, spec.protocol),
        h("td", { class: "mono" }, target(spec)),
        h("td", {}, spec.results ? "every result" : "by rule"),
        h("td", {}, spec.enabled ? badge("enabled", "ok") : badge("disabled")),
        check,
        h(
          "td",
          {},
          h(
            "div",
            { class: "badges" },
            h("button", { type: "button", class: "button small write", onclick: (e) => testDestination(spec.name, check, e.currentTarget) }, "Test"),
            fromConfig
              ? null
              : h("button", { type: "button", class: "button small write", onclick: () => editDestination(spec) }, "Edit"),
            fromConfig
              ? null
              : h("button", { type: "button", class: "button small danger write", onclick: (e) => removeDestination(spec.name, e.currentTarget) }, "Remove"),
          ),
        ),
      );
    }),
  );
}

async function testDestination(name, cell, button) {
  replace(cell, h("span", { class: "muted" }, "checking…"));
  try {
    const answer = await busy(button, () => api(`api/v1/destinations/${encodeURIComponent(name)}/test`, { method: "POST" }));
    replace(
      cell,
      answer.ok
        ? badge(`ok · ${Math.round(answer.elapsed_ms)} ms`, "ok")
        : [badge("unreachable", "unreachable"), h("span", { class: "sub error-text" }, answer.detail)],
    );
  } catch (error) {
    replace(cell, h("span", { class: "error-text" }, error.message));
  }
}

async function removeDestination(name, button) {
  if (!window.confirm(`Remove the destination ${name}?`)) return;
  try {
    await busy(button, () => api(`api/v1/destinations/${encodeURIComponent(name)}`, { method: "DELETE" }));
    if (editing === name) resetDestinationForm();
    say($("destination-message"), `Removed ${name}.`, "ok");
  } catch (error) {
    say($("destination-message"), error.message, "error");
  }
  await refreshPeers();
}

function showProtocolFields(form) {
  const protocol = form.elements.protocol.value;
  for (const label of form.querySelectorAll("[data-protocol]")) {
    label.hidden = !label.dataset.protocol.split(" ").includes(protocol);
  }
}

function editDestination(spec) {
  const form = $("destination-form");
  resetDestinationForm();
  editing = spec.name;
  const f = form.elements;
  f.name.value = spec.name;
  f.name.readOnly = true;
  f.protocol.value = spec.protocol;
  for (const key of ["ae_title", "host", "port", "calling_ae_title", "url", "username"]) {
    f[key].value = spec[key] ?? "";
  }
  for (const key of ["token", "password"]) {
    f[key].value = "";
    f[key].placeholder = spec[key] === MASK ? "unchanged" : "";
  }
  f.tls.checked = Boolean(spec.tls);
  f.results.checked = spec.results !== false;
  f.enabled.checked = spec.enabled !== false;
  $("destination-form-title").textContent = `Edit destination ${spec.name}`;
  $("destination-submit").textContent = "Save changes";
  $("destination-cancel").hidden = false;
  showProtocolFields(form);
  form.scrollIntoView({ behavior: "smooth", block: "center" });
  f.ae_title.focus({ preventScroll: true });
}

function resetDestinationForm() {
  const form = $("destination-form");
  form.reset();
  editing = null;
  form.elements.name.readOnly = false;
  form.elements.token.placeholder = "";
  form.elements.password.placeholder = "";
  $("destination-form-title").textContent = "Add a destination";
  $("destination-submit").textContent = "Add destination";
  $("destination-cancel").hidden = true;
  showProtocolFields(form);
}

function destinationBody(form) {
  const f = form.elements;
  const text = (name) => f[name].value.trim();
  const protocol = f.protocol.value;
  const body = { protocol, results: f.results.checked, enabled: f.enabled.checked };
  if (!editing) body.name = text("name");
  if (protocol === "dimse") {
    Object.assign(body, { ae_title: text("ae_title"), host: text("host"), tls: f.tls.checked });
    body.port = text("port") === "" ? null : Number(text("port"));
    if (text("calling_ae_title") || editing) body.calling_ae_title = text("calling_ae_title") || null;
  } else {
    body.url = text("url");
    const secrets = protocol === "stow-rs" ? ["token"] : ["username", "password"];
    for (const key of secrets) if (f[key].value) body[key] = key === "username" ? text(key) : f[key].value;
  }
  return body;
}

async function submitDestination(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const message = $("destination-message");
  const body = destinationBody(form);
  const button = $("destination-submit");
  try {
    if (editing) {
      const name = editing;
      await busy(button, () => api(`api/v1/destinations/${encodeURIComponent(name)}`, { method: "PATCH", body }));
      say(message, `Saved ${name}.`, "ok");
    } else {
      await busy(button, () => api("api/v1/destinations", { method: "POST", body }));
      say(message, `Added ${body.name}.`, "ok");
    }
    resetDestinationForm();
  } catch (error) {
    say(message, error.message, "error");
    return;
  }
  await refreshPeers();
}

// ---- Sources and audit --------------------------------------------------------------------

export async function loadSources() {
  const sources = await api("api/v1/sources");
  const body = $("sources-body");
  if (!sources.length) {
    replace(body, empty(4, "No source: every sender is refused (unless the node accepts any)."));
    return;
  }
  replace(
    body,
    sources.map((peer) =>
      h(
        "tr",
        { dataset: { source: peer.name } },
        h("td", {}, h("strong", {}, peer.name)),
        h("td", { class: "mono" }, peer.ae_title),
        h("td", { class: "mono" }, peer.host || h("span", { class: "muted" }, "any address")),
        h(
          "td",
          {},
          h("button", { type: "button", class: "button small danger write", onclick: (e) => removeSource(peer.name, e.currentTarget) }, "Remove"),
        ),
      ),
    ),
  );
}

async function removeSource(name, button) {
  if (!window.confirm(`Stop accepting studies from ${name}?`)) return;
  try {
    await busy(button, () => api(`api/v1/sources/${encodeURIComponent(name)}`, { method: "DELETE" }));
    say($("source-message"), `Removed ${name}.`, "ok");
  } catch (error) {
    say($("source-message"), error.message, "error");
  }
  await refreshPeers();
}

async function submitSource(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const f = form.elements;
  const body = { name: f.name.value.trim(), ae_title: f.ae_title.value.trim(), host: f.host.value.trim() || null };
  try {
    await busy(form.querySelector("button[type=submit]"), () => api("api/v1/sources", { method: "POST", body }));
    say($("source-message"), `Added ${body.name}.`, "ok");
    form.reset();
  } catch (error) {
    say($("source-message"), error.message, "error");
    return;
  }
  await refreshPeers();
}

export async function loadLocalTitles() {
  const titles = await api("api/v1/local-ae-titles");
  replace(
    $("local-body"),
    titles.map((t) =>
      h(
        "tr",
        {},
        h("td", { class: "mono" }, h("strong", {}, t.ae_title)),
        h("td", { class: "mono" }, String(t.port)),
        h("td", {}, t.source),
        h(
          "td",
          {},
          t.source === "config"
            ? h("span", { class: "muted" }, "configuration file")
            : h("button", { type: "button", class: "button small danger write", onclick: (e) => removeLocalTitle(t.ae_title, e.currentTarget) }, "Remove"),
        ),
      ),
    ),
  );
}

async function removeLocalTitle(title, button) {
  if (!window.confirm(`Stop answering to ${title}?`)) return;
  try {
    await busy(button, () => api(`api/v1/local-ae-titles/${encodeURIComponent(title)}`, { method: "DELETE" }));
    say($("local-message"), `The node no longer answers to ${title}.`, "ok");
  } catch (error) {
    say($("local-message"), error.message, "error");
  }
  await refreshPeers();
}

async function submitLocalTitle(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const body = { ae_title: form.elements.ae_title.value.trim() };
  try {
    await busy(form.querySelector("button[type=submit]"), () => api("api/v1/local-ae-titles", { method: "POST", body }));
    say($("local-message"), `The node now also answers to ${body.ae_title}.`, "ok");
    form.reset();
  } catch (error) {
    say($("local-message"), error.message, "error");
    return;
  }
  await refreshPeers();
}

const compact = (value) => (typeof value === "string" ? value : JSON.stringify(value));

/** A change as "field: before → after" for the fields that changed; anything else as JSON. */
function auditDetails(details) {
  if (!details) return "";
  const { before, after } = details;
  const isObject = (v) => v && typeof v === "object" && !Array.isArray(v);
  if (isObject(before) && isObject(after)) {
    const keys = [...new Set([...Object.keys(before), ...Object.keys(after)])];
    const changed = keys.filter((k) => compact(before[k]) !== compact(after[k]));
    if (changed.length) return changed.map((k) => `${k}: ${compact(before[k] ?? "—")} → ${compact(after[k] ?? "—")}`).join("; ");
  }
  return JSON.stringify(details);
}

export async function loadAudit() {
  const events = await api("api/v1/audit?limit=100");
  const body = $("audit-body");
  if (!events.length) {
    replace(body, empty(5, "Nothing recorded yet."));
    return;
  }
  replace(
    body,
    events.map((e) =>
      h(
        "tr",
        {},
        h("td", { title: e.at }, time(e.at)),
        h("td", {}, e.actor),
        h("td", {}, h("strong", {}, e.action)),
        h("td", { class: "mono" }, e.target || ""),
        h("td", { class: "details", title: e.details ? JSON.stringify(e.details, null, 1) : "" }, auditDetails(e.details)),
      ),
    ),
  );
}

export async function refreshPeers() {
  await Promise.all([loadDestinations(), loadSources(), loadLocalTitles(), loadAudit()]);
}

export function setupPeers() {
  const form = $("destination-form");
  form.elements.protocol.addEventListener("change", () => showProtocolFields(form));
  form.addEventListener("submit", submitDestination);
  $("destination-cancel").addEventListener("click", () => {
    resetDestinationForm();
    say($("destination-message"), "");
  });
  showProtocolFields(form);
  $("source-form").addEventListener("submit", submitSource);
  $("local-form").addEventListener("submit", submitLocalTitle);
}

// ---- Rules (the API may not offer them: then the panel says so) ------------------------------

export async function loadRules() {
  const unavailable = $("rules-unavailable");
  const editor = $("rules-editor");
  let rules;
  try {
    rules = await api("api/v1/rules");
  } catch (error) {
    editor.hidden = true;
    if (error.status === 404) {
      say(unavailable, "Routing rules are not available on this node.");
    } else {
      say(unavailable, `The rules could not be read: ${error.message}`, "error");
    }
    return;
  }
  unavailable.hidden = true;
  editor.hidden = false;
  $("rules-document").value = rules.document || "";
  $("rules-meta").textContent =
    rules.id === null || rules.id === undefined
      ? "No rules saved yet."
      : `Version ${rules.id}, saved by ${rules.created_by} at ${time(rules.created_at)}.`;
}

async function saveRules(event) {
  event.preventDefault();
  const message = $("rules-message");
  try {
    const saved = await busy(event.submitter, () =>
      api("api/v1/rules", { method: "PUT", body: { document: $("rules-document").value } }),
    );
    say(message, `Saved${saved && saved.id != null ? ` as version ${saved.id}` : ""}.`, "ok");
    await loadRules();
  } catch (error) {
    say(message, error.status === 404 ? "Routing rules are not available on this node." : error.message, "error");
  }
}

async function testRules(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const message = $("rules-test-message");
  const out = $("rules-test-result");
  replace(out);
  say(message, "");
  const study = form.elements.study_instance_uid.value.trim();
  try {
    const answer = await busy(event.submitter, () =>
      api("api/v1/rules/test", { method: "POST", body: { study_instance_uid: study } }),
    );
    if (!answer.series?.length) {
      say(message, "This study has no series.");
      return;
    }
    replace(
      out,
      answer.series.map((s) => [
        h("h3", {}, "Series ", uid(s.series_instance_uid)),
        h("pre", { class: "decision" }, JSON.stringify(s.decision, null, 2)),
      ]),
    );
  } catch (error) {
    say(message, error.message, "error");
  }
}

export function setupRules() {
  $("rules-form").addEventListener("submit", saveRules);
  $("rules-test-form").addEventListener("submit", testRules);
}

// ---- Queues and health --------------------------------------------------------------------

export function renderQueues(overview, ready) {
  const q = overview.queues;
  const c = overview.counts;
  const metric = (name, value, tone = "") => h("div", { class: `metric ${tone}`.trim() }, h("div", { class: "value" }, String(value)), h("div", { class: "name" }, name));
  replace(
    $("queue-cards"),
    metric("Runs queued", q.runs_queued),
    metric("Runs running", q.runs_running),
    metric("Deliveries pending", q.deliveries_pending, q.deliveries_pending ? "warn" : ""),
    metric("Deliveries failed", q.deliveries_failed, q.deliveries_failed ? "bad" : ""),
    metric("Instances received", c.instances_received),
    metric("Series", c.series),
    metric("Studies", c.studies),
    metric("Catalogue", ready ? "ready" : "not ready", ready ? "" : "bad"),
  );
  const rows = (counts) => {
    const entries = Object.entries(counts).sort();
    return entries.length
      ? entries.map(([state, n]) => h("tr", {}, h("td", {}, badge(state)), h("td", {}, String(n))))
      : [empty(2, "none")];
  };
  replace($("series-by-state"), rows(c.series_by_state));
  replace($("runs-by-state"), rows(c.runs));
  replace($("deliveries-by-state"), rows(c.deliveries));
}
