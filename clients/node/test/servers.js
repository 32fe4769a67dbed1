// Real servers for the tests: Debian's redis-server (7.0) and valkey 9.1, on free loopback
// ports, no persistence, stopped at the end (also on failure, and killed if this process dies).
"use strict";
const { spawn, execFileSync } = require("node:child_process");
const fs = require("node:fs");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");

const ROOT = path.resolve(__dirname, "..", "..", "..");
const EXAMPLES_MODULES = path.join(ROOT, "examples", "node_modules");
// The clients come from examples/ (this package has them as peer dependencies only).
const redis = require(path.join(EXAMPLES_MODULES, "redis"));
const Redis = require(path.join(EXAMPLES_MODULES, "ioredis"));

function modulePath() {
  return process.env.MAXAGE_MODULE_PATH || path.join(ROOT, "target", "release", "libredis_maxage.so");
}

function serverBinary(flavor) {
  if (flavor === "redis") return process.env.MAXAGE_REDIS_SERVER || "redis-server";
  if (process.env.MAXAGE_VALKEY_SERVER) return process.env.MAXAGE_VALKEY_SERVER;
  return execFileSync("python3", [path.join(ROOT, "scripts", "maxage_tools", "servers.py"), "valkey"], {
    encoding: "utf8",
  }).trim();
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

const started = new Set();
process.on("exit", () => {
  for (const child of started) child.kill("SIGKILL");
});

async function startServer(flavor, { module = true, moduleArgs = [] } = {}) {
  const port = await freePort();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "maxage-node-test-"));
  const args = [
    "--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
    "--dir", dir, "--logfile", path.join(dir, "server.log"),
  ];
  if (module) {
    args.push("--loadmodule", modulePath(), "max-age-ms", "1000", "notice-lead-ms", "300", ...moduleArgs);
  }
  const child = spawn(serverBinary(flavor), args, { stdio: "ignore" });
  started.add(child);
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const server = {
    port,
    flavor,
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      if (!started.has(child)) return;
      started.delete(child);
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 3000);
      await exited;
      clearTimeout(timer);
      fs.rmSync(dir, { recursive: true, force: true });
    },
    log: () => fs.readFileSync(path.join(dir, "server.log"), "utf8"),
  };
  const deadline = Date.now() + 10000;
  for (;;) {
    if (child.exitCode !== null) {
      const log = fs.existsSync(path.join(dir, "server.log")) ? server.log() : "";
      throw new Error(`${flavor} server exited: ${log.slice(-1000)}`);
    }
    try {
      await new Promise((resolve, reject) => {
        const socket = net.connect(port, "127.0.0.1", () => { socket.end(); resolve(); });
        socket.once("error", reject);
      });
      break;
    } catch (error) {
      if (Date.now() > deadline) { await server.stop(); throw error; }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return server;
}

/** INFO maxage fields as numbers, on a connection of its own. */
async function maxageInfo(port) {
  const client = new Redis({ port, host: "127.0.0.1", lazyConnect: true, maxRetriesPerRequest: 0 });
  await client.connect();
  await client.call("CLIENT", "NO-EVICT", "on"); // exempt from the module by default
  const text = await client.info("maxage");
  client.disconnect();
  const fields = {};
  for (const line of text.split("\r\n")) {
    const [name, value] = line.split(":");
    if (name && name.startsWith("maxage_")) fields[name.slice(7)] = Number(value);
  }
  return fields;
}

module.exports = { redis, Redis, startServer, maxageInfo, ROOT };
