// One client (node-redis or ioredis) whose connection is replaced before the module retires it.
//
// On every (re)connection the adapter opts in with MAXAGE.NOTICE (docs/notices.md). When the
// connection is told to leave (RESP3: the notice push; RESP2: its deadline minus the lead, from
// the opt-in reply) the adapter opens a replacement (same options, opted in too), sends every new
// command to it, and closes the old connection once the replies of the commands already sent on
// it have arrived (node-redis close(), ioredis QUIT). Nothing is resent: a command is written to
// exactly one connection, and the old one is closed only after its replies.
"use strict";
const { EventEmitter } = require("node:events");
const { isNoticeKey, parseNoticeReply, isUnknownCommand } = require("./notice");

const DEFAULTS = {
  // RESP2 (no push): re-ask MAXAGE.NOTICE this often, so that a moved deadline (CONFIG SET,
  // MAXAGE.KILL ... GRACEFUL) is seen within this time. 0: only at (re)connection.
  recheckMs: 1000,
};

const noop = () => {};

function later(ms, fn) {
  const timer = setTimeout(fn, Math.max(0, ms));
  timer.unref?.();
  return timer;
}

/** What differs between node-redis and ioredis. */
const nodeRedisDriver = {
  name: "node-redis",
  is: (client) => typeof client.sendCommand === "function" && "isOpen" in client,
  // node-redis gets pushes only on RESP3 with emitInvalidate (its 'invalidate' event).
  prepare(client) {
    const options = client.options || {};
    if (options.clientSideCache) {
      throw new Error(
        "redis-maxage: a node-redis client with clientSideCache keeps the invalidation pushes " +
          "to itself; use emitInvalidate for your own caching with the adapter",
      );
    }
    const appTracking = Boolean(options.emitInvalidate);
    if (options.RESP === 2 || (options.RESP === 3 && options.emitInvalidate)) {
      return { client, appTracking };
    }
    if (client.isOpen) {
      throw new Error("redis-maxage: pass the node-redis client to withNotices() before connect()");
    }
    // RESP3 and the 'invalidate' event (which also sends CLIENT TRACKING ON in the handshake;
    // the adapter switches it to OPTIN, so nothing the application reads is tracked).
    return { client: client.duplicate({ RESP: 3, emitInvalidate: true }), appTracking };
  },
  resp3: (client) => client.options?.RESP === 3,
  send: (client, args) => client.sendCommand(args),
  duplicate: (client) => client.duplicate(),
  connect: (client) => client.connect(),
  closeAfterReplies: (client) => client.close(), // waits for the replies, then closes the socket
  destroy: (client) => client.destroy(),
  // Connection state a replacement would not have.
  subscribed: (client) => client.isPubSubActive,
  watching: (client) => client.isWatching,
};

const ioredisDriver = {
  name: "ioredis",
  is: (client) => typeof client.call === "function" && "status" in client,
  prepare: (client) => ({ client, appTracking: false }),
  // ioredis 5 speaks RESP2 only (its parser, redis-parser, has no push type): no notice push.
  resp3: () => false,
  send: (client, args) => client.call(...args),
  duplicate: (client) => client.duplicate({ lazyConnect: true }),
  async connect(client) {
    if (client.status === "wait") return client.connect();
    if (client.status === "ready") return undefined;
    if (client.status === "end") throw new Error("redis-maxage: the ioredis client was closed");
    return new Promise((resolve, reject) => {
      const onReady = () => { client.off("end", onEnd); resolve(); };
      const onEnd = () => { client.off("ready", onReady); reject(new Error("connection ended")); };
      client.once("ready", onReady);
      client.once("end", onEnd);
    });
  },
  closeAfterReplies: (client) => client.quit(), // QUIT is written after the commands in flight
  destroy: (client) => client.disconnect(),
  subscribed: (client) => Boolean(client.condition && client.condition.subscriber),
  watching: () => false,
};

const EMITTER_METHODS = new Set(Object.getOwnPropertyNames(EventEmitter.prototype));
const OWN = new Set([
  ...EMITTER_METHODS,
  "connect", "close", "quit", "QUIT", "destroy", "disconnect", "maxage", "currentClient",
]);

class NoticeAdapter extends EventEmitter {
  constructor(client, options = {}) {
    super();
    this._driver = [nodeRedisDriver, ioredisDriver].find((driver) => driver.is(client));
    if (!this._driver) throw new Error("redis-maxage: not a node-redis or ioredis client");
    this._options = { ...DEFAULTS, ...options };
    const prepared = this._driver.prepare(client);
    this._appTracking = prepared.appTracking;
    this._states = new WeakMap();
    this._forwarded = new Set();
    this._closing = false;
    this._noModule = false;
    this._pending = new Set(); // replacements being opened
    this._stats = {
      notices: 0, // notice pushes received
      retiredAfterNotice: 0, // connections replaced after a notice push
      retiredBeforeDeadline: 0, // RESP2: replaced at deadline - lead without a push
      replacementFailures: 0, // a replacement could not be opened: the old one stayed
    };
    this._current = this._attach(prepared.client);
    const bound = new Map();
    this._proxy = new Proxy(this, {
      get: (target, prop) => {
        if (typeof prop === "string" && OWN.has(prop)) {
          const value = target[prop];
          if (typeof value !== "function") return value;
          if (!bound.has(prop)) bound.set(prop, value.bind(target));
          return bound.get(prop);
        }
        const client = target._current;
        const value = client[prop];
        return typeof value === "function" ? value.bind(client) : value;
      },
      has: (target, prop) => OWN.has(prop) || prop in target._current,
    });
    if (this._driver === ioredisDriver && client.status === "ready") this._optIn(this._current);
  }

  /** The counters of what the adapter did, and whether the server has the module. */
  get maxage() {
    return { ...this._stats, module: !this._noModule, driver: this._driver.name };
  }

  /** The connection's client object in use now (changes at every replacement). */
  get currentClient() {
    return this._current;
  }

  // -- events: the application's listeners hear the current connection ------------------------

  _ensureForwarded(event) {
    if (event === "error" || event === "invalidate" || this._forwarded.has(event)) return;
    this._forwarded.add(event);
    for (const client of [this._current, ...this._pending]) this._forward(client, event);
  }

  _forward(client, event) {
    client.on(event, (...args) => {
      if (client === this._current) EventEmitter.prototype.emit.call(this, event, ...args);
    });
  }

  on(event, listener) { this._ensureForwarded(event); super.on(event, listener); return this._proxy; }
  addListener(event, listener) { return this.on(event, listener); }
  once(event, listener) { this._ensureForwarded(event); super.once(event, listener); return this._proxy; }
  prependListener(event, listener) {
    this._ensureForwarded(event);
    super.prependListener(event, listener);
    return this._proxy;
  }
  prependOnceListener(event, listener) {
    this._ensureForwarded(event);
    super.prependOnceListener(event, listener);
    return this._proxy;
  }

  _attach(client) {
    let resolveFirst;
    const state = {
      timer: null,
      retiring: false,
      firstOptIn: new Promise((resolve) => { resolveFirst = resolve; }),
      resolveFirst: () => resolveFirst(),
    };
    this._states.set(client, state);
    client.on("ready", () => this._optIn(client));
    client.on("error", (error) => {
      if (client !== this._current || state.retiring) return; // a leaving or unborn connection
      if (this._driver === ioredisDriver && this.listenerCount("error") === 0) return;
      this.emit("error", error);
    });
    client.on("invalidate", (key) => {
      if (isNoticeKey(key)) this._onNotice(client);
      else this.emit("invalidate", key); // the application's own client-side caching
    });
    for (const event of this._forwarded) this._forward(client, event);
    return client;
  }

  // -- opting in -----------------------------------------------------------------------------

  async _optIn(client) {
    const state = this._states.get(client);
    clearTimeout(state.timer);
    if (this._noModule || state.retiring || this._closing) return state.resolveFirst();
    const driver = this._driver;
    const optin = driver.resp3(client) && !this._appTracking;
    const tracking = optin
      ? [driver.send(client, ["CLIENT", "TRACKING", "ON", "OPTIN"]),
        driver.send(client, ["CLIENT", "CACHING", "YES"])]
      : [];
    const asked = driver.send(client, ["MAXAGE.NOTICE"]);
    await Promise.allSettled(tracking);
    let reply;
    try {
      reply = parseNoticeReply(await asked);
    } catch (error) {
      if (isUnknownCommand(error)) {
        // No module: a plain client (tracking back off unless the application wanted it).
        this._noModule = true;
        if (optin) driver.send(client, ["CLIENT", "TRACKING", "OFF"]).catch(noop);
      }
      return state.resolveFirst();
    }
    if (reply.push) {
      if (!reply.keyTracked && reply.key) {
        // Redis 7.0: the module cannot track the key for us; read it ourselves.
        if (optin) driver.send(client, ["CLIENT", "CACHING", "YES"]).catch(noop);
        driver.send(client, ["MAXAGE.NOTICEKEY", reply.key]).catch(noop);
        // A notice due at once went out before the key was tracked here: act on the reply.
        if (reply.noticeInMs !== null && reply.noticeInMs <= 0) this._retire(client, "notice");
      }
    } else {
      this._plan(client, reply);
    }
    return state.resolveFirst();
  }

  // RESP2 (or tracking refused): retire by deadline - lead, re-asking every recheckMs. Without a
  // push the adapter chooses the moment, so it starts opening the replacement one lead earlier
  // still: under load (TLS handshakes on a busy event loop) opening one can take most of a
  // 200 ms lead, and the old connection must be closed before the module's deadline.
  _plan(client, reply) {
    const state = this._states.get(client);
    clearTimeout(state.timer);
    if (reply.noPushReason === "notices-off" || this._closing) return; // the operator's choice
    const recheck = this._options.recheckMs;
    const retireIn = reply.deadlineInMs === null ? Infinity : reply.deadlineInMs - 2 * reply.leadMs;
    if (recheck > 0 && retireIn > recheck) {
      state.timer = later(recheck, () => this._reask(client));
    } else if (retireIn !== Infinity) {
      state.timer = later(retireIn, () => this._retire(client, "deadline"));
    }
  }

  async _reask(client) {
    if (client !== this._current || this._closing) return;
    try {
      this._plan(client, parseNoticeReply(await this._driver.send(client, ["MAXAGE.NOTICE"])));
    } catch {
      // The connection went away: its next 'ready' opts in again.
    }
  }

  _onNotice(client) {
    this._stats.notices++;
    this._retire(client, "notice");
  }

  // -- replacing -------------------------------------------------------------------------------

  async _retire(old, why) {
    const state = this._states.get(old);
    if (!state || state.retiring || this._closing || old !== this._current) return;
    // Subscriptions do not move to a replacement: such a connection is left to the module's
    // close, after which the client reconnects and subscribes again by itself.
    if (this._driver.subscribed(old)) return;
    state.retiring = true;
    clearTimeout(state.timer);
    const driver = this._driver;
    // A WATCH belongs to its connection: let the transaction finish first.
    while (driver.watching(old) && !this._closing) await new Promise((r) => later(1, r));
    let next;
    try {
      next = this._attach(driver.duplicate(old));
      this._pending.add(next);
      // Connected (handshake done): its opt-in is written before any command moved to it, and
      // its reply is not waited for (one round trip less before the old connection can go).
      await driver.connect(next);
    } catch {
      this._stats.replacementFailures++;
      if (next) {
        this._states.get(next).retiring = true;
        try { driver.destroy(next); } catch { /* already gone */ }
      }
      this._pending.delete(next);
      state.retiring = false; // keep it: the module's close is the backstop, then it reconnects
      return;
    }
    this._pending.delete(next);
    if (this._closing) {
      this._states.get(next).retiring = true;
      driver.destroy(next);
      return;
    }
    this._current = next; // new commands go to the replacement from here on
    this._stats[why === "notice" ? "retiredAfterNotice" : "retiredBeforeDeadline"]++;
    Promise.resolve()
      .then(() => driver.closeAfterReplies(old))
      .catch(() => {
        try { driver.destroy(old); } catch { /* already gone */ }
      });
  }

  // -- lifecycle -------------------------------------------------------------------------------

  async connect() {
    const client = this._current;
    await this._driver.connect(client);
    await this._states.get(client).firstOptIn;
    return this._proxy;
  }

  _stop() {
    this._closing = true;
    const state = this._states.get(this._current);
    clearTimeout(state.timer);
    for (const next of this._pending) {
      this._states.get(next).retiring = true;
      try { this._driver.destroy(next); } catch { /* already gone */ }
    }
    return this._current;
  }

  close() { return this._driver.closeAfterReplies(this._stop()); } // ioredis: QUIT
  quit() { return this._stop().quit(); }
  QUIT() { return this.quit(); }
  destroy() { return this._stop().destroy(); }
  disconnect(...args) { return this._stop().disconnect(...args); }
}

/**
 * Wraps a node-redis client (before connect(); it is replaced by a RESP3 duplicate of itself
 * unless it is RESP3 with emitInvalidate already) or an ioredis client. Returns an object that
 * behaves like the client: commands go to the current connection.
 */
function withNotices(client, options) {
  return new NoticeAdapter(client, options)._proxy;
}

module.exports = { withNotices, NoticeAdapter };
