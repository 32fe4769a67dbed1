// redis-maxage adapters for node-redis and ioredis (see README.md and docs/notices.md).
//
//   const { withNotices, createPool } = require("redis-maxage");
//   const client = withNotices(redis.createClient({ url }));  // node-redis, before connect()
//   const pool = createPool(redis.createClient({ url }), { minimum: 8, maximum: 8 });
//   const io = withNotices(new Redis({ port, lazyConnect: true }));  // ioredis
"use strict";
const { withNotices, NoticeAdapter } = require("./lib/adapter");
const { createPool, NoticePool } = require("./lib/pool");
const { NOTICE_KEY_PREFIX, isNoticeKey } = require("./lib/notice");

module.exports = { withNotices, createPool, NoticeAdapter, NoticePool, NOTICE_KEY_PREFIX, isNoticeKey };
