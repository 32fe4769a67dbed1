// node-redis and ioredis with the adapter (clients/node; in an application
// `npm install ./clients/node`, then require("redis-maxage")): a connection is replaced before
// the module retires it, so no request fails (docs/notices.md).
"use strict";
const path = require("node:path");
const { createClient } = require("redis");
const Redis = require("ioredis");
const { withNotices, createPool } = require(path.join(__dirname, "..", "clients", "node"));

const nodeRedisClient = (url) => withNotices(createClient({ url })); // RESP3: the notice push
const nodeRedisPool = (url, size) => createPool(createClient({ url }), { minimum: size, maximum: size });
const ioredisClient = (port) => // RESP2: replaced at deadline - notice-lead-ms
  withNotices(new Redis({ port, host: "127.0.0.1", lazyConnect: true, maxRetriesPerRequest: 0 }));

module.exports = { nodeRedisClient, nodeRedisPool, ioredisClient };

// node node_adapter.js <port> <seconds>: INCRs through the three, then prints
// "<failed> <ok> <executed> <connections replaced>".
if (require.main === module) {
  const [port, seconds] = process.argv.slice(2).map(Number);
  (async () => {
    const url = `redis://127.0.0.1:${port}`;
    const clients = [nodeRedisClient(url), nodeRedisPool(url, 2), ioredisClient(port)];
    for (const client of clients) {
      client.on("error", () => {});
      await client.connect();
    }
    let ok = 0;
    let failed = 0;
    const end = Date.now() + seconds * 1000;
    await Promise.all(clients.map(async (client) => {
      while (Date.now() < end) {
        try { await client.incr("adapter-example"); ok++; } catch { failed++; }
      }
    }));
    const executed = Number(await clients[0].get("adapter-example"));
    const replaced = clients.reduce((n, c) => n + c.maxage.retiredAfterNotice + c.maxage.retiredBeforeDeadline, 0);
    console.log(failed, ok, executed, replaced);
    await Promise.all(clients.map((c) => c.close()));
  })();
}
