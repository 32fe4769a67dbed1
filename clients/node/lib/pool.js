// A pool of adapted clients, for applications that use node-redis's createClientPool.
//
// node-redis's RedisClientPool creates its clients from options inside private fields, so an
// adapter cannot be put under it. This pool has the same shape (execute(fn), every command as
// a method that runs on an idle client, sendCommand, connect, close, destroy; minimum, maximum,
// acquireTimeout) over clients made by withNotices(): each client replaces its own connection
// when told, so the pool never hands out a connection that is about to be closed.
"use strict";
const { EventEmitter } = require("node:events");
const { withNotices } = require("./adapter");

const POOL_DEFAULTS = { minimum: 1, maximum: 100, acquireTimeout: 3000 };
const OWN = new Set([
  ...Object.getOwnPropertyNames(EventEmitter.prototype),
  "connect", "execute", "sendCommand", "close", "destroy", "maxage",
  "idleClients", "clientsInUse", "totalClients", "tasksQueueLength", "isOpen",
]);

class NoticePool extends EventEmitter {
  constructor(template, poolOptions = {}, adapterOptions = {}) {
    super();
    this._template = template; // never connected: each pooled client is a duplicate of it
    this._options = { ...POOL_DEFAULTS, ...poolOptions };
    this._adapterOptions = adapterOptions;
    this._all = new Set();
    this._idle = [];
    this._tasks = [];
    this._creating = 0;
    this._open = false;
    const bound = new Map();
    this._proxy = new Proxy(this, {
      get: (target, prop) => {
        if (typeof prop === "string" && OWN.has(prop)) {
          const value = target[prop];
          if (typeof value !== "function") return value;
          if (!bound.has(prop)) bound.set(prop, value.bind(target));
          return bound.get(prop);
        }
        if (typeof target._template[prop] !== "function") return target._template[prop];
        if (!bound.has(prop)) {
          bound.set(prop, (...args) => target.execute((client) => client[prop](...args)));
        }
        return bound.get(prop);
      },
    });
  }

  get idleClients() { return this._idle.length; }
  get clientsInUse() { return this._all.size - this._idle.length; }
  get totalClients() { return this._all.size + this._creating; }
  get tasksQueueLength() { return this._tasks.length; }
  get isOpen() { return this._open; }

  /** The adapters' counters summed over the pool's clients. */
  get maxage() {
    const sum = { notices: 0, retiredAfterNotice: 0, retiredBeforeDeadline: 0, replacementFailures: 0 };
    let module = true;
    for (const client of this._all) {
      const stats = client.maxage;
      for (const name of Object.keys(sum)) sum[name] += stats[name];
      module &&= stats.module;
    }
    return { ...sum, module };
  }

  async _create() {
    this._creating++;
    try {
      const client = withNotices(this._template.duplicate(), this._adapterOptions);
      client.on("error", (error) => {
        if (this.listenerCount("error")) this.emit("error", error);
      });
      await client.connect();
      this._all.add(client);
      this._release(client);
    } finally {
      this._creating--;
    }
  }

  async connect() {
    if (this._open) return this._proxy;
    this._open = true;
    try {
      await Promise.all(Array.from({ length: this._options.minimum }, () => this._create()));
    } catch (error) {
      this.destroy();
      throw error;
    }
    return this._proxy;
  }

  execute(fn) {
    return new Promise((resolve, reject) => {
      const client = this._idle.pop();
      if (client) return this._run(client, fn, resolve, reject);
      const task = { fn, resolve, reject, timer: null };
      if (this._options.acquireTimeout > 0) {
        task.timer = setTimeout(() => {
          this._tasks.splice(this._tasks.indexOf(task), 1);
          reject(new Error("Timeout waiting for a client"));
        }, this._options.acquireTimeout);
      }
      this._tasks.push(task);
      if (this.totalClients < this._options.maximum) {
        this._create().catch((error) => {
          if (this.listenerCount("error")) this.emit("error", error);
        });
      }
    });
  }

  _run(client, fn, resolve, reject) {
    let result;
    try {
      result = fn(client);
    } catch (error) {
      reject(error);
      this._release(client);
      return;
    }
    Promise.resolve(result).then(resolve, reject).finally(() => this._release(client));
  }

  _release(client) {
    if (!this._all.has(client)) return;
    const task = this._tasks.shift();
    if (task) {
      clearTimeout(task.timer);
      this._run(client, task.fn, task.resolve, task.reject);
      return;
    }
    this._idle.push(client);
  }

  sendCommand(args, options) {
    return this.execute((client) => client.sendCommand(args, options));
  }

  async close() {
    this._open = false;
    const clients = [...this._all];
    this._all.clear();
    this._idle = [];
    await Promise.allSettled(clients.map((client) => client.close()));
  }

  destroy() {
    this._open = false;
    for (const client of this._all) client.destroy();
    this._all.clear();
    this._idle = [];
    for (const task of this._tasks.splice(0)) {
      clearTimeout(task.timer);
      task.reject(new Error("The pool was destroyed"));
    }
  }
}

/**
 * A pool of node-redis clients with the adapter: createPool(redis.createClient(options),
 * { minimum, maximum, acquireTimeout }). The template client is only duplicated, never
 * connected.
 */
function createPool(template, poolOptions, adapterOptions) {
  return new NoticePool(template, poolOptions, adapterOptions)._proxy;
}

module.exports = { createPool, NoticePool };
