// The node clients of scripts/client-impact under its GET/SET/INCR load.
//
//   node examples/impact_load.js --client node-redis|ioredis|ioredis-resend|node-redis+adapter|ioredis+adapter --port N
//       [--host H] [--tls-ca PEM] --seconds S --workers W --connections C --prefix P
//
// Every worker loops until S seconds have passed: GET or SET on a random key `{P}key:{n}`, or
// INCR on its own `{P}incr:{w}`, one third each. Every rejected promise is one failed request
// (then the worker pauses 1 ms, as an error path would). Prints one JSON object on stdout (the
// protocol of scripts/maxage_tools/client_impact.py).
//
//   node-redis      createClientPool, C connections (minimum = maximum = C), shared by W
//                   workers. node-redis has no request retry: a command waiting for its reply
//                   when the socket closes is rejected; one not yet written stays queued and is
//                   sent after the reconnect (it never reached the server). reconnectStrategy
//                   is the default.
//   ioredis         C clients (ioredis has no pool; one client is one multiplexed connection)
//                   shared by W workers, maxRetriesPerRequest 0: on a close, every command
//                   waiting for a reply is rejected (MaxRetriesPerRequestError), so a failed
//                   request is visible, and nothing is resent. Reconnect: the default
//                   retryStrategy.
//   ioredis-resend  the same with ioredis's defaults (maxRetriesPerRequest 20,
//                   autoResendUnfulfilledCommands true): the commands waiting for a reply when
//                   the connection closed are sent again on the next connection, so the
//                   application sees no failure; whether any of them had already run is what
//                   the INCR check shows.
//   node-redis+adapter  node-redis with this repository's adapter (clients/node, docs/notices.md):
//                   its pool (createPool: the same minimum = maximum = C and acquire timeout),
//                   RESP3; a connection told by the module (MAXAGE.NOTICE's push) is replaced
//                   first, then closed after its replies.
//   ioredis+adapter     ioredis (maxRetriesPerRequest 0) with the adapter: ioredis 5 speaks RESP2
//                   only, so each connection is replaced at its deadline minus notice-lead-ms,
//                   from MAXAGE.NOTICE's reply (re-asked every second).
"use strict";
const fs = require("node:fs");
const path = require("node:path");

// The adapters (npm install ./clients/node in an application; here from the repository).
const adapters = () => require(path.join(__dirname, "..", "clients", "node"));
const CLIENTS = ["node-redis", "ioredis", "ioredis-resend", "node-redis+adapter", "ioredis+adapter"];

const KEYSPACE = 10000;
const VALUE = "v".repeat(100);
const TIMEOUT_MS = 5000;
const PAUSE_AFTER_FAILURE_MS = 1;

function parseArgs(argv) {
  const args = {
    host: "127.0.0.1",
    seconds: 5,
    workers: 32,
    connections: 32,
    prefix: "impact:",
    tlsCa: null,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    switch (flag) {
      case "--client": args.client = value; break;
      case "--host": args.host = value; break;
      case "--port": args.port = Number(value); break;
      case "--tls-ca": args.tlsCa = value; break;
      case "--seconds": args.seconds = Number(value); break;
      case "--workers": args.workers = Number(value); break;
      case "--connections": args.connections = Number(value); break;
      case "--prefix": args.prefix = value; break;
      default: throw new Error(`unknown option ${flag}`);
    }
  }
  if (!CLIENTS.includes(args.client)) {
    throw new Error(`--client must be one of ${CLIENTS.join(", ")}`);
  }
  if (!(args.port > 0 && args.workers > 0 && args.connections > 0)) {
    throw new Error("--port, --workers and --connections must be positive");
  }
  return args;
}

function percentileMs(sorted, fraction) {
  if (sorted.length === 0) return 0;
  const rank = Math.min(sorted.length, Math.max(1, Math.ceil(sorted.length * fraction)));
  return Math.round(sorted[rank - 1] * 1000) / 1000;
}

// xorshift32, seeded per worker: reproducible key choices.
function rng(seed) {
  let x = (seed * 2654435761) >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x;
  };
}

async function nodeRedis(args, ca, adapter) {
  const { createClient, createClientPool } = require("redis");
  const version = require("redis/package.json").version;
  const socket = { host: args.host, port: args.port, connectTimeout: TIMEOUT_MS };
  if (ca) Object.assign(socket, { tls: true, ca: [ca] });
  const poolOptions = {
    minimum: args.connections, maximum: args.connections, acquireTimeout: TIMEOUT_MS,
  };
  const pool = adapter
    ? adapters().createPool(createClient({ socket }), poolOptions)
    : createClientPool({ socket }, poolOptions);
  pool.on("error", () => {}); // a retired connection reconnects by itself
  await pool.connect();
  return {
    library: adapter
      ? `node-redis ${version} (redis-maxage createPool, RESP3)`
      : `node-redis ${version} (createClientPool)`,
    settings: "no request retry in node-redis; reconnectStrategy default; connectTimeout 5 s" +
      (adapter ? "; adapter: replaced on the notice push" : ""),
    forWorker: () => pool,
    adapterStats: adapter ? () => pool.maxage : null,
    close: () => pool.close().catch(() => pool.destroy()),
  };
}

async function ioredis(args, ca, resend, adapter) {
  const Redis = require("ioredis");
  const version = require("ioredis/package.json").version;
  const options = {
    host: args.host,
    port: args.port,
    connectTimeout: TIMEOUT_MS,
    lazyConnect: true,
  };
  if (!resend) options.maxRetriesPerRequest = 0;
  if (ca) options.tls = { ca: [ca] };
  const clients = [];
  for (let i = 0; i < args.connections; i++) {
    const client = adapter ? adapters().withNotices(new Redis(options)) : new Redis(options);
    client.on("error", () => {});
    await client.connect();
    clients.push(client);
  }
  return {
    library: `ioredis ${version} (${args.connections} clients)`,
    settings: resend
      ? "defaults: maxRetriesPerRequest 20, autoResendUnfulfilledCommands true, retryStrategy default"
      : "maxRetriesPerRequest 0; autoResendUnfulfilledCommands and retryStrategy default" +
        (adapter ? "; adapter (RESP2): replaced at deadline - notice-lead-ms" : ""),
    forWorker: (i) => clients[i % clients.length],
    adapterStats: adapter
      ? () => {
        const sum = {};
        for (const client of clients) {
          for (const [name, value] of Object.entries(client.maxage)) {
            if (typeof value === "number") sum[name] = (sum[name] || 0) + value;
          }
        }
        return sum;
      }
      : null,
    close: async () => {
      for (const client of clients) client.disconnect();
    },
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const ca = args.tlsCa ? fs.readFileSync(args.tlsCa) : null;
  const adapter = args.client.endsWith("+adapter");
  const setup = args.client.startsWith("node-redis")
    ? await nodeRedis(args, ca, adapter)
    : await ioredis(args, ca, args.client === "ioredis-resend", adapter);
  const tallies = [];
  const started = process.hrtime.bigint();
  const deadline = Date.now() + args.seconds * 1000;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  async function work(index) {
    const client = setup.forWorker(index);
    const next = rng(index + 1);
    const incrKey = `${args.prefix}incr:${index}`;
    const tally = { ok: 0, failed: 0, incrOk: 0, incrFailed: 0, latencies: [], errors: new Map() };
    tallies[index] = tally;
    while (Date.now() < deadline) {
      const op = next() % 3;
      const key = `${args.prefix}key:${next() % KEYSPACE}`;
      const t0 = process.hrtime.bigint();
      try {
        if (op === 0) await client.get(key);
        else if (op === 1) await client.set(key, VALUE);
        else await client.incr(incrKey);
        tally.latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
        tally.ok++;
        if (op === 2) tally.incrOk++;
      } catch (error) {
        tally.latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
        tally.failed++;
        if (op === 2) tally.incrFailed++;
        const message = `${error && error.name}: ${error && error.message}`;
        tally.errors.set(message, (tally.errors.get(message) || 0) + 1);
        await sleep(PAUSE_AFTER_FAILURE_MS);
      }
    }
  }

  await Promise.all(Array.from({ length: args.workers }, (_, i) => work(i)));
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
  // What the adapter did (its count of RESP2 connections replaced without a notice is the
  // part of the retirements that the module's INFO cannot see).
  const adapterStats = setup.adapterStats ? setup.adapterStats() : null;
  await setup.close();

  const latencies = tallies.flatMap((t) => t.latencies).sort((a, b) => a - b);
  const errors = {};
  for (const tally of tallies) {
    for (const [message, count] of tally.errors) errors[message] = (errors[message] || 0) + count;
  }
  const sum = (f) => tallies.reduce((total, t) => total + f(t), 0);
  process.stdout.write(
    JSON.stringify({
      client: args.client,
      library: setup.library,
      settings: setup.settings,
      elapsed_s: Math.round(elapsed * 1000) / 1000,
      requests_ok: sum((t) => t.ok),
      requests_failed: sum((t) => t.failed),
      incr_ok: tallies.map((t) => t.incrOk),
      incr_failed: tallies.map((t) => t.incrFailed),
      latency_ms: {
        p50: percentileMs(latencies, 0.5),
        p99: percentileMs(latencies, 0.99),
        p999: percentileMs(latencies, 0.999),
        max: latencies.length ? Math.round(latencies[latencies.length - 1] * 1000) / 1000 : 0,
      },
      errors,
      adapter: adapterStats,
      retired_before_deadline: adapterStats ? adapterStats.retiredBeforeDeadline : 0,
    }) + "\n",
  );
  // Sockets of clients still reconnecting must not keep the process alive.
  process.exit(0);
}

main().catch((error) => {
  process.stderr.write(`impact_load.js: ${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
