// Small DOM helpers shared by the pages: element building, statuses as text, times.

/** h("button", {class: "primary", onclick}, "Save") -> element. Attributes starting with "on" are listeners. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// The API's status names; `waiting_approval` reads better spelled out. A glyph beside the word,
// so that colour is never the only signal.
const LABELS = { waiting_approval: "waiting for approval" };
const GLYPHS = { succeeded: "✓", failed: "✗", cancelled: "⊘", running: "▶", queued: "…", waiting_approval: "?",
  paused: "‖", skipped: "↷", pending: "○" };

export function statusLabel(status) {
  return LABELS[status] || status;
}

export function badge(status, attrs = {}) {
  return h("span", { class: "status", "data-status": status, ...attrs },
    h("span", { "aria-hidden": "true" }, GLYPHS[status] || "•"), statusLabel(status));
}

export const STATUSES = ["queued", "running", "waiting_approval", "paused", "succeeded", "failed", "cancelled"];

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return h("time", { datetime: iso, title: d.toISOString() }, d.toLocaleString());
}

export function duration(ms) {
  if (ms === null || ms === undefined) return "";
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${Math.round(s - m * 60)} s`;
}

/** Runs `fn` at most once per `ms`, the last call winning (for refetches driven by live frames). */
export function debounce(fn, ms) {
  let timer = null;
  const run = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  run.cancel = () => clearTimeout(timer);
  return run;
}

export function shortId(id) {
  return id ? id.slice(0, 8) : "";
}

export function link(href, ...children) {
  return h("a", { href }, ...children);
}
