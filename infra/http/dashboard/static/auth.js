// The browser session's token: from `?token=` once (then removed from the address bar) or pasted
// on the sign-in page; kept in sessionStorage (this tab's session only).
const KEY = "pipelines.token";
const listeners = new Set();

export const auth = {
  get token() { return sessionStorage.getItem(KEY) || ""; },
  reason: "",
  me: null, // GET /api/v1/info: {gatewayUrl, subject, organization, roles}

  /** Takes `?token=` out of the address (history.replaceState) and keeps it. */
  adoptFromAddress() {
    const url = new URL(location.href);
    const token = url.searchParams.get("token");
    if (!token) return;
    url.searchParams.delete("token");
    history.replaceState(history.state, "", url.pathname + url.search + url.hash);
    this.signIn(token);
  },
  signIn(token) {
    sessionStorage.setItem(KEY, token.trim());
    this.reason = "";
    this.me = null;
  },
  signOut(reason = "") {
    sessionStorage.removeItem(KEY);
    this.reason = reason;
    this.me = null;
    for (const fn of listeners) fn(reason);
  },
  /** The API or the gateway refused the token (expired, invalid): back to sign-in, saying why. */
  expired(message) {
    if (!this.token) return;
    this.signOut(`Your session ended: ${message}. Sign in again with a valid token.`);
  },
  onSignOut(fn) { listeners.add(fn); },
  can(role) {
    const rank = { viewer: 0, member: 1, admin: 2 };
    const roles = (this.me && this.me.roles) || [];
    const best = Math.max(-1, ...roles.map((r) => (r in rank ? rank[r] : -1)));
    return best >= rank[role];
  },
  get role() {
    return ["admin", "member", "viewer"].find((r) => ((this.me && this.me.roles) || []).includes(r)) || "none";
  },
};
