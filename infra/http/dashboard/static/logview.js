// A log viewer that stays fast with tens of thousands of lines: only the lines in view are in the
// DOM (fixed line height, virtual scrolling). Follow mode, search with next/previous, the raw text
// for download, and a filter to one stage or step.
import { ansiNodes, stripAnsi } from "./ansi.js";
import { clear, h } from "./dom.js";

const LINE = 18; // px, as .log .ln in style.css
const OVERSCAN = 30;

export class LogView {
  constructor({ label = "Log" } = {}) {
    this.lines = []; // {text, plain, key}
    this.view = []; // indexes into lines (the filter)
    this.filter = null; // a unit key prefix, or null for every line
    this.follow = true;
    this.hits = [];
    this.hit = -1;
    this.query = "";
    this.scheduled = false;

    this.inner = h("div", { class: "lines" });
    this.spacer = h("div", {});
    this.box = h("div", { class: "log", tabindex: "0", role: "log", "aria-label": label, "data-testid": "log" },
      this.spacer, this.inner);
    this.box.addEventListener("scroll", () => this.onScroll());
    this.followButton = h("button", { type: "button", "aria-pressed": "true", onclick: () => this.setFollow(!this.follow) }, "Unfollow");
    this.search = h("input", { type: "search", "aria-label": "Search the log", placeholder: "Search the log",
      oninput: () => this.find(this.search.value), onkeydown: (e) => { if (e.key === "Enter") { e.preventDefault(); this.next(e.shiftKey ? -1 : 1); } } });
    this.count = h("span", { class: "muted", "aria-live": "polite", "data-testid": "log-matches" });
    this.download = h("button", { type: "button", onclick: () => this.saveRaw() }, "Download raw log");
    this.lineCount = h("span", { class: "muted", "data-testid": "log-count" }, "0 lines");
    this.el = h("div", { class: "logview" },
      h("div", { class: "row" }, this.followButton, this.search,
        h("button", { type: "button", onclick: () => this.next(-1) }, "Previous match"),
        h("button", { type: "button", onclick: () => this.next(1) }, "Next match"),
        this.count, h("span", { class: "grow" }), this.lineCount, this.download),
      this.box);
  }

  /** Adds lines: `key` is where they came from (stage id, or stage/job/step). */
  add(texts, key = "") {
    for (const text of texts) {
      const i = this.lines.push({ text, plain: null, key }) - 1;
      if (this.accepts(key)) {
        this.view.push(i);
        if (this.query && this.plain(i).toLowerCase().includes(this.query)) this.hits.push(this.view.length - 1);
      }
    }
    this.schedule();
  }

  accepts(key) {
    return this.filter === null || key === this.filter || key.startsWith(this.filter + "\u241f");
  }

  plain(i) {
    const line = this.lines[i];
    if (line.plain === null) line.plain = stripAnsi(line.text);
    return line.plain;
  }

  setFilter(key) {
    this.filter = key;
    this.view = [];
    this.lines.forEach((line, i) => { if (this.accepts(line.key)) this.view.push(i); });
    this.find(this.search.value, false);
    this.box.scrollTop = this.follow ? this.view.length * LINE : 0;
    this.schedule();
  }

  setFollow(on) {
    this.follow = on;
    this.followButton.textContent = on ? "Unfollow" : "Follow";
    this.followButton.setAttribute("aria-pressed", String(on));
    if (on) this.schedule();
  }

  onScroll() {
    const atEnd = this.box.scrollTop + this.box.clientHeight >= this.view.length * LINE - LINE;
    // Scrolling up by hand stops following; back at the end it starts again.
    if (this.programmatic) this.programmatic = false;
    else if (this.follow !== atEnd) this.setFollow(atEnd);
    this.render();
  }

  find(query, jump = true) {
    this.query = query.trim().toLowerCase();
    this.hits = [];
    if (this.query) this.view.forEach((li, vi) => { if (this.plain(li).toLowerCase().includes(this.query)) this.hits.push(vi); });
    this.hit = this.hits.length ? 0 : -1;
    if (jump && this.hit >= 0) this.reveal(this.hits[0]);
    this.schedule();
  }

  next(step) {
    if (!this.hits.length) return;
    this.hit = (this.hit + step + this.hits.length) % this.hits.length;
    this.reveal(this.hits[this.hit]);
    this.schedule();
  }

  reveal(vi) {
    this.setFollow(false);
    this.programmatic = true;
    this.box.scrollTop = Math.max(0, vi * LINE - this.box.clientHeight / 2);
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      if (this.follow) {
        const end = Math.max(0, this.view.length * LINE - this.box.clientHeight);
        if (Math.abs(this.box.scrollTop - end) > 1) {
          this.programmatic = true;
          this.spacer.style.height = `${this.view.length * LINE}px`;
          this.box.scrollTop = end;
        }
      }
      this.render();
    });
  }

  render() {
    const total = this.view.length;
    this.spacer.style.height = `${total * LINE}px`;
    const first = Math.max(0, Math.floor(this.box.scrollTop / LINE) - OVERSCAN);
    const last = Math.min(total, Math.ceil((this.box.scrollTop + (this.box.clientHeight || 480)) / LINE) + OVERSCAN);
    const hitSet = new Set(this.hits);
    const current = this.hit >= 0 ? this.hits[this.hit] : -1;
    const rows = [];
    for (let vi = first; vi < last; vi++) {
      const cls = vi === current ? "ln hit cur" : hitSet.has(vi) ? "ln hit" : "ln";
      rows.push(h("div", { class: cls }, h("span", { class: "no", "aria-hidden": "true" }, vi + 1), ...ansiNodes(this.lines[this.view[vi]].text)));
    }
    this.inner.style.top = `${first * LINE}px`;
    clear(this.inner, rows);
    this.lineCount.textContent = `${total} line${total === 1 ? "" : "s"}`;
    this.count.textContent = this.query ? (this.hits.length ? `${this.hit + 1} of ${this.hits.length} matches` : "no match") : "";
  }

  rawText() {
    return this.view.map((i) => this.lines[i].text + "\n").join("");
  }

  saveRaw() {
    const url = URL.createObjectURL(new Blob([this.rawText()], { type: "text/plain" }));
    const a = h("a", { href: url, download: this.fileName || "run.log" });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
}
