// The spec's stages and jobs as an SVG graph: stages left to right in order, each stage's jobs in
// columns by the depth of their `needs`, an edge for every `needs` and one from stage to stage.
const NS = "http://www.w3.org/2000/svg";
const W = 160, H = 30, GAP_X = 50, GAP_Y = 14, PAD = 14, HEAD = 22;

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function stagesOf(spec) {
  if (Array.isArray(spec.stages)) return spec.stages;
  if (Array.isArray(spec.jobs)) return [{ id: "default", jobs: spec.jobs }];
  return [];
}

function label(text) {
  return text.length > 22 ? text.slice(0, 21) + "…" : text;
}

/** The graph of a spec ({stages} or {jobs}); `describe` also returns a text version for screen readers. */
export function specGraph(spec) {
  const stages = stagesOf(spec || {});
  const nodes = [], edges = [], boxes = [];
  const text = [];
  let x = PAD, height = 0;
  let previous = null;
  stages.forEach((stage, si) => {
    const stageName = stage.name || stage.id || `stage ${si + 1}`;
    const jobs = Array.isArray(stage.jobs) ? stage.jobs : null;
    const units = jobs
      ? jobs.map((job, ji) => ({ name: job.name || `job ${ji + 1}`, needs: Array.isArray(job.needs) ? job.needs : [],
        matrix: !!job.matrix, steps: Array.isArray(job.steps) ? job.steps.length : 0 }))
      : [{ name: stageName, needs: [], kind: stage.type || (stage.approval ? "approval" : "script") }];
    // Columns by depth of `needs` (a cycle or unknown need counts as depth 0: validation says why).
    const depth = new Map();
    const byName = new Map(units.map((u) => [u.name, u]));
    const depthOf = (u, seen = new Set()) => {
      if (depth.has(u.name)) return depth.get(u.name);
      if (seen.has(u.name)) return 0;
      seen.add(u.name);
      const d = Math.max(-1, ...u.needs.map((n) => (byName.has(n) ? depthOf(byName.get(n), seen) : -1))) + 1;
      depth.set(u.name, d);
      return d;
    };
    units.forEach((u) => depthOf(u));
    const columns = [];
    units.forEach((u) => { const d = depth.get(u.name); (columns[d] ||= []).push(u); });
    const stageX = x, top = PAD;
    const pos = new Map();
    columns.forEach((column, ci) => column.forEach((u, ri) => {
      pos.set(u.name, { x: stageX + PAD + ci * (W + GAP_X), y: top + HEAD + PAD + ri * (H + GAP_Y) });
    }));
    const width = PAD * 2 + columns.length * W + (columns.length - 1) * GAP_X;
    const rows = Math.max(...columns.map((c) => c.length));
    const boxH = HEAD + PAD * 2 + rows * H + (rows - 1) * GAP_Y;
    boxes.push({ x: stageX, y: top, w: width, h: boxH, name: stageName, jobs: !!jobs });
    height = Math.max(height, top + boxH + PAD);
    for (const u of units) {
      const p = pos.get(u.name);
      nodes.push({ ...p, name: u.name, detail: jobs ? `${u.steps} step${u.steps === 1 ? "" : "s"}${u.matrix ? ", matrix" : ""}` : u.kind });
      for (const need of u.needs) if (pos.has(need)) edges.push([pos.get(need), p]);
    }
    text.push(`Stage ${stageName}: ` + (jobs ? units.map((u) => u.name + (u.needs.length ? ` (needs ${u.needs.join(", ")})` : "")).join("; ") : units[0].kind));
    const box = boxes[boxes.length - 1];
    if (previous) edges.push([{ x: previous.x + previous.w - W, y: previous.y + previous.h / 2 - H / 2 }, { x: box.x, y: box.y + box.h / 2 - H / 2 }]);
    previous = box;
    x += width + GAP_X;
  });
  const el = svg("svg", { width: Math.max(x, 200), height: Math.max(height, 60), role: "img",
    "aria-label": `Pipeline graph: ${stages.length} stage${stages.length === 1 ? "" : "s"}` });
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#7d8799" }));
  defs.append(marker);
  el.append(defs);
  for (const b of boxes) {
    const g = svg("g", { class: "stage" });
    g.append(svg("rect", { x: b.x, y: b.y, width: b.w, height: b.h, rx: 6 }), svg("text", { x: b.x + 8, y: b.y + 16 }, label(b.name)));
    el.append(g);
  }
  for (const [a, b] of edges) {
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mid = (x1 + x2) / 2;
    el.append(svg("path", { class: "edge", d: `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2} ${y2}` }));
  }
  for (const n of nodes) {
    const g = svg("g", { class: "node" });
    g.append(svg("title", {}, `${n.name} (${n.detail})`), svg("rect", { x: n.x, y: n.y, width: W, height: H, rx: 4 }),
      svg("text", { x: n.x + 8, y: n.y + 19 }, label(n.name)));
    el.append(g);
  }
  return { svg: el, text };
}
