// The pipelines list (search, pages, each with its last run's status) and the create form (fields
// or a whole pipeline file in YAML); live from the gateway's `pipelines` and `runs` channels.
import { api, ApiError } from "../api.js";
import { auth } from "../auth.js";
import { badge, clear, debounce, h, when } from "../dom.js";
import { load as loadYaml } from "../vendor/js-yaml.mjs";

const LIMIT = 20;

/** Errors as a list, each at its path: [{path, message}]. */
export function errorList(errors, { testid = "spec-errors" } = {}) {
  return h("div", { role: "alert", "data-testid": testid },
    h("p", { class: "error" }, `${errors.length} error${errors.length === 1 ? "" : "s"}:`),
    h("ul", { class: "errors" }, errors.map((e) => h("li", {}, h("code", {}, e.path || "(spec)"), " ", e.message))));
}

/** YAML text -> object, or a thrown {path, message} naming the line. */
export function parseYaml(text) {
  try {
    return loadYaml(text);
  } catch (err) {
    const line = err.mark ? `line ${err.mark.line + 1}` : "yaml";
    throw { path: line, message: err.reason || err.message };
  }
}

function createForm(ctx) {
  const name = h("input", { id: "new-name", name: "name", autocomplete: "off" });
  const description = h("input", { id: "new-description", name: "description", autocomplete: "off" });
  const yaml = h("textarea", { id: "new-yaml", name: "definition", rows: 14, cols: 80, spellcheck: "false" },
    "stages:\n  - id: build\n    jobs:\n      - name: compile\n        steps:\n          - {name: hello, run: \"echo hello\"}\n");
  const out = h("div", { "aria-live": "polite" });
  const submit = h("button", { type: "submit", class: "primary" }, "Create pipeline");
  const form = h("form", { class: "card", "aria-label": "Create a pipeline", onsubmit: async (event) => {
    event.preventDefault();
    clear(out);
    submit.disabled = true;
    try {
      const doc = parseYaml(yaml.value) || {};
      if (typeof doc !== "object" || Array.isArray(doc)) throw { path: "yaml", message: "must be a mapping with `stages` or `jobs`" };
      const { name: fileName, description: fileDescription, ...spec } = doc;
      const pipelineName = name.value.trim() || fileName;
      if (!pipelineName) throw { path: "name", message: "a pipeline needs a name (the field, or `name:` in the YAML)" };
      const checked = await api("/pipelines/validate", { method: "POST", body: { spec, format: "yaml" } });
      if (!checked.valid) { clear(out, errorList(checked.errors)); return; }
      const created = await api("/pipelines", { method: "POST",
        body: { name: pipelineName, description: description.value.trim() || fileDescription || null } });
      await api(`/pipelines/${created.id}/spec/save`, { method: "POST",
        body: { spec, format: "yaml", commitMessage: "created in the dashboard" } });
      ctx.navigate(`/pipelines/${created.id}`);
    } catch (err) {
      if (err instanceof ApiError) clear(out, err.errors.length ? errorList(err.errors) : h("p", { class: "error", role: "alert" }, err.message));
      else if (err && err.path) clear(out, errorList([err]));
      else clear(out, h("p", { class: "error", role: "alert" }, String(err)));
    } finally {
      submit.disabled = false;
    }
  } },
    h("h2", {}, "Create a pipeline"),
    h("div", { class: "row" }, h("label", { for: "new-name" }, "Name"), name,
      h("label", { for: "new-description" }, "Description"), h("span", { class: "grow" }, description)),
    h("label", { for: "new-yaml" }, "Definition (YAML: stages or jobs, variables, triggers; may also hold name and description)"),
    h("div", {}, yaml), h("div", { class: "row" }, submit), out);
  description.style.width = "100%";
  yaml.style.width = "100%";
  return form;
}

export async function render(ctx) {
  document.title = "Pipelines";
  let page = Number(ctx.query.get("page")) || 1;
  let q = ctx.query.get("q") || "";
  const body = h("tbody");
  const info = h("span", { class: "muted", "data-testid": "pipelines-total" });
  const search = h("input", { type: "search", id: "pipeline-search", value: q, placeholder: "name contains…" });
  const prev = h("button", { type: "button", onclick: () => { page--; load(); } }, "Previous page");
  const next = h("button", { type: "button", onclick: () => { page++; load(); } }, "Next page");
  search.addEventListener("input", debounce(() => { q = search.value.trim(); page = 1; load(); }, 200));

  let asked = 0; // answers to older requests (an earlier filter) are dropped
  async function load() {
    const mine = ++asked;
    const result = await api("/pipelines", { query: { page, limit: LIMIT, q } });
    const ids = result.data.map((p) => p.id);
    const latest = ids.length ? await api("/runs/latest", { query: { pipelineIds: ids.join(",") } }) : [];
    if (!ctx.alive() || mine !== asked) return;
    const last = new Map(latest.map((r) => [r.pipelineId, r]));
    clear(body, result.data.length ? result.data.map((p) => {
      const run = last.get(p.id);
      return h("tr", { "data-pipeline": p.id },
        h("td", {}, h("a", { href: `/pipelines/${p.id}` }, p.name)),
        h("td", { class: "muted" }, p.description || ""),
        h("td", {}, run ? h("a", { href: `/runs/${run.id}`, "aria-label": `last run of ${p.name}` }, badge(run.status)) : h("span", { class: "muted" }, "no runs")),
        h("td", { class: "num" }, `v${p.definitionVersion}`),
        h("td", {}, when(p.updatedAt)));
    }) : h("tr", {}, h("td", { colspan: 5, class: "muted" }, q ? `No pipeline name contains “${q}”.` : "No pipelines yet.")));
    info.textContent = `${result.total} pipeline${result.total === 1 ? "" : "s"}`;
    prev.disabled = page <= 1;
    next.disabled = page * LIMIT >= result.total;
    const url = new URL(location.href);
    for (const [k, v] of [["q", q], ["page", page > 1 ? page : ""]]) { if (v) url.searchParams.set(k, v); else url.searchParams.delete(k); }
    history.replaceState(null, "", url.pathname + url.search);
  }
  const reload = debounce(() => load().catch((e) => console.error(e)), 250);
  const stops = [
    ctx.live.subscribe("pipelines", {}, { onFrame: reload, onLive: reload }),
    ctx.live.subscribe("runs", {}, { onFrame: reload, onLive: reload }),
  ];
  ctx.main.append(
    h("h1", {}, "Pipelines"),
    h("div", { class: "row" }, h("label", { for: "pipeline-search" }, "Search"), search, h("span", { class: "grow" }), info),
    h("table", { "data-testid": "pipelines-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Description"), h("th", {}, "Last run"), h("th", {}, "Version"), h("th", {}, "Updated"))),
      body),
    h("div", { class: "pager" }, prev, next),
    auth.can("member") ? createForm(ctx) : h("p", { class: "muted" }, "Your role may read pipelines; creating one needs the member role."));
  await load();
  return () => { reload.cancel(); stops.forEach((s) => s()); };
}
