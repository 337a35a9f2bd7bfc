// The Studies panel: every series from reception to delivery, and the rendered reports.

import { api } from "./api.js";
import { $, badge, busy, duration, h, replace, say, shortUid, time, uid } from "./ui.js";

const STAGES = [
  ["received", "Received"],
  ["complete", "Complete"],
  ["inference", "Inference"],
  ["report", "Report"],
  ["delivered", "Delivered"],
];

let shown = ""; // what the table shows now, to leave it alone when nothing changed

function deliveriesOf(run) {
  return run ? run.results.flatMap((result) => result.deliveries) : [];
}

function latest(items, key) {
  const values = items.map((item) => item[key]).filter(Boolean).sort();
  return values.at(-1);
}

/** Each stage's status (done, active, failed, pending, skipped) and a short detail. */
export function stagesOf(series) {
  const run = series.runs.at(-1);
  const receiving = series.state === "receiving";
  const failed = run?.state === "failed";
  const results = run ? run.results : [];
  const deliveries = deliveriesOf(run);
  const stage = {};

  stage.received = {
    status: receiving ? "active" : "done",
    detail: `${series.instance_count} inst. in ${duration(series.first_received_at, series.last_received_at) || "0 s"}`,
  };
  stage.complete = series.completed_at
    ? { status: "done", detail: time(series.completed_at) }
    : { status: receiving ? "pending" : "done", detail: receiving ? "waiting for quiet" : "" };

  if (!run || series.state === "not_analysed") {
    const skipped = ["done", "failed", "not_analysed"].includes(series.state);
    for (const name of ["inference", "report", "delivered"]) {
      stage[name] = skipped
        ? { status: "skipped", detail: "not analysed" }
        : { status: "pending", detail: "" };
    }
    return stage;
  }

  if (run.inferred_at) {
    stage.inference = { status: "done", detail: duration(run.started_at, run.inferred_at) };
  } else if (run.started_at) {
    stage.inference = failed
      ? { status: "failed", detail: "failed" }
      : { status: "active", detail: `since ${time(run.started_at)}` };
  } else {
    stage.inference = failed
      ? { status: "failed", detail: "failed" }
      : { status: "pending", detail: run.enqueued_at ? "queued" : "" };
  }

  if (results.length) {
    const first = results.map((r) => r.created_at).sort()[0];
    stage.report = {
      status: "done",
      detail: `${results.length} object${results.length === 1 ? "" : "s"} · ${duration(run.inferred_at, first)}`,
    };
  } else if (run.inferred_at) {
    stage.report = failed ? { status: "failed", detail: "failed" } : { status: "active", detail: "writing" };
  } else {
    stage.report = { status: failed ? "skipped" : "pending", detail: "" };
  }

  const sent = deliveries.filter((d) => d.state === "sent").length;
  const dead = deliveries.filter((d) => d.state === "failed").length;
  if (!results.length) {
    stage.delivered = { status: failed ? "skipped" : "pending", detail: "" };
  } else if (!deliveries.length) {
    stage.delivered = { status: "done", detail: "no destination" };
  } else if (dead) {
    stage.delivered = { status: "failed", detail: `${dead} failed, ${sent}/${deliveries.length} sent` };
  } else if (sent < deliveries.length) {
    stage.delivered = { status: "active", detail: `${sent}/${deliveries.length} sent` };
  } else {
    const first = results.map((r) => r.created_at).sort()[0];
    stage.delivered = {
      status: "done",
      detail: `${sent}/${deliveries.length} · ${duration(first, latest(deliveries, "sent_at"))}`,
    };
  }
  return stage;
}

function stagesCell(series) {
  const stage = stagesOf(series);
  return h(
    "div",
    { class: "stages" },
    STAGES.map(([name, label]) =>
      h(
        "div",
        { class: "stage", dataset: { stage: name, status: stage[name].status }, title: `${label}: ${stage[name].status}` },
        h("span", { class: "label" }, label),
        h("span", { class: "detail" }, stage[name].detail || "\u00a0"),
      ),
    ),
  );
}

/** One badge per destination: failed if any failed, pending if any pending, else sent. */
function deliveriesCell(series) {
  const byDestination = new Map();
  for (const d of deliveriesOf(series.runs.at(-1))) {
    if (!byDestination.has(d.destination)) byDestination.set(d.destination, []);
    byDestination.get(d.destination).push(d);
  }
  const badges = [...byDestination].map(([name, list]) => {
    const state = list.some((d) => d.state === "failed")
      ? "failed"
      : list.some((d) => d.state === "pending")
        ? "pending"
        : "sent";
    const title = list
      .map((d) => `#${d.id} ${d.state}, ${d.attempts} attempt(s)${d.last_error ? `: ${d.last_error}` : ""}`)
      .join("\n");
    return badge(`${name}: ${state}`, state, { title, dataset: { destination: name, state } });
  });
  const forwards = series.forwards.map((d) =>
    badge(`forward ${d.destination}: ${d.state}`, d.state, {
      title: d.last_error || `rule ${d.rule || ""}`,
      dataset: { forward: d.destination, state: d.state },
    }),
  );
  const all = [...badges, ...forwards];
  return all.length ? h("div", { class: "badges" }, all) : h("span", { class: "muted" }, "—");
}

function resultsCell(series) {
  const run = series.runs.at(-1);
  if (!run || !run.results.length) {
    return run?.error ? h("span", { class: "error-text" }, run.error) : h("span", { class: "muted" }, "—");
  }
  const summaries = [...new Set(run.results.map((r) => r.summary).filter(Boolean))];
  return h(
    "div",
    {},
    h(
      "div",
      { class: "badges" },
      run.results.map((r) => badge(r.kind.toUpperCase(), "", { title: r.uid, dataset: { result: r.kind } })),
    ),
    summaries.map((s) => h("span", { class: "sub" }, s)),
    run.error ? h("span", { class: "error-text" }, run.error) : null,
  );
}

function seriesRow(series) {
  return h(
    "tr",
    { dataset: { series: series.uid } },
    h(
      "td",
      {},
      h("strong", {}, series.modality || "?"),
      " ",
      series.description || h("span", { class: "muted" }, "(no description)"),
      h("span", { class: "sub" }, uid(series.uid), ` · ${series.instance_count} instances`),
      series.calling_ae_title ? h("span", { class: "sub" }, `from ${series.calling_ae_title}`) : null,
    ),
    h(
      "td",
      {},
      badge(series.state.replace("_", " "), series.state, { dataset: { field: "series-state" } }),
      series.state_reason
        ? h("span", { class: "sub", dataset: { field: "series-state-reason" } }, series.state_reason)
        : null,
    ),
    h("td", {}, stagesCell(series)),
    h("td", {}, resultsCell(series)),
    h("td", {}, deliveriesCell(series)),
  );
}

function studyRows(study) {
  const hasReport = study.series.some((s) => s.runs.some((r) => r.results.some((x) => x.kind === "sr")));
  const header = h(
    "tr",
    { class: "study-row", dataset: { study: study.study_instance_uid } },
    h(
      "td",
      { colspan: 5 },
      h(
        "div",
        { class: "study-title" },
        h(
          "span",
          {},
          "Study ",
          uid(study.study_instance_uid),
          h("span", { class: "sub" }, `first seen ${time(study.created_at)} · ${study.series.length} series`),
        ),
        hasReport
          ? h(
              "button",
              {
                type: "button",
                class: "button small",
                onclick: (event) => showReport(study.study_instance_uid, event.currentTarget),
              },
              "View report",
            )
          : null,
      ),
    ),
  );
  return [header, ...study.series.map(seriesRow)];
}

function queueStrip(overview) {
  const q = overview.queues;
  const pill = (name, label, value, state) =>
    h(
      "span",
      { class: "pill", dataset: { queue: name, value } },
      label,
      h("strong", {}, badge(String(value), value ? state : "")),
    );
  replace(
    $("studies-queues"),
    pill("runs_queued", "Runs queued", q.runs_queued, "queued"),
    pill("runs_running", "Running", q.runs_running, "running"),
    pill("deliveries_pending", "Deliveries pending", q.deliveries_pending, "pending"),
    pill("deliveries_failed", "Failed deliveries", q.deliveries_failed, "failed"),
    pill("instances_received", "Instances received", overview.counts.instances_received, ""),
  );
}

export function renderStudies(overview) {
  queueStrip(overview);
  const key = JSON.stringify(overview.studies);
  if (key === shown) return;
  shown = key;
  const body = $("studies-body");
  if (!overview.studies.length) {
    replace(body, h("tr", {}, h("td", { colspan: 5, class: "empty" }, "No study received yet.")));
    return;
  }
  replace(body, overview.studies.flatMap(studyRows));
}

export function resetStudies() {
  shown = "";
  closeReport();
}

async function showReport(studyUid, button) {
  const panel = $("report");
  const frame = $("report-frame");
  $("report-title").textContent = `Report — study ${shortUid(studyUid)}`;
  panel.hidden = false;
  say($("report-message"), "Loading…");
  try {
    const html = await busy(button, () =>
      api(`api/v1/studies/${encodeURIComponent(studyUid)}/report`, { as: "text" }),
    );
    // Shown before its content is set: a frame filled while hidden may not lay out.
    frame.hidden = false;
    frame.srcdoc = html;
    say($("report-message"), "");
  } catch (error) {
    frame.hidden = true;
    say($("report-message"), error.status === 404 ? "No report for this study yet." : error.message, "error");
  }
  panel.scrollIntoView({ behavior: "smooth", block: "start" });
}

export function closeReport() {
  $("report").hidden = true;
  $("report-frame").srcdoc = "";
}
