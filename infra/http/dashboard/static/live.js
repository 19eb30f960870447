// The gateway's WebSocket (GET /api/v1/info's gatewayUrl, token as ?token=): subscriptions that
// survive a lost connection. Each keeps the cursor of the last frame it received and, after a
// reconnect, subscribes again `fromCursor` it: the gateway replays what was missed, in order,
// with no gap and no duplicate, then goes on live.

const EVENT_CHANNEL = { "pipeline.run.updated": "runs", "pipeline.log": "logs", "pipeline.updated": "pipelines",
  "pipeline.deleted": "pipelines" };

function matches(sub, event, data) {
  if (EVENT_CHANNEL[event] !== sub.channel) return false;
  const { runId, pipelineId } = sub.params;
  if (runId) return (event === "pipeline.log" ? data.runId : data.id) === runId;
  if (pipelineId) return (sub.channel === "pipelines" ? data.id : data.pipelineId) === pipelineId;
  return true;
}

export class Live {
  /** onState(state, text): "connecting" | "live" | "lost"; onExpired(reason): the token ended. */
  constructor(url, token, { onState = () => {}, onExpired = () => {} } = {}) {
    this.url = `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
    this.onState = onState;
    this.onExpired = onExpired;
    this.subs = new Set();
    this.ws = null;
    this.closed = false;
    this.attempt = 0;
    this.everOpen = false;
    this.connect();
  }

  connect() {
    if (this.closed) return;
    this.onState(this.everOpen ? "lost" : "connecting", this.everOpen ? "Connection lost — reconnecting…" : "Connecting…");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      const resumed = this.everOpen;
      this.everOpen = true;
      this.attempt = 0;
      this.onState("live", resumed ? "Live (resumed)" : "Live");
      for (const sub of this.subs) this.send(sub, resumed);
    };
    ws.onmessage = (message) => this.receive(JSON.parse(message.data));
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.closed) return;
      if (event.code === 1008) {
        this.closed = true;
        this.onExpired(event.reason || "the gateway closed the session");
        return;
      }
      // Backoff: 0.25 s, 0.5 s, 1 s ... 5 s.
      const delay = Math.min(5000, 250 * 2 ** this.attempt++);
      this.onState("lost", "Connection lost — reconnecting…");
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  send(sub, resumed) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    const frame = { action: "subscribe", channel: sub.channel, params: sub.params };
    if (sub.cursor) frame.fromCursor = sub.cursor;
    else if (sub.fromPosition !== undefined) frame.fromPosition = sub.fromPosition;
    sub.awaiting = true;
    sub.resumed = resumed;
    this.ws.send(JSON.stringify(frame));
  }

  receive(frame) {
    const { event, data } = frame;
    if (event === "subscribed" || event === "error") {
      for (const sub of this.subs) {
        if (!sub.awaiting || sub.channel !== data.channel) continue;
        if (JSON.stringify(sub.params) !== JSON.stringify(data.params || {})) continue;
        sub.awaiting = false;
        if (event === "error") sub.onError(data.message);
        // Without a cursor there was nothing to resume from: the page reads the API again.
        else if (!sub.cursor && sub.fromPosition === undefined) sub.onLive(sub.resumed);
        else if (sub.resumed) sub.onLive(true);
      }
      return;
    }
    for (const sub of this.subs) {
      if (!matches(sub, event, data)) continue;
      if (frame.cursor) {
        if (sub.cursor && frame.cursor < sub.cursor) continue; // already seen (cursors only go up)
        sub.cursor = frame.cursor;
      }
      sub.onFrame(event, data, frame);
    }
  }

  /** Follow `channel` ("runs" | "logs" | "pipelines") for params ({runId} | {pipelineId} | {}).
   * fromPosition: 0 replays from the start. onLive(resumed): subscribed with nothing to replay. */
  subscribe(channel, params, { fromPosition, onFrame = () => {}, onLive = () => {}, onError = () => {} } = {}) {
    const sub = { channel, params, fromPosition, onFrame, onLive, onError, cursor: null, awaiting: false };
    this.subs.add(sub);
    this.send(sub, false);
    return () => {
      this.subs.delete(sub);
      if (this.ws && this.ws.readyState === WebSocket.OPEN) {
        this.ws.send(JSON.stringify({ action: "unsubscribe", channel, params }));
      }
    };
  }

  /** Drops the connection as a network fault would (tests and the "Reconnect" control use it). */
  drop() {
    if (this.ws) this.ws.close(4000, "dropped by the page");
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "page closed");
    this.ws = null;
  }
}
