// The real socket.io-client, as a dashboard uses it: connects to the gateway's /events namespace,
// optionally subscribes, and prints what happens as JSON lines on stdout until stdin closes.
// Usage: node listen.js <gateway http url> '<options JSON>'
//   options: {auth?: {token}, query?: {token}, transports?: [...], subscribe?: {runId}|{pipelineId}}
const { io } = require("socket.io-client");

const [url, raw] = process.argv.slice(2);
const opts = JSON.parse(raw || "{}");
const out = (o) => process.stdout.write(JSON.stringify(o) + "\n");

const socket = io(url + "/events", {
  reconnection: false,
  timeout: 10000,
  transports: opts.transports || ["polling", "websocket"],
  ...(opts.auth ? { auth: opts.auth } : {}),
  ...(opts.query ? { query: opts.query } : {}),
});

socket.on("connect", () => {
  out({ type: "connect", transport: socket.io.engine.transport.name });
  socket.io.engine.on("upgrade", (t) => out({ type: "upgrade", transport: t.name }));
  if (opts.subscribe) {
    socket.emit("subscribe", opts.subscribe, (ack) => out({ type: "ack", ack }));
  }
});
socket.on("connect_error", (err) => {
  out({ type: "connect_error", message: err.message });
  process.exit(0);
});
socket.on("disconnect", (reason) => {
  out({ type: "disconnect", reason });
  process.exit(0);
});
for (const name of ["pipeline.run.updated", "pipeline.log", "session.expired"]) {
  socket.on(name, (data, meta) => out({ type: "event", event: name, data, meta }));
}
process.stdin.on("end", () => {
  socket.close();
  process.exit(0);
});
process.stdin.resume();
