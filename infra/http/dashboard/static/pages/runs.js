// Runs across pipelines (or of one pipeline), newest first, filtered by status; live from the
// gateway's `runs` channel (a frame reloads the page of rows).
import { api } from "../api.js";
import { badge, clear, debounce, duration, h, shortId, statusLabel, STATUSES, when } from "../dom.js";

/** A runs table with its status filter and pager; returns {el, leave}. */
export function runsTable(ctx, { pipelineId = null, limit = 20, showPipeline = true } = {}) {
  let page = 1;
  let status = ctx.query.get("status") || "";
  const body = h("tbody");
  const info = h("span", { class: "muted", "data-testid": "runs-total" });
  const prev = h("button", { type: "button", onclick: () => { page--; load(); } }, "Newer runs");
  const next = h("button", { type: "button", onclick: () => { page++; load(); } }, "Older runs");
  const select = h("select", { id: `status-${pipelineId || "all"}`, onchange: () => { status = select.value; page = 1; load(); } },
    h("option", { value: "" }, "any status"), STATUSES.map((s) => h("option", { value: s, selected: s === status }, statusLabel(s))));
  const el = h("section", { "aria-label": "Runs" },
    h("div", { class: "row" }, h("label", { for: select.id }, "Status"), select, h("span", { class: "grow" }), info),
    h("table", { "data-testid": "runs-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Run"), showPipeline ? h("th", {}, "Pipeline") : null, h("th", {}, "Status"),
        h("th", {}, "Triggered by"), h("th", {}, "Version"), h("th", {}, "Created"), h("th", {}, "Duration"))),
      body),
    h("div", { class: "pager" }, prev, next));

  let asked = 0; // answers to older requests (an earlier filter) are dropped
  async function load() {
    const mine = ++asked;
    const result = await api("/runs", { query: { page, limit, status, pipelineId } });
    if (!ctx.alive() || mine !== asked) return;
    const cols = showPipeline ? 7 : 6;
    clear(body, result.data.length ? result.data.map((r) => h("tr", { "data-run": r.id },
      h("td", {}, h("a", { href: `/runs/${r.id}` }, `Run ${shortId(r.id)}`)),
      showPipeline ? h("td", {}, h("a", { href: `/pipelines/${r.pipelineId}` }, r.pipelineName || shortId(r.pipelineId))) : null,
      h("td", {}, badge(r.status)),
      h("td", {}, r.triggeredBy, r.trigger && r.trigger.type && r.trigger.type !== "manual" ? ` (${r.trigger.type})` : ""),
      h("td", { class: "num" }, `v${r.definitionVersion}`),
      h("td", {}, when(r.createdAt)),
      h("td", { class: "num" }, duration(r.durationMs))))
      : h("tr", {}, h("td", { colspan: cols, class: "muted" }, status ? `No ${statusLabel(status)} runs.` : "No runs yet.")));
    const from = result.total ? (page - 1) * limit + 1 : 0;
    info.textContent = `${from}–${(page - 1) * limit + result.data.length} of ${result.total} runs`;
    prev.disabled = page <= 1;
    next.disabled = page * limit >= result.total;
    // The filter is part of the address, so that it can be shared.
    const url = new URL(location.href);
    if (status) url.searchParams.set("status", status); else url.searchParams.delete("status");
    history.replaceState(null, "", url.pathname + url.search);
  }
  const reload = debounce(() => load().catch((e) => console.error(e)), 250);
  const stop = ctx.live.subscribe("runs", pipelineId ? { pipelineId } : {}, { onFrame: reload, onLive: reload });
  return { el, ready: load(), leave: () => { reload.cancel(); stop(); } };
}

export async function render(ctx) {
  document.title = "Runs · Pipelines";
  const table = runsTable(ctx, {});
  ctx.main.append(h("h1", {}, "Runs"), table.el);
  await table.ready;
  return table.leave;
}
