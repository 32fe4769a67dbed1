// The adapters against real servers: Redis 7.0 (the client reads the notice key itself) and
// Valkey 9.1 (the module tracks it), module with max-age-ms 1000 and notice-lead-ms 300, and a
// server without the module. Retries are off (ioredis maxRetriesPerRequest 0; node-redis has
// none), so a failed request would show.
"use strict";
const { test, describe, before, after } = require("node:test");
const assert = require("node:assert/strict");
const { redis, Redis, startServer, maxageInfo } = require("./servers");
const { withNotices, createPool } = require("..");

const LOAD_MS = 3500; // a connection lives about 1 s: several retirements each

async function load(clients, key, ms = LOAD_MS) {
  let ok = 0;
  const errors = [];
  const end = Date.now() + ms;
  await Promise.all(
    clients.map(async (client, i) => {
      while (Date.now() < end) {
        try {
          await client.incr(`${key}:${i}`);
          ok++;
        } catch (error) {
          errors.push(error.message);
          await new Promise((r) => setTimeout(r, 1));
        }
      }
    }),
  );
  return { ok, errors };
}

async function counted(client, key, n) {
  let total = 0;
  for (let i = 0; i < n; i++) total += Number((await client.get(`${key}:${i}`)) || 0);
  return total;
}

for (const flavor of ["redis", "valkey"]) {
  describe(`${flavor} with the module`, () => {
    let server;
    before(async () => { server = await startServer(flavor); });
    after(async () => { await server?.stop(); });

    test("node-redis client: replaced on every notice, no failed request, none run twice", async () => {
      const before = await maxageInfo(server.port);
      const client = withNotices(redis.createClient({ url: server.url }));
      client.on("error", () => {});
      await client.connect();
      const { ok, errors } = await load([client, client, client, client], "nr");
      assert.deepEqual(errors, []);
      assert.equal(await counted(client, "nr", 4), ok); // every INCR ran exactly once
      const stats = client.maxage;
      assert.ok(stats.retiredAfterNotice >= 2, JSON.stringify(stats));
      await client.close();
      await new Promise((r) => setTimeout(r, 50));
      const after = await maxageInfo(server.port);
      assert.ok(after.noticed_left_themselves - before.noticed_left_themselves >= 2, JSON.stringify(after));
      assert.equal(after.noticed_closed_by_module - before.noticed_closed_by_module, 0);
    });

    test("node-redis pool: no failed request across retirements", async () => {
      const before = await maxageInfo(server.port);
      const pool = createPool(redis.createClient({ url: server.url }), { minimum: 4, maximum: 4 });
      await pool.connect();
      const { ok, errors } = await load(Array(8).fill(pool), "pool");
      assert.deepEqual(errors, []);
      assert.equal(await counted(pool, "pool", 8), ok);
      assert.ok(pool.maxage.retiredAfterNotice >= 8, JSON.stringify(pool.maxage));
      await pool.close();
      const after = await maxageInfo(server.port);
      assert.ok(after.noticed_left_themselves - before.noticed_left_themselves >= 8);
      assert.equal(after.noticed_closed_by_module - before.noticed_closed_by_module, 0);
    });

    test("ioredis (RESP2): retired at deadline - lead, no failed request", async () => {
      const before = await maxageInfo(server.port);
      const client = withNotices(
        new Redis({ port: server.port, host: "127.0.0.1", lazyConnect: true, maxRetriesPerRequest: 0 }),
      );
      client.on("error", () => {});
      await client.connect();
      const { ok, errors } = await load([client, client, client, client], "io");
      assert.deepEqual(errors, []);
      assert.equal(await counted(client, "io", 4), ok);
      assert.ok(client.maxage.retiredBeforeDeadline >= 2, JSON.stringify(client.maxage));
      await client.quit();
      const after = await maxageInfo(server.port);
      // Left before their deadline: the module closed none of them.
      assert.equal(after.evicted_connections - before.evicted_connections, 0);
    });

    test("other invalidations reach the application; the notice does not", async () => {
      const client = withNotices(redis.createClient({ url: server.url, RESP: 3, emitInvalidate: true }));
      client.on("error", () => {});
      const seen = [];
      client.on("invalidate", (key) => seen.push(key === null ? null : String(key)));
      await client.connect();
      const writer = withNotices(redis.createClient({ url: server.url }));
      writer.on("error", () => {});
      await writer.connect();
      await client.get("app:cached"); // default tracking: the application's own read is tracked
      await writer.set("app:cached", "1");
      await new Promise((r) => setTimeout(r, 1500)); // past one notice and replacement
      await client.get("app:cached2");
      await writer.set("app:cached2", "1");
      await new Promise((r) => setTimeout(r, 100));
      assert.ok(client.maxage.notices >= 1, JSON.stringify(client.maxage));
      assert.deepEqual(seen, ["app:cached", "app:cached2"]);
      await writer.close();
      await client.close();
    });
  });
}

describe("a server without the module", () => {
  let server;
  before(async () => { server = await startServer("redis", { module: false }); });
  after(async () => { await server?.stop(); });

  test("node-redis and ioredis work as plain clients", async () => {
    const client = withNotices(redis.createClient({ url: server.url }));
    client.on("error", () => {});
    await client.connect();
    const io = withNotices(new Redis({ port: server.port, host: "127.0.0.1", lazyConnect: true }));
    io.on("error", () => {});
    await io.connect();
    assert.equal(await client.set("k", "v"), "OK");
    assert.equal(await io.get("k"), "v");
    assert.equal(client.maxage.module, false);
    assert.equal(io.maxage.module, false);
    const tracking = await client.sendCommand(["CLIENT", "TRACKINGINFO"]);
    assert.deepEqual(tracking.flags, ["off"]);
    await client.close();
    await io.quit();
  });
});
