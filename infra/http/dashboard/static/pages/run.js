// One run: status, the stage -> job -> step tree, live logs per step, who did what and why, and
// the run's actions for the roles that may use them. Live from the gateway: the run's `runs`
// frames (status, tree) and its `logs` frames, replayed from the start then followed.
import { api, ApiError } from "../api.js";
import { auth } from "../auth.js";
import { badge, clear, debounce, duration, h, shortId, when } from "../dom.js";
import { LogView } from "../logview.js";

const SEP = "\u241f"; // a step's log key: stage, job and step joined by this (as the API keys them)
// Who may act, and when: the API's rules (admin; the statuses the run decider allows).
const LIVE = ["queued", "running", "waiting_approval", "paused"];
const ACTIONS = [
  ["approve", "Approve", ["waiting_approval"], "comment"],
  ["reject", "Reject", ["waiting_approval"], "reason"],
  ["cancel", "Cancel", LIVE, "reason"],
  ["stop", "Stop", LIVE, "reason"],
  ["pause", "Pause", ["running"], "reason"],
  ["resume", "Resume", ["paused"], "reason"],
];
const TERMINAL = ["succeeded", "failed", "cancelled"];

const WHAT = {
  run_triggered: (d) => [d.triggered_by, `triggered the run (${(d.trigger && d.trigger.type) || "manual"}, definition v${d.definition_version})`],
  approval_requested: (d) => [null, `approval requested at ${[d.stage_id, d.job, d.step].filter(Boolean).join(" / ")}${d.message ? `: “${d.message}”` : ""}`],
  run_approved: (d) => [d.approved_by, "approved", d.comment],
  run_rejected: (d) => [d.rejected_by, "rejected", d.reason],
  run_cancelled: (d) => [d.cancelled_by, "cancelled the run", d.reason],
  run_stopped: (d) => [d.stopped_by, "stopped the run", d.reason],
  run_paused: (d) => [d.paused_by, "paused the run", d.reason],
  run_resumed: (d) => [d.resumed_by, "resumed the run", d.reason],
  run_succeeded: () => [null, "the run succeeded"],
  run_failed: (d) => [null, "the run failed", d.reason],
};

function unitButton(state, key, text, status, extra) {
  return h("button", { type: "button", class: "unit", "data-key": key, "aria-pressed": String(state.filter === key),
    "aria-label": `Show the log of ${text}, ${status.replace("_", " ")}`, onclick: () => state.select(key) },
    text, " ", badge(status), extra);
}

function timing(unit) {
  const parts = [];
  if (unit.attempt && unit.attempt > 1) parts.push(`attempt ${unit.attempt}`);
  if (unit.durationMs !== null && unit.durationMs !== undefined) parts.push(duration(unit.durationMs));
  else if (unit.startedAt && !unit.finishedAt) parts.push("running");
  return parts.length ? h("span", { class: "dur" }, ` ${parts.join(", ")}`) : null;
}

function tree(state, run) {
  return h("ul", {},
    h("li", {}, h("button", { type: "button", class: "unit", "data-key": "", "aria-pressed": String(state.filter === null),
      onclick: () => state.select(null) }, "Whole log")),
    run.stageResults.map((s) => h("li", {},
      unitButton(state, s.stageId, `stage ${s.name}`, s.status, timing(s)),
      s.error ? h("div", { class: "error" }, s.error) : null,
      s.jobs ? h("ul", {}, s.jobs.map((j) => h("li", {},
        unitButton(state, `${s.stageId}${SEP}${j.name}`, `job ${j.name}`, j.status, timing(j)),
        j.error ? h("div", { class: "error" }, j.error) : null,
        h("ul", {}, j.steps.map((st) => h("li", {},
          unitButton(state, `${s.stageId}${SEP}${j.name}${SEP}${st.name}`, `step ${st.name}`, st.status, timing(st)),
          st.error ? h("div", { class: "error" }, st.error) : null)))))) : null)));
}

export async function render(ctx) {
  const runId = decodeURIComponent(ctx.params[0]);
  let run = await api(`/pipelines/runs/${runId}`);
  const pipeline = await api(`/pipelines/${run.pipelineId}`).catch(() => null);
  if (!ctx.alive()) return null;
  document.title = `Run ${shortId(run.id)} · Pipelines`;

  const logs = new LogView({ label: "Run log" });
  logs.fileName = `run-${run.id}.log`;
  const state = {
    filter: null,
    select(key) {
      this.filter = key;
      logs.setFilter(key);
      paintTree();
    },
  };
  const head = h("div", {});
  const treeEl = h("nav", { class: "tree", "aria-label": "Stages, jobs and steps" });
  const historyEl = h("ol", { "data-testid": "history" });
  const actionOut = h("div", { "aria-live": "polite", "data-testid": "action-result" });
  const reason = h("input", { id: "action-reason", autocomplete: "off", size: 40 });
  const buttons = new Map();
  const actionsEl = auth.can("admin") ? h("section", { class: "card", "aria-labelledby": "actions-h" },
    h("h2", { id: "actions-h" }, "Actions"),
    h("div", { class: "actions" }, h("label", { for: "action-reason" }, "Comment or reason (optional)"), reason,
      ACTIONS.map(([name, label, allowed, field]) => {
        const button = h("button", { type: "button", "data-action": name, onclick: async () => {
          button.disabled = true;
          clear(actionOut);
          try {
            const body = reason.value.trim() ? { [field]: reason.value.trim() } : {};
            const updated = await api(`/pipelines/${run.pipelineId}/runs/${run.id}/${name}`, { method: "POST", body });
            reason.value = "";
            clear(actionOut, h("p", { role: "status" }, `${label}: done; the run is ${updated.status.replace("_", " ")}.`));
            show(updated);
          } catch (err) {
            clear(actionOut, h("p", { class: "error", role: "alert" }, `${label} refused: ${err.message}`));
            paintActions();
          }
        } }, label);
        buttons.set(name, [button, allowed]);
        return button;
      })), actionOut) : null;

  function paintHead() {
    const trig = run.trigger || {};
    clear(head,
      h("p", {}, h("a", { href: "/" }, "Pipelines"), " / ",
        pipeline ? h("a", { href: `/pipelines/${pipeline.id}` }, pipeline.name) : shortId(run.pipelineId), " / "),
      h("h1", {}, `Run ${shortId(run.id)} `, badge(run.status, { "data-testid": "run-status", role: "status" })),
      run.statusReason ? h("p", { "data-testid": "status-reason" }, `${run.status.replace("_", " ")}${run.statusBy ? ` by ${run.statusBy}` : ""}: ${run.statusReason}`) : null,
      h("dl", { class: "kv" },
        h("dt", {}, "Run"), h("dd", {}, h("code", {}, run.id)),
        h("dt", {}, "Triggered by"), h("dd", {}, run.triggeredBy, ` (${trig.type || "manual"}${trig.branch ? `, ${trig.branch}` : ""}${trig.commit ? ` ${String(trig.commit).slice(0, 10)}` : ""})`),
        h("dt", {}, "Definition"), h("dd", {}, `v${run.definitionVersion}`),
        h("dt", {}, "Created"), h("dd", {}, when(run.createdAt)),
        h("dt", {}, "Started"), h("dd", {}, when(run.startedAt)),
        h("dt", {}, "Finished"), h("dd", {}, when(run.finishedAt)),
        h("dt", {}, "Duration"), h("dd", {}, duration(run.durationMs) || "—"),
        Object.keys(run.variables || {}).length ? [h("dt", {}, "Variables"), h("dd", {}, Object.entries(run.variables).map(([k, v]) => `${k}=${v}`).join(" "))] : null,
        run.secretNames && run.secretNames.length ? [h("dt", {}, "Secrets"), h("dd", {}, run.secretNames.join(", "))] : null));
  }

  function paintTree() {
    const focused = document.activeElement && treeEl.contains(document.activeElement) ? document.activeElement.dataset.key : undefined;
    clear(treeEl, tree(state, run));
    if (focused !== undefined) {
      const again = [...treeEl.querySelectorAll("button.unit")].find((b) => b.dataset.key === focused);
      if (again) again.focus();
    }
  }

  function paintActions() {
    for (const [button, allowed] of buttons.values()) {
      button.disabled = !allowed.includes(run.status);
      button.title = button.disabled ? `not while the run is ${run.status.replace("_", " ")}` : "";
    }
  }

  async function loadHistory() {
    const events = await api(`/pipelines/${run.pipelineId}/runs/${run.id}/events`);
    if (!ctx.alive()) return;
    clear(historyEl, events.filter((e) => WHAT[e.type]).map((e) => {
      const [who, what, why] = WHAT[e.type](e.data || {});
      return h("li", {}, when(e.recordedAt), " ", who ? h("strong", {}, who) : null, who ? " " : "", what,
        why ? [": ", h("q", {}, why)] : null);
    }));
  }
  const history = debounce(() => loadHistory().catch((e) => console.error(e)), 300);

  let shown = "";
  function show(next) {
    // Frames can arrive after a fresher REST answer: keep the later of the two.
    if (next.updatedAt && run.updatedAt && next.updatedAt < run.updatedAt) return;
    const before = `${run.status}|${(run.approvals || []).length}`;
    run = next;
    paintHead();
    paintTree();
    paintActions();
    const after = `${run.status}|${(run.approvals || []).length}`;
    if (after !== before || !shown) history();
    shown = after;
  }

  ctx.main.append(head, actionsEl || "",
    h("div", { class: "grid2" },
      h("section", { "aria-labelledby": "tree-h" }, h("h2", { id: "tree-h" }, "Stages, jobs and steps"), treeEl,
        h("h2", {}, "Who did what"), historyEl),
      h("section", { "aria-labelledby": "log-h" }, h("h2", { id: "log-h" }, "Log"), logs.el)));
  show(run);

  const refetch = debounce(async () => {
    try { show(await api(`/pipelines/runs/${runId}`)); } catch (e) { if (!(e instanceof ApiError)) console.error(e); }
  }, 100);
  const stops = [
    ctx.live.subscribe("runs", { runId }, {
      onFrame: (event, data) => show(data),
      onLive: () => refetch(), // subscribed live with no cursor: read what may have happened before
    }),
    ctx.live.subscribe("logs", { runId }, {
      fromPosition: 0,
      onFrame: (event, data) => logs.add([data.message], data.job ? `${data.stage}${SEP}${data.job}${SEP}${data.step}` : data.stage || ""),
    }),
  ];
  if (TERMINAL.includes(run.status)) history();
  return () => { refetch.cancel(); history.cancel(); stops.forEach((s) => s()); };
}
