// ANSI SGR colours (ESC [ ... m) to spans with classes; every other escape sequence is dropped.
import { h } from "./dom.js";

const SGR = /\x1b\[([0-9;]*)m/g;
const OTHER = /\x1b\[[0-9;?]*[A-Za-ln-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Za-z0-9]/g;

export function stripAnsi(text) {
  return text.replace(SGR, "").replace(OTHER, "");
}

/** The line as nodes: text runs in spans whose classes say bold (a-b), colour (a31) or background (b41). */
export function ansiNodes(text) {
  text = text.replace(OTHER, "");
  if (!text.includes("\x1b[")) return [text];
  const out = [];
  let style = { fg: null, bg: null, b: false, d: false, i: false, u: false };
  let last = 0;
  const emit = (chunk) => {
    if (!chunk) return;
    const cls = [style.fg && `a${style.fg}`, style.bg && `b${style.bg}`, style.b && "a-b", style.d && "a-d",
      style.i && "a-i", style.u && "a-u"].filter(Boolean).join(" ");
    out.push(cls ? h("span", { class: cls }, chunk) : chunk);
  };
  for (const m of text.matchAll(SGR)) {
    emit(text.slice(last, m.index));
    last = m.index + m[0].length;
    const codes = m[1] === "" ? [0] : m[1].split(";").map(Number);
    for (let i = 0; i < codes.length; i++) {
      const c = codes[i];
      if (c === 0) style = { fg: null, bg: null, b: false, d: false, i: false, u: false };
      else if (c === 1) style.b = true;
      else if (c === 2) style.d = true;
      else if (c === 3) style.i = true;
      else if (c === 4) style.u = true;
      else if (c === 22) style.b = style.d = false;
      else if (c === 23) style.i = false;
      else if (c === 24) style.u = false;
      else if ((c >= 30 && c <= 37) || (c >= 90 && c <= 97)) style.fg = c;
      else if (c === 39) style.fg = null;
      else if (c >= 40 && c <= 47) style.bg = c;
      else if (c >= 100 && c <= 107) style.bg = c - 60;
      else if (c === 49) style.bg = null;
      else if (c === 38 || c === 48) i += codes[i + 1] === 5 ? 2 : 4; // 256-colour / RGB: not kept
    }
  }
  emit(text.slice(last));
  return out;
}
