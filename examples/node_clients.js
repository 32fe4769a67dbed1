// node-redis and ioredis clients whose connections live at most MAX_AGE_MS: on every
// (re)connection the client asks the server to retire that connection at that age.
"use strict";
const { createClient } = require("redis");
const Redis = require("ioredis");

const MAX_AGE_MS = 300000;

function nodeRedisClient(url, maxAgeMs = MAX_AGE_MS) {
  const client = createClient({ url });
  // "ready" fires after every (re)connect, before queued commands are sent.
  client.on("ready", () => client.sendCommand(["MAXAGE.SELF", String(maxAgeMs)]));
  client.on("error", () => {}); // a retired connection reconnects by itself
  return client;
}

function ioredisClient(port, maxAgeMs = MAX_AGE_MS) {
  const client = new Redis({ port, host: "127.0.0.1", maxRetriesPerRequest: 0 });
  client.on("ready", () => client.call("MAXAGE.SELF", maxAgeMs));
  client.on("error", () => {});
  return client;
}

module.exports = { nodeRedisClient, ioredisClient };

// node node_clients.js <port> <max-age-ms> <seconds>: both clients run INCRs, then print
// "<node-redis ready events> <ioredis ready events> <failed> <ok> <executed>".
if (require.main === module) {
  const [port, maxAgeMs, seconds] = process.argv.slice(2).map(Number);
  (async () => {
    let readyA = 0;
    let readyB = 0;
    const a = nodeRedisClient(`redis://127.0.0.1:${port}`, maxAgeMs);
    a.on("ready", () => readyA++);
    const b = ioredisClient(port, maxAgeMs);
    b.on("ready", () => readyB++);
    await a.connect();
    let ok = 0;
    let failed = 0;
    const end = Date.now() + seconds * 1000;
    while (Date.now() < end) {
      for (const [client, key] of [[a, "node-redis"], [b, "ioredis"]]) {
        try {
          await (client === a ? a.incr(key) : b.incr(key));
          ok++;
        } catch (e) {
          failed++;
          await new Promise((r) => setTimeout(r, 5));
        }
      }
    }
    const executed = Number(await a.get("node-redis")) + Number(await a.get("ioredis"));
    console.log(readyA, readyB, failed, ok, executed);
    await a.quit().catch(() => {});
    b.disconnect();
  })();
}
