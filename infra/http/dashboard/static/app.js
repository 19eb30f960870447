// The dashboard's entry: sign-in, the header (who, organization, role, sign-out, live status),
// and the router that renders a page for each address without reloading.
import { api, ApiError } from "./api.js";
import { auth } from "./auth.js";
import { clear, h } from "./dom.js";
import { Live } from "./live.js";

const ROUTES = [
  [/^\/$/, () => import("./pages/pipelines.js")],
  [/^\/pipelines\/([^/]+)$/, () => import("./pages/pipeline.js")],
  [/^\/runs$/, () => import("./pages/runs.js")],
  [/^\/runs\/([^/]+)$/, () => import("./pages/run.js")],
  [/^\/deployments$/, () => import("./pages/deployments.js")],
];

const main = document.getElementById("main");
const liveEl = document.getElementById("live");
const whoEl = document.getElementById("who");
let live = null;
let leave = null;
let generation = 0;

function setLive(state, text) {
  liveEl.className = `live ${state === "live" ? "ok" : state === "lost" ? "lost" : ""}`;
  liveEl.textContent = text;
  liveEl.dataset.state = state;
}

function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", path);
  else history.pushState(null, "", path);
  route();
}
window.addEventListener("popstate", () => route());
document.addEventListener("click", (event) => {
  const a = event.target.closest("a[href]");
  if (!a || a.target || a.hasAttribute("download") || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith("/api/") || url.pathname.startsWith("/ui/")
      || url.pathname.startsWith("/schema")) return;
  event.preventDefault();
  if (url.pathname + url.search !== location.pathname + location.search) navigate(url.pathname + url.search);
});

auth.onSignOut(() => {
  if (live) live.close();
  live = null;
  route();
});

function header() {
  const me = auth.me;
  if (!me) {
    clear(whoEl);
    setLive("", "");
    return;
  }
  clear(whoEl,
    h("span", { "data-testid": "who" }, "Signed in as ", h("strong", {}, me.subject)),
    h("span", {}, "organization ", h("strong", { "data-testid": "org" }, me.organization || "(none)")),
    h("span", {}, "role ", h("strong", { "data-testid": "role" }, auth.role)),
    h("button", { type: "button", onclick: () => auth.signOut("You signed out.") }, "Sign out"));
}

function signInPage() {
  document.title = "Sign in · Pipelines";
  const input = h("textarea", { id: "token", name: "token", required: true, autocomplete: "off", spellcheck: "false" });
  const form = h("form", { class: "signin card", onsubmit: (event) => {
    event.preventDefault();
    auth.signIn(input.value);
    const next = new URL(location.href).searchParams.get("next");
    navigate(next && next.startsWith("/") ? next : location.pathname === "/signin" ? "/" : location.pathname, { replace: true });
  } },
    h("h1", {}, "Sign in"),
    auth.reason ? h("p", { class: "banner", role: "alert", "data-testid": "signin-message" }, auth.reason) : null,
    h("p", {}, "Paste an API token (a JWT). Developers can print one with ",
      h("code", {}, "pipelines token --sub alice --role member"), "."),
    h("label", { for: "token" }, "Token"), input,
    h("div", { class: "row" }, h("button", { class: "primary", type: "submit" }, "Sign in")));
  clear(main, form);
  input.focus();
}

async function route() {
  const mine = ++generation;
  if (leave) { try { leave(); } catch (e) { console.error(e); } leave = null; }
  for (const a of document.querySelectorAll("nav a")) {
    const path = new URL(a.href).pathname;
    const current = path === "/" ? location.pathname === "/" || location.pathname.startsWith("/pipelines")
      : location.pathname.startsWith(path);
    if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (!auth.token) {
    header();
    return signInPage();
  }
  if (!auth.me) {
    try {
      auth.me = await api("/info");
    } catch (err) {
      if (mine !== generation) return;
      if (err instanceof ApiError && err.status === 401) return; // auth.expired() re-routes
      clear(main, h("p", { class: "error", role: "alert" }, `The API cannot be reached: ${err.message}`));
      return;
    }
    if (mine !== generation) return;
  }
  header();
  if (!live) {
    live = new Live(auth.me.gatewayUrl, auth.token, {
      onState: setLive,
      onExpired: (reason) => auth.expired(reason === "token expired" ? "the token expired" : reason),
    });
    window.__live = live; // tests and people in the console can drop the connection on purpose
  }
  if (location.pathname === "/signin") return navigate("/", { replace: true });
  const found = ROUTES.map(([re, load]) => [location.pathname.match(re), load]).find(([m]) => m);
  if (!found) {
    clear(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "/" }, "Back to the pipelines")));
    return;
  }
  const [match, load] = found;
  const page = await load();
  if (mine !== generation) return;
  clear(main);
  const ctx = { main, params: match.slice(1), query: new URLSearchParams(location.search), live, navigate,
    alive: () => mine === generation };
  try {
    leave = (await page.render(ctx)) || null;
  } catch (err) {
    if (mine !== generation) return;
    if (err instanceof ApiError && err.status === 401) return;
    const message = err instanceof ApiError && err.status === 404 ? `Not found: ${err.message}` : `Error: ${err.message}`;
    clear(main, h("p", { class: "error", role: "alert" }, message));
    console.error(err);
  }
  if (mine === generation) {
    main.focus({ preventScroll: true });
    document.body.dataset.ready = String(mine); // tests wait for the page to have rendered
  }
}

auth.adoptFromAddress();
route();
