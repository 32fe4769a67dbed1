// The module's side of the protocol (docs/notices.md): the notice key and MAXAGE.NOTICE's reply.
"use strict";

const NOTICE_KEY_PREFIX = "__maxage__:notice:";

/** Whether an invalidated key (string or Buffer) is a notice rather than the application's. */
function isNoticeKey(key) {
  if (key === null || key === undefined) return false;
  const text = Buffer.isBuffer(key) ? key.toString("latin1", 0, NOTICE_KEY_PREFIX.length) : String(key);
  return text.startsWith(NOTICE_KEY_PREFIX);
}

function text(value) {
  return Buffer.isBuffer(value) ? value.toString() : value;
}

/**
 * MAXAGE.NOTICE's reply as { deadlineInMs, noticeInMs, leadMs, push, keyTracked, key,
 * noPushReason }: a RESP3 map (node-redis: an object or a Map) or a RESP2 flat array.
 */
function parseNoticeReply(reply) {
  let entries;
  if (Array.isArray(reply)) {
    entries = [];
    for (let i = 0; i + 1 < reply.length; i += 2) entries.push([reply[i], reply[i + 1]]);
  } else if (reply instanceof Map) {
    entries = [...reply.entries()];
  } else if (reply && typeof reply === "object") {
    entries = Object.entries(reply);
  } else {
    throw new Error(`unexpected MAXAGE.NOTICE reply: ${reply}`);
  }
  const fields = {};
  for (const [name, value] of entries) fields[text(name)] = text(value);
  const number = (value) => (value === null || value === undefined ? null : Number(value));
  return {
    deadlineInMs: number(fields["deadline-in-ms"]),
    noticeInMs: number(fields["notice-in-ms"]),
    leadMs: number(fields["notice-lead-ms"]) ?? 0,
    push: Number(fields.push) === 1,
    keyTracked: Number(fields["key-tracked"]) === 1,
    key: fields.key ?? null,
    noPushReason: fields["no-push-reason"] ?? null,
  };
}

/** A server without the module (or one that does not know MAXAGE.NOTICE yet). */
function isUnknownCommand(error) {
  return /unknown command/i.test(String(error && error.message));
}

module.exports = { NOTICE_KEY_PREFIX, isNoticeKey, parseNoticeReply, isUnknownCommand };
