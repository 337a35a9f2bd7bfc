// The dashboard shell: log in, tabs, and the refresh loop.

import { api, onUnauthorized, publicGet, session } from "./api.js";
import {
  loadFailures,
  loadRules,
  refreshPeers,
  renderQueues,
  setupFailures,
  setupPeers,
  setupRules,
} from "./admin.js";
import { closeReport, renderStudies, resetStudies } from "./studies.js";
import { $, say } from "./ui.js";

const REFRESH_MS = 3000;
const TABS = ["studies", "failures", "peers", "rules", "queues"];
let timer = null;
let ticking = false;
let ready = true;
let current = "studies";

function showLogin(text = "", kind = "error") {
  stopRefresh();
  resetStudies();
  document.body.removeAttribute("data-role");
  $("app").hidden = true;
  $("session").hidden = true;
  $("login").hidden = false;
  say($("login-message"), text, kind);
  $("token").value = "";
  $("token").focus();
}

function showApp(who) {
  document.body.dataset.role = who.role;
  $("who-name").textContent = who.name;
  $("who-role").textContent = who.role;
  $("who-role").className = `badge role ${who.role === "admin" ? "ok" : "warn"}`;
  $("read-only-notice").hidden = who.role !== "read";
  $("login").hidden = true;
  $("session").hidden = false;
  $("app").hidden = false;
  const wanted = window.location.hash.slice(1);
  select(TABS.includes(wanted) ? wanted : current);
  startRefresh();
}

async function logIn(token) {
  try {
    const who = await api("api/v1/whoami", { token });
    session.token = token;
    showApp(who);
  } catch (error) {
    if (error.status === 401) showLogin("The node did not accept this token (401). Check it and try again.");
    else if (error.status === 403) showLogin("This token's role cannot use the dashboard (403): use an admin or read token.");
    else showLogin(`Could not log in: ${error.message}`);
  }
}

function select(tab) {
  current = tab;
  for (const name of TABS) {
    const selected = name === tab;
    $(`tab-${name}`).setAttribute("aria-selected", String(selected));
    $(`tab-${name}`).tabIndex = selected ? 0 : -1;
    $(`panel-${name}`).hidden = !selected;
  }
  if (window.location.hash !== `#${tab}`) window.history.replaceState(null, "", `#${tab}`);
  if (tab !== "studies") closeReport();
  if (tab === "failures") guard(loadFailures());
  if (tab === "peers") guard(refreshPeers());
  if (tab === "rules") guard(loadRules());
  tick();
}

/** Show an unexpected error of a background refresh in the banner (401 is handled apart). */
async function guard(promise) {
  try {
    await promise;
    say($("app-message"), "");
  } catch (error) {
    if (error.status !== 401) say($("app-message"), error.message, "error");
  }
}

async function tick() {
  if (ticking || $("app").hidden) return;
  ticking = true;
  try {
    await guard(
      (async () => {
        const [overview] = await Promise.all([
          api("api/v1/overview"),
          current === "failures" ? loadFailures() : null,
          current === "queues" ? checkHealth() : null,
        ]);
        renderStudies(overview);
        renderQueues(overview, ready);
        const failed = overview.queues.deliveries_failed;
        $("failures-count").textContent = String(failed);
        $("failures-count").hidden = failed === 0;
        $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      })(),
    );
  } finally {
    ticking = false;
  }
}

function startRefresh() {
  stopRefresh();
  timer = window.setInterval(() => {
    if (!document.hidden) tick();
  }, REFRESH_MS);
}

function stopRefresh() {
  if (timer !== null) window.clearInterval(timer);
  timer = null;
}

async function checkHealth() {
  try {
    const health = await publicGet("healthz");
    $("node-version").textContent = health.body.version ? `v${health.body.version}` : "";
    const readiness = await publicGet("readyz");
    ready = readiness.ok;
  } catch {
    ready = false;
  }
  const flag = $("node-ready");
  flag.hidden = ready;
  flag.textContent = ready ? "" : "not ready";
  flag.className = ready ? "badge" : "badge bad";
}

function setup() {
  onUnauthorized(() => {
    session.token = null;
    showLogin("Your session has ended: the node refused the token (401). Log in again.");
  });
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (token) logIn(token);
  });
  $("logout").addEventListener("click", () => {
    session.token = null;
    showLogin("You are logged out.", "ok");
  });
  for (const name of TABS) $(`tab-${name}`).addEventListener("click", () => select(name));
  $("report-close").addEventListener("click", closeReport);
  window.addEventListener("hashchange", () => {
    const wanted = window.location.hash.slice(1);
    if (TABS.includes(wanted) && wanted !== current && !$("app").hidden) select(wanted);
  });
  setupFailures();
  setupPeers();
  setupRules();
  checkHealth();

  if (session.token) logIn(session.token);
  else showLogin("");
}

setup();
