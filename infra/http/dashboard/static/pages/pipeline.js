// One pipeline: its graph, its spec as YAML (validate, save), its definition versions with a
// diff between two, its triggers and webhook, a trigger form with variables, and its runs.
import { api, ApiError } from "../api.js";
import { auth } from "../auth.js";
import { clear, debounce, h, when } from "../dom.js";
import { lineDiff } from "../diff.js";
import { specGraph } from "../graph.js";
import { errorList, parseYaml } from "./pipelines.js";
import { runsTable } from "./runs.js";

function graphSection(spec) {
  const { svg, text } = specGraph(spec);
  return h("div", {}, h("div", { class: "graph", "data-testid": "graph" }, svg),
    h("ul", { class: "sr-only" }, text.map((t) => h("li", {}, t))));
}

function variablesForm(ctx, pipeline, spec) {
  const rows = h("div", {});
  const addRow = (key = "", value = "") => {
    const n = rows.children.length + 1;
    const k = h("input", { "aria-label": `Variable ${n} name`, value: key, autocomplete: "off" });
    const v = h("input", { "aria-label": `Variable ${n} value`, value, autocomplete: "off" });
    const row = h("div", { class: "row var" }, k, h("span", {}, "="), v,
      h("button", { type: "button", "aria-label": `Remove variable ${n}`, onclick: () => row.remove() }, "Remove"));
    rows.append(row);
  };
  for (const [k, v] of Object.entries((spec && spec.variables) || {})) addRow(k, String(v));
  const out = h("div", { "aria-live": "polite" });
  const submit = h("button", { type: "submit", class: "primary" }, "Trigger run");
  return h("form", { class: "card", "aria-label": "Trigger a run", onsubmit: async (event) => {
    event.preventDefault();
    const variables = {};
    for (const row of rows.querySelectorAll(".var")) {
      const [k, v] = row.querySelectorAll("input");
      if (k.value.trim()) variables[k.value.trim()] = v.value;
    }
    submit.disabled = true;
    try {
      const run = await api(`/pipelines/${pipeline.id}/trigger`, { method: "POST", body: { variables } });
      ctx.navigate(`/runs/${run.id}`);
    } catch (err) {
      clear(out, err.errors && err.errors.length ? errorList(err.errors, { testid: "trigger-errors" }) : h("p", { class: "error", role: "alert" }, err.message));
    } finally {
      submit.disabled = false;
    }
  } },
    h("h2", {}, "Trigger a run"), h("p", { class: "muted" }, "Variables reach the scripts as environment variables."),
    rows, h("div", { class: "row" }, h("button", { type: "button", onclick: () => addRow() }, "Add variable"), submit), out);
}

function specEditor(pipeline, current, onSaved) {
  const area = h("textarea", { id: "spec-yaml", rows: 18, spellcheck: "false", "aria-describedby": "spec-help" }, current.content);
  area.style.width = "100%";
  const message = h("input", { id: "commit-message", placeholder: "what changed and why" });
  const out = h("div", { "aria-live": "polite", "data-testid": "spec-result" });
  const canSave = auth.can("member") && !pipeline.repoUrl;
  const parsed = () => {
    const spec = parseYaml(area.value);
    if (!spec || typeof spec !== "object" || Array.isArray(spec)) throw { path: "spec", message: "must be a mapping with `stages` or `jobs`" };
    return spec;
  };
  const validate = async () => {
    const result = await api(`/pipelines/${pipeline.id}/spec/validate`, { method: "POST", body: { spec: parsed(), format: "yaml" } });
    if (!result.valid) clear(out, errorList(result.errors));
    else clear(out, h("p", { role: "status", "data-testid": "spec-valid" }, "The spec is valid.",
      result.warnings.length ? ` Warnings: ${result.warnings.map((w) => `${w.path}: ${w.message}`).join("; ")}` : ""));
    return result.valid;
  };
  const guard = (fn) => async () => {
    try { await fn(); } catch (err) {
      if (err instanceof ApiError) clear(out, err.errors.length ? errorList(err.errors) : h("p", { class: "error", role: "alert" }, err.message));
      else if (err && err.path) clear(out, errorList([err]));
      else clear(out, h("p", { class: "error", role: "alert" }, String(err)));
    }
  };
  return h("section", { "aria-labelledby": "spec-h" },
    h("h2", { id: "spec-h" }, `Spec (version ${current.version ?? "—"})`),
    h("p", { id: "spec-help", class: "muted" }, pipeline.repoUrl
      ? `Kept in ${pipeline.repoUrl} (${pipeline.pipelineFilePath} on ${pipeline.defaultBranch}): save it with the API or the CLI.`
      : "YAML: stages or jobs, variables, triggers."),
    h("label", { for: "spec-yaml", class: "sr-only" }, "Spec (YAML)"), area,
    h("div", { class: "row" },
      h("button", { type: "button", onclick: guard(validate) }, "Validate"),
      canSave ? [h("label", { for: "commit-message" }, "Commit message"), message,
        h("button", { type: "button", class: "primary", onclick: guard(async () => {
          if (!(await validate())) return;
          const saved = await api(`/pipelines/${pipeline.id}/spec/save`, { method: "POST",
            body: { spec: parsed(), format: "yaml", commitMessage: message.value.trim() || null } });
          clear(out, h("p", { role: "status", "data-testid": "spec-saved" }, `Saved as version ${saved.version}.`));
          onSaved();
        }) }, "Save spec")] : null),
    out);
}

function versionsSection(pipeline, versions) {
  const pick = (id, label, chosen) => h("span", {}, h("label", { for: id }, label), " ",
    h("select", { id }, versions.map((v) => h("option", { value: v.version, selected: v.version === chosen }, `v${v.version}`))));
  const out = h("div", { "data-testid": "diff" });
  const last = versions.length ? versions[versions.length - 1].version : 1;
  const show = async () => {
    const a = Number(document.getElementById("diff-from").value), b = Number(document.getElementById("diff-to").value);
    const [va, vb] = await Promise.all([a, b].map((v) => api(`/pipelines/${pipeline.id}/spec`, { query: { version: v, format: "yaml" } })));
    const lines = lineDiff(va.content, vb.content);
    const changed = lines.filter((l) => l.op !== "same").length;
    clear(out, h("p", { class: "muted" }, changed ? `v${a} → v${b}: ${changed} line${changed === 1 ? "" : "s"} changed` : `v${a} and v${b} are the same`),
      h("div", { class: "diff", role: "region", "aria-label": `Diff of v${a} and v${b}` },
        lines.map((l) => h("div", { class: l.op }, h("span", { class: "sr-only" }, l.op === "add" ? "added: " : l.op === "del" ? "removed: " : ""), l.line))));
  };
  return h("section", { "aria-labelledby": "versions-h" }, h("h2", { id: "versions-h" }, "Definition versions"),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Version"), h("th", {}, "Saved by"), h("th", {}, "Saved"), h("th", {}, "Message"))),
      h("tbody", {}, [...versions].reverse().map((v) => h("tr", {}, h("td", {}, `v${v.version}`), h("td", {}, v.savedBy),
        h("td", {}, when(v.savedAt)), h("td", {}, v.commitMessage || (v.commitSha ? v.commitSha.slice(0, 10) : "")))))),
    versions.length > 1 ? h("div", { class: "row" }, pick("diff-from", "From", Math.max(1, last - 1)), pick("diff-to", "To", last),
      h("button", { type: "button", onclick: () => show().catch((e) => clear(out, h("p", { class: "error" }, e.message))) }, "Show diff")) : h("p", { class: "muted" }, "One version so far."),
    out);
}

function triggersSection(spec, webhook) {
  const triggers = (spec && spec.triggers) || [];
  const describe = (t) => t.type === "cron" ? `cron ${t.schedule}${t.timezone ? ` (${t.timezone})` : ""}`
    : t.type === "event" ? `event ${(t.events || ["push"]).join(", ")}${t.branches ? ` on ${t.branches.join(", ")}` : ""}` : t.type;
  return h("section", { "aria-labelledby": "triggers-h" }, h("h2", { id: "triggers-h" }, "Triggers"),
    h("ul", { "data-testid": "triggers" }, h("li", {}, "manual (the trigger form, the API, the CLI)"),
      triggers.filter((t) => t.type !== "manual").map((t) => h("li", {}, describe(t)))),
    webhook ? h("p", { "data-testid": "webhook" }, "Webhook ", h("code", {}, webhook.url), ": ",
      webhook.configured ? h("strong", {}, `secret set${webhook.updatedAt ? ` (${new Date(webhook.updatedAt).toLocaleString()})` : ""}`)
        : h("strong", {}, "no secret set (deliveries are refused)")) : null);
}

export async function render(ctx) {
  const id = decodeURIComponent(ctx.params[0]);
  const top = h("div", {});
  const table = runsTable(ctx, { pipelineId: id, showPipeline: false });
  ctx.main.append(top, h("h2", {}, "Runs"), table.el);

  let loadedVersion = null;
  async function load() {
    const [pipeline, spec, versions, webhook] = await Promise.all([
      api(`/pipelines/${id}`),
      api(`/pipelines/${id}/spec`, { query: { format: "yaml" } }),
      api(`/pipelines/${id}/versions`),
      api(`/pipelines/${id}/webhook`).catch(() => null),
    ]);
    if (!ctx.alive()) return;
    document.title = `${pipeline.name} · Pipelines`;
    loadedVersion = pipeline.definitionVersion;
    clear(top,
      h("p", {}, h("a", { href: "/" }, "Pipelines"), " / "),
      h("h1", {}, pipeline.name),
      pipeline.description ? h("p", {}, pipeline.description) : null,
      h("dl", { class: "kv" }, h("dt", {}, "Definition version"), h("dd", {}, `v${pipeline.definitionVersion}`),
        h("dt", {}, "Created by"), h("dd", {}, pipeline.createdBy), h("dt", {}, "Updated"), h("dd", {}, when(pipeline.updatedAt))),
      h("h2", {}, "Stages and jobs"), graphSection(spec.spec),
      auth.can("member") ? variablesForm(ctx, pipeline, spec.spec) : null,
      triggersSection(spec.spec, webhook),
      specEditor(pipeline, spec, () => reload()),
      versionsSection(pipeline, versions));
  }
  const reload = debounce(() => load().catch((e) => console.error(e)), 300);
  const stop = ctx.live.subscribe("pipelines", { pipelineId: id }, {
    onFrame: (event, data) => { if (event === "pipeline.deleted") clear(top, h("p", { class: "banner", role: "alert" }, "This pipeline was deleted.")); else if (data.definitionVersion !== loadedVersion) reload(); },
  });
  await Promise.all([load(), table.ready]);
  return () => { reload.cancel(); stop(); table.leave(); };
}
