// Deployments: what is deployed where now (components × environments), and the history with
// filters. The gateway has no deployments channel: a run's frame (deploys happen in runs)
// reloads both, at most every half second.
import { api } from "../api.js";
import { badge, clear, debounce, h, shortId, when } from "../dom.js";

const STATUSES = ["queued", "running", "succeeded", "failed"];
const LIMIT = 20;

export async function render(ctx) {
  document.title = "Deployments · Pipelines";
  const [environments, components] = await Promise.all([api("/environments"), api("/components")]);
  if (!ctx.alive()) return null;
  let page = 1;
  const filters = { environmentId: ctx.query.get("environmentId") || "", componentId: ctx.query.get("componentId") || "",
    status: ctx.query.get("status") || "" };
  const matrix = h("div", { "data-testid": "deployed-matrix" });
  const body = h("tbody");
  const info = h("span", { class: "muted" });
  const prev = h("button", { type: "button", onclick: () => { page--; loadHistory(); } }, "Newer deployments");
  const next = h("button", { type: "button", onclick: () => { page++; loadHistory(); } }, "Older deployments");
  const select = (id, label, options, key) => {
    const el = h("select", { id, onchange: () => { filters[key] = el.value; page = 1; loadHistory(); } },
      h("option", { value: "" }, "any"), options.map(([value, text]) => h("option", { value, selected: value === filters[key] }, text)));
    return [h("label", { for: id }, label), el];
  };

  async function loadMatrix() {
    const current = await api("/deployments/current");
    if (!ctx.alive()) return;
    const at = new Map(current.map((d) => [`${d.componentId}|${d.environmentId}`, d]));
    if (!components.length || !environments.length) {
      clear(matrix, h("p", { class: "muted" }, "No components or environments yet (an admin creates them with the API or the CLI)."));
      return;
    }
    clear(matrix, h("table", { class: "matrix" },
      h("caption", { class: "sr-only" }, "The last successful deployment of each component to each environment"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Component"), environments.map((e) => h("th", { scope: "col" }, e.name)))),
      h("tbody", {}, components.map((c) => h("tr", {}, h("th", { scope: "row" }, c.name), environments.map((e) => {
        const d = at.get(`${c.id}|${e.id}`);
        return h("td", { "data-cell": `${c.name}|${e.name}` }, d
          ? [h("strong", {}, d.version || `run ${shortId(d.runId)}`), h("br"), h("a", { href: `/runs/${d.runId}` }, when(d.finishedAt)),
            d.approvedBy ? h("div", { class: "muted" }, `approved by ${d.approvedBy}`) : null]
          : h("span", { class: "muted" }, "not deployed"));
      }))))));
  }

  let asked = 0; // answers to older requests (an earlier filter) are dropped
  async function loadHistory() {
    const mine = ++asked;
    const result = await api("/deployments", { query: { page, limit: LIMIT, ...filters } });
    if (!ctx.alive() || mine !== asked) return;
    clear(body, result.data.length ? result.data.map((d) => h("tr", {},
      h("td", {}, d.componentName || d.componentId), h("td", {}, d.environmentName || d.environmentId),
      h("td", {}, d.version || "—"), h("td", {}, badge(d.status)),
      h("td", {}, h("a", { href: `/runs/${d.runId}` }, `Run ${shortId(d.runId)}`)),
      h("td", {}, d.triggeredBy || ""), h("td", {}, d.approvedBy || ""), h("td", {}, when(d.queuedAt)),
      h("td", { class: "error" }, d.error || "")))
      : h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No deployments match.")));
    info.textContent = `${result.total} deployment${result.total === 1 ? "" : "s"}`;
    prev.disabled = page <= 1;
    next.disabled = page * LIMIT >= result.total;
  }

  ctx.main.append(h("h1", {}, "Deployments"), h("h2", {}, "Deployed now"), matrix,
    h("h2", {}, "History"),
    h("div", { class: "row" },
      select("f-env", "Environment", environments.map((e) => [e.id, e.name]), "environmentId"),
      select("f-comp", "Component", components.map((c) => [c.id, c.name]), "componentId"),
      select("f-status", "Status", STATUSES.map((s) => [s, s]), "status"), h("span", { class: "grow" }), info),
    h("table", {}, h("thead", {}, h("tr", {}, ["Component", "Environment", "Version", "Status", "Run", "Triggered by", "Approved by", "Queued", "Error"].map((t) => h("th", {}, t)))), body),
    h("div", { class: "pager" }, prev, next));
  const reload = debounce(() => Promise.all([loadMatrix(), loadHistory()]).catch((e) => console.error(e)), 500);
  const stop = ctx.live.subscribe("runs", {}, { onFrame: reload, onLive: reload });
  await Promise.all([loadMatrix(), loadHistory()]);
  return () => { reload.cancel(); stop(); };
}
