//! redis-maxage notices for the `redis` crate (docs/notices.md in the redis-maxage repository).
//!
//! [`ConnectionManager`] is used like `redis::aio::ConnectionManager`: one multiplexed
//! connection shared by clones, reconnecting by itself, implementing
//! [`redis::aio::ConnectionLike`] (so every `AsyncCommands` method works). In addition, on a
//! RESP3 client (`?protocol=resp3` in the URL) each connection it opens opts in to the module's
//! notice (`CLIENT TRACKING ON OPTIN`, `CLIENT CACHING YES`, `MAXAGE.NOTICE`; on Redis 7.0 also
//! `CLIENT CACHING YES` + `MAXAGE.NOTICEKEY <key>`). When the notice comes (an `invalidate` push
//! of the connection's `__maxage__:notice:` key, `notice-lead-ms` before its deadline), the
//! manager opens the replacement connection, opts it in, and swaps it in for new commands; the
//! old connection finishes the requests already sent on it and is closed when the last of them
//! has its reply (when the last clone of it is dropped). No request fails and none is sent
//! twice: nothing is ever resent.
//!
//! A server without the module (or RESP2) gives a plain connection manager. Other pushes (the
//! application's own invalidations, Pub/Sub) go to the application's push sender, if it set one
//! with [`ConnectionManagerConfig::set_push_sender`].
//!
//! ```no_run
//! # async fn demo() -> redis::RedisResult<()> {
//! use redis::AsyncCommands;
//! use redis_maxage_client::{ConnectionManager, ConnectionManagerConfig};
//!
//! let client = redis::Client::open("redis://127.0.0.1:6380/?protocol=resp3")?;
//! let mut con = ConnectionManager::new_with_config(client, ConnectionManagerConfig::new()).await?;
//! let _: () = con.set("key", "value").await?;
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use redis::aio::{AsyncPushSender, ConnectionLike, MultiplexedConnection, SendError};
use redis::{
    AsyncConnectionConfig, Client, Cmd, Pipeline, PushInfo, PushKind, RedisFuture, RedisResult,
    Value,
};

/// Assumed until an opt-in's reply says (the module's default).
const DEFAULT_NOTICE_LEAD_MS: u64 = 200;

/// Every notice key starts with this (docs/notices.md).
pub const NOTICE_KEY_PREFIX: &[u8] = b"__maxage__:notice:";

/// The settings of a [`ConnectionManager`]: the subset of `redis::aio::ConnectionManagerConfig`
/// that it uses, with the same names and defaults.
#[derive(Clone)]
pub struct ConnectionManagerConfig {
    exponent_base: f32,
    min_delay: Duration,
    max_delay: Option<Duration>,
    number_of_retries: usize,
    response_timeout: Option<Duration>,
    connection_timeout: Option<Duration>,
    push_sender: Option<Arc<dyn AsyncPushSender>>,
}

impl Default for ConnectionManagerConfig {
    fn default() -> Self {
        Self {
            exponent_base: 2.0,
            min_delay: Duration::from_millis(100),
            max_delay: None,
            number_of_retries: 6,
            response_timeout: Some(Duration::from_millis(500)),
            connection_timeout: Some(Duration::from_secs(1)),
            push_sender: None,
        }
    }
}

impl std::fmt::Debug for ConnectionManagerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionManagerConfig")
            .field("exponent_base", &self.exponent_base)
            .field("min_delay", &self.min_delay)
            .field("max_delay", &self.max_delay)
            .field("number_of_retries", &self.number_of_retries)
            .field("response_timeout", &self.response_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("push_sender", &self.push_sender.is_some())
            .finish()
    }
}

impl ConnectionManagerConfig {
    /// The defaults of `redis::aio::ConnectionManagerConfig`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Base of the exponential delay between connection attempts.
    pub fn set_exponent_base(mut self, base: f32) -> Self {
        self.exponent_base = base;
        self
    }

    /// Smallest delay between connection attempts.
    pub fn set_min_delay(mut self, min_delay: Duration) -> Self {
        self.min_delay = min_delay;
        self
    }

    /// Largest delay between connection attempts.
    pub fn set_max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = Some(max_delay);
        self
    }

    /// Connection attempts after the first before a connect gives up (requests are never
    /// retried, here or in the redis crate).
    pub fn set_number_of_retries(mut self, amount: usize) -> Self {
        self.number_of_retries = amount;
        self
    }

    /// A request without its reply after this long fails.
    pub fn set_response_timeout(mut self, duration: Option<Duration>) -> Self {
        self.response_timeout = duration;
        self
    }

    /// A connection attempt that takes longer fails.
    pub fn set_connection_timeout(mut self, duration: Option<Duration>) -> Self {
        self.connection_timeout = duration;
        self
    }

    /// Where pushes go that are not this adapter's notices (RESP3 only), as with
    /// `redis::aio::ConnectionManagerConfig::set_push_sender`; `Disconnection` is passed on for
    /// the connection in use only (not for one the adapter retired).
    pub fn set_push_sender(mut self, sender: impl AsyncPushSender) -> Self {
        self.push_sender = Some(Arc::new(sender));
        self
    }
}

/// Counters of one [`ConnectionManager`] (shared by its clones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections opened (the first, replacements and reconnections).
    pub connections: u64,
    /// Of those, connections that opted in to a notice.
    pub opted_in: u64,
    /// Notices received.
    pub notices: u64,
    /// Connections swapped in after a notice (each retires one connection without a failure).
    pub replacements: u64,
    /// Reconnections after a connection was lost or could not be made.
    pub reconnects: u64,
    /// Replacements swapped in before they were ready (not ready a quarter of the notice lead
    /// after the notice: new commands waited for them).
    pub swapped_before_ready: u64,
    /// The longest time from a notice to its replacement being ready, in microseconds.
    pub longest_replacement_us: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    opted_in: AtomicU64,
    notices: AtomicU64,
    replacements: AtomicU64,
    reconnects: AtomicU64,
    swapped_before_ready: AtomicU64,
    longest_replacement_us: AtomicU64,
}

type SharedConnection = Shared<BoxFuture<'static, RedisResult<MultiplexedConnection>>>;

/// The connection new commands go to.
struct Slot {
    /// Which connection it is (every connection attempt has its own id).
    id: u64,
    connection: SharedConnection,
    /// A replacement is being opened for it.
    replacing: bool,
    /// Connections told before they were swapped in (the notice can come at once when the
    /// deadline is already close); acted on when they are swapped in.
    told_early: Vec<u64>,
}

struct Inner {
    client: Client,
    config: ConnectionManagerConfig,
    resp3: bool,
    runtime: tokio::runtime::Handle,
    slot: Mutex<Slot>,
    next_id: AtomicU64,
    counters: Counters,
    /// The server's `notice-lead-ms`, from the last opt-in's reply.
    notice_lead_ms: AtomicU64,
}

/// A `redis::aio::ConnectionManager` that takes redis-maxage's notices (see the crate docs).
/// Clones share the connection.
#[derive(Clone)]
pub struct ConnectionManager(Arc<Inner>);

impl std::fmt::Debug for ConnectionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionManager")
            .field("client", &self.0.client)
            .field("config", &self.0.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ConnectionManager {
    /// Connects with the default settings.
    pub async fn new(client: Client) -> RedisResult<Self> {
        Self::new_with_config(client, ConnectionManagerConfig::new()).await
    }

    /// Connects (opting in to notices when the client speaks RESP3 and the server has the
    /// module) and returns the manager.
    pub async fn new_with_config(
        client: Client,
        config: ConnectionManagerConfig,
    ) -> RedisResult<Self> {
        let resp3 = client
            .get_connection_info()
            .redis_settings()
            .protocol()
            .supports_resp3();
        if config.push_sender.is_some() && !resp3 {
            return Err((
                redis::ErrorKind::InvalidClientConfig,
                "Can only pass push sender to a connection using RESP3",
            )
                .into());
        }
        let runtime = tokio::runtime::Handle::current();
        let manager = Self(Arc::new_cyclic(|weak: &Weak<Inner>| {
            let first = connect(weak.clone(), 0).boxed().shared();
            Inner {
                client,
                config,
                resp3,
                runtime,
                slot: Mutex::new(Slot {
                    id: 0,
                    connection: first,
                    replacing: false,
                    told_early: Vec::new(),
                }),
                next_id: AtomicU64::new(1),
                counters: Counters::default(),
                notice_lead_ms: AtomicU64::new(DEFAULT_NOTICE_LEAD_MS),
            }
        }));
        let first = manager.0.lock().connection.clone();
        first.await?;
        manager.0.act_on_early_notice(0);
        Ok(manager)
    }

    /// Sends a packed command and returns its reply.
    pub async fn send_packed_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        let (id, mut connection) = self.0.current().await?;
        let result = connection.send_packed_command(cmd).await;
        self.0.after_request(id, &result);
        result
    }

    /// Sends a packed pipeline and returns `count` replies from `offset`.
    pub async fn send_packed_commands(
        &mut self,
        cmd: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (id, mut connection) = self.0.current().await?;
        let result = connection.send_packed_commands(cmd, offset, count).await;
        self.0.after_request(id, &result);
        result
    }

    /// The manager's counters.
    pub fn stats(&self) -> Stats {
        let c = &self.0.counters;
        Stats {
            connections: c.connections.load(Ordering::Relaxed),
            opted_in: c.opted_in.load(Ordering::Relaxed),
            notices: c.notices.load(Ordering::Relaxed),
            replacements: c.replacements.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            swapped_before_ready: c.swapped_before_ready.load(Ordering::Relaxed),
            longest_replacement_us: c.longest_replacement_us.load(Ordering::Relaxed),
        }
    }
}

impl ConnectionLike for ConnectionManager {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        (async move { self.send_packed_command(cmd).await }).boxed()
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        (async move { self.send_packed_commands(cmd, offset, count).await }).boxed()
    }

    fn get_db(&self) -> i64 {
        self.0.client.get_connection_info().redis_settings().db()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // The slot's data stays consistent whatever panicked while holding the lock.
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The connection for a new command (waiting for it while it is being made).
    async fn current(self: &Arc<Self>) -> RedisResult<(u64, MultiplexedConnection)> {
        let (id, pending) = {
            let slot = self.lock();
            (slot.id, slot.connection.clone())
        };
        // Awaiting consumes this clone of the shared future, so once the slot has moved on only
        // the requests in flight hold the old connection.
        match pending.await {
            Ok(connection) => Ok((id, connection)),
            Err(error) => {
                self.reconnect(id);
                Err(error)
            }
        }
    }

    fn after_request<T>(self: &Arc<Self>, id: u64, result: &RedisResult<T>) {
        if let Err(error) = result
            && error.is_unrecoverable_error()
        {
            self.reconnect(id);
        }
    }

    /// Connection `id` is lost (or could not be made): new commands wait for a new one (as
    /// `redis::aio::ConnectionManager` does), unless the slot has moved on already.
    fn reconnect(self: &Arc<Self>, id: u64) {
        let mut slot = self.lock();
        if slot.id != id {
            return;
        }
        let new_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pending = connect(Arc::downgrade(self), new_id).boxed().shared();
        slot.id = new_id;
        slot.connection = pending.clone();
        slot.replacing = false;
        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        drop(slot);
        let this = self.clone();
        self.runtime.spawn(async move {
            if pending.await.is_ok() {
                this.act_on_early_notice(new_id);
            }
        });
    }

    /// The notice for connection `id`: open the replacement, then swap it in.
    fn on_notice(self: &Arc<Self>, id: u64) {
        self.counters.notices.fetch_add(1, Ordering::Relaxed);
        let mut slot = self.lock();
        if slot.id != id {
            // Not in use yet (being made): acted on once it is.
            if id > slot.id && !slot.told_early.contains(&id) {
                slot.told_early.push(id);
            }
            return;
        }
        if slot.replacing {
            return;
        }
        slot.replacing = true;
        drop(slot);
        let this = self.clone();
        self.runtime.spawn(async move { this.replace(id).await });
    }

    /// If connection `id`, now in the slot, was told before it got there.
    fn act_on_early_notice(self: &Arc<Self>, id: u64) {
        let mut slot = self.lock();
        let told = slot.told_early.contains(&id);
        let in_use = slot.id;
        slot.told_early.retain(|&early| early > in_use);
        let current = slot.id == id;
        drop(slot);
        if told && current {
            self.counters.notices.fetch_sub(1, Ordering::Relaxed);
            self.on_notice(id);
        }
    }

    /// Opens the replacement of connection `old_id` and swaps it in for new commands once it
    /// is ready, or once a quarter of the notice lead has passed, whichever comes first: from
    /// then on new commands wait for the replacement rather than go to a connection that the
    /// server may close (it does not before the lead has passed since the notice), and the
    /// requests in flight on the old one have the rest of the lead to finish.
    async fn replace(self: Arc<Self>, old_id: u64) {
        let told = Instant::now();
        let new_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pending = connect(Arc::downgrade(&self), new_id).boxed().shared();
        let budget = Duration::from_millis(self.notice_lead_ms.load(Ordering::Relaxed) / 4);
        let ready = match tokio::time::timeout(budget, pending.clone()).await {
            Ok(Ok(_)) => true,
            Ok(Err(_)) => {
                // The old connection stays until the server closes it (the module's backstop);
                // then the requests on it fail and the manager reconnects.
                let mut slot = self.lock();
                if slot.id == old_id {
                    slot.replacing = false;
                }
                return;
            }
            Err(_) => false,
        };
        {
            let mut slot = self.lock();
            if slot.id != old_id {
                // Lost meanwhile and reconnected: the new connection is not needed.
                return;
            }
            slot.replacing = false;
            slot.id = new_id;
            // The old connection leaves the slot here; the requests in flight on it hold their
            // own clones, and it closes when the last of them is dropped.
            slot.connection = pending.clone();
        }
        let c = &self.counters;
        c.replacements.fetch_add(1, Ordering::Relaxed);
        if !ready {
            c.swapped_before_ready.fetch_add(1, Ordering::Relaxed);
        }
        if ready || pending.await.is_ok() {
            let took = u64::try_from(told.elapsed().as_micros()).unwrap_or(u64::MAX);
            c.longest_replacement_us.fetch_max(took, Ordering::Relaxed);
            self.act_on_early_notice(new_id);
        }
    }

    fn forward(&self, info: PushInfo) {
        if let Some(sender) = &self.config.push_sender {
            let _ = sender.send(info);
        }
    }
}

/// Opens connection `id` (with the manager's retries) and opts it in.
async fn connect(inner: Weak<Inner>, id: u64) -> RedisResult<MultiplexedConnection> {
    let Some(this) = inner.upgrade() else {
        return Err((redis::ErrorKind::Io, "the connection manager was dropped").into());
    };
    let mut attempt = 0;
    loop {
        match connect_once(&this, &inner, id).await {
            Ok(connection) => return Ok(connection),
            Err(error) if attempt >= this.config.number_of_retries => return Err(error),
            Err(_) => {
                tokio::time::sleep(backoff(&this.config, attempt, id)).await;
                attempt += 1;
            }
        }
    }
}

/// One attempt: connect and opt in. A connection lost during the opt-in (on a loaded machine
/// a slow handshake can outlast the connection's max age) fails the attempt and is tried
/// again, which is safe: no application command has been sent on it.
async fn connect_once(
    this: &Arc<Inner>,
    inner: &Weak<Inner>,
    id: u64,
) -> RedisResult<MultiplexedConnection> {
    let established = Arc::new(AtomicBool::new(false));
    let mut config = AsyncConnectionConfig::new()
        .set_connection_timeout(this.config.connection_timeout)
        .set_response_timeout(this.config.response_timeout);
    if this.resp3 {
        config = config.set_push_sender(PushHandler {
            inner: inner.clone(),
            id,
            established: established.clone(),
        });
    }
    let mut connection = this
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    this.counters.connections.fetch_add(1, Ordering::Relaxed);
    if this.resp3
        && let Some(lead_ms) = opt_in(&mut connection).await?
    {
        this.counters.opted_in.fetch_add(1, Ordering::Relaxed);
        if let Some(lead_ms) = lead_ms {
            this.notice_lead_ms.store(lead_ms, Ordering::Relaxed);
        }
    }
    established.store(true, Ordering::Relaxed);
    Ok(connection)
}

/// min(max_delay, random(0 .. min_delay * base^attempt)), as the redis crate's manager.
fn backoff(config: &ConnectionManagerConfig, attempt: usize, salt: u64) -> Duration {
    let exponent = i32::try_from(attempt).unwrap_or(i32::MAX);
    let ceiling = config
        .min_delay
        .mul_f64(f64::from(config.exponent_base).powi(exponent).min(1e6));
    let ceiling = config.max_delay.map_or(ceiling, |max| ceiling.min(max));
    // A little randomness without a dependency: the clock's nanoseconds, mixed.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let mixed =
        (nanos ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0x2545_F491_4F6C_DD1D);
    ceiling.mul_f64((mixed >> 11) as f64 / (1u64 << 53) as f64)
}

/// The opt-in (docs/notices.md): Some(the reply's notice-lead-ms) when a notice will come. A
/// server without the module, or one that refuses, gives a plain connection; only I/O errors
/// fail the connect.
async fn opt_in(connection: &mut MultiplexedConnection) -> RedisResult<Option<Option<u64>>> {
    // Commands one at a time: the connection is not shared yet, so `CLIENT CACHING YES` is
    // still right before the command whose keys it tracks.
    let tracking = redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("OPTIN")
        .query_async::<Value>(connection)
        .await;
    if !usable(tracking)? {
        return Ok(None);
    }
    let mut caching = redis::cmd("CLIENT");
    caching.arg("CACHING").arg("YES");
    if !usable(caching.query_async::<Value>(connection).await)? {
        return plain(connection).await;
    }
    let reply = match redis::cmd("MAXAGE.NOTICE")
        .query_async::<Value>(connection)
        .await
    {
        Ok(reply) => reply,
        Err(error) if is_lost(&error) => return Err(error),
        // No module (unknown command) or not allowed.
        Err(_) => return plain(connection).await,
    };
    let field = |name: &str| field_of(&reply, name);
    if int_of(field("push")) != Some(1) {
        // Exempt, notices off, ...: no notice will come; tracking stays on, reading nothing.
        return Ok(None);
    }
    if int_of(field("key-tracked")) == Some(0) {
        // Redis 7.0: the client reads its notice key itself, tracked.
        let Some(key) = field("key").and_then(bytes_of) else {
            return Ok(None);
        };
        if !usable(caching.query_async::<Value>(connection).await)? {
            return Ok(None);
        }
        let mut read = redis::cmd("MAXAGE.NOTICEKEY");
        read.arg(key);
        if !usable(read.query_async::<Value>(connection).await)? {
            return Ok(None);
        }
    }
    let lead_ms = int_of(field("notice-lead-ms")).and_then(|ms| u64::try_from(ms).ok());
    Ok(Some(lead_ms))
}

/// Tracking off again (a server without the module): the application's own tracking settings
/// are not touched otherwise.
async fn plain(connection: &mut MultiplexedConnection) -> RedisResult<Option<Option<u64>>> {
    let off = redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("OFF")
        .query_async::<Value>(connection)
        .await;
    usable(off)?;
    Ok(None)
}

/// Ok(true) for a reply, Ok(false) for an error reply, Err for a lost connection.
fn usable(result: RedisResult<Value>) -> RedisResult<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(error) if is_lost(&error) => Err(error),
        Err(_) => Ok(false),
    }
}

fn is_lost(error: &redis::RedisError) -> bool {
    error.is_io_error() || error.is_unrecoverable_error() || error.is_timeout()
}

fn field_of<'a>(reply: &'a Value, name: &str) -> Option<&'a Value> {
    match reply {
        Value::Map(pairs) => pairs
            .iter()
            .find(|(key, _)| bytes_of(key) == Some(name.as_bytes()))
            .map(|(_, value)| value),
        // A RESP2-style flat list of name, value, ...
        Value::Array(items) => items
            .chunks(2)
            .find(|pair| bytes_of(&pair[0]) == Some(name.as_bytes()))
            .and_then(|pair| pair.get(1)),
        _ => None,
    }
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

fn int_of(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::Int(n) => Some(*n),
        Value::Boolean(b) => Some(i64::from(*b)),
        other => std::str::from_utf8(bytes_of(other)?).ok()?.parse().ok(),
    }
}

/// Whether a key of an `invalidate` push is a notice key.
pub fn is_notice_key(key: &[u8]) -> bool {
    key.starts_with(NOTICE_KEY_PREFIX)
}

/// Splits an `invalidate` push's keys: whether it held a notice key, and the push without
/// notice keys (None when nothing is left for the application).
fn split_notice(info: PushInfo) -> (bool, Option<PushInfo>) {
    let mut noticed = false;
    let mut keep = |value: &Value| {
        let notice = bytes_of(value).is_some_and(is_notice_key);
        noticed |= notice;
        !notice
    };
    let data: Vec<Value> = info
        .data
        .into_iter()
        .filter_map(|value| match value {
            Value::Array(keys) => {
                let keys: Vec<Value> = keys.into_iter().filter(|k| keep(k)).collect();
                (!keys.is_empty()).then_some(Value::Array(keys))
            }
            other => keep(&other).then_some(other),
        })
        .collect();
    let rest = (!noticed || !data.is_empty()).then_some(PushInfo {
        kind: info.kind,
        data,
    });
    (noticed, rest)
}

/// The push sender of connection `id`: its notice, its loss, the rest to the application.
struct PushHandler {
    inner: Weak<Inner>,
    id: u64,
    /// Its connect attempt succeeded (the loss of a failed attempt is the attempt's concern).
    established: Arc<AtomicBool>,
}

impl AsyncPushSender for PushHandler {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        let Some(inner) = self.inner.upgrade() else {
            return Err(SendError);
        };
        match info.kind {
            PushKind::Invalidate => {
                let (noticed, rest) = split_notice(info);
                if noticed {
                    inner.on_notice(self.id);
                }
                if let Some(rest) = rest {
                    inner.forward(rest);
                }
            }
            PushKind::Disconnection => {
                // The connection in use is lost: reconnect now, as the redis crate's manager
                // does on RESP3. A retired connection's loss is nobody's concern.
                if self.established.load(Ordering::Relaxed) && inner.lock().id == self.id {
                    inner.reconnect(self.id);
                    inner.forward(info);
                }
            }
            _ => inner.forward(info),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalidate(keys: &[&[u8]]) -> PushInfo {
        PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Array(
                keys.iter().map(|k| Value::BulkString(k.to_vec())).collect(),
            )],
        }
    }

    #[test]
    fn a_notice_key_is_a_notice_and_is_not_passed_on() {
        let (noticed, rest) = split_notice(invalidate(&[b"__maxage__:notice:42"]));
        assert!(noticed);
        assert!(rest.is_none());
        let (noticed, _) = split_notice(invalidate(&[b"__maxage__:notice:{7}:42"]));
        assert!(noticed);
    }

    #[test]
    fn other_invalidations_go_to_the_application() {
        let (noticed, rest) = split_notice(invalidate(&[b"user:1", b"__maxage__:other"]));
        assert!(!noticed);
        assert_eq!(rest.expect("passed on").data.len(), 1);
        // FLUSHALL: a null instead of keys.
        let flush = PushInfo {
            kind: PushKind::Invalidate,
            data: vec![Value::Nil],
        };
        let (noticed, rest) = split_notice(flush);
        assert!(!noticed);
        assert_eq!(rest.expect("passed on").data, vec![Value::Nil]);
    }

    #[test]
    fn a_mixed_push_is_a_notice_and_the_other_keys_are_passed_on() {
        let (noticed, rest) = split_notice(invalidate(&[b"__maxage__:notice:1", b"user:1"]));
        assert!(noticed);
        let rest = rest.expect("passed on");
        assert_eq!(
            rest.data,
            vec![Value::Array(vec![Value::BulkString(b"user:1".to_vec())])]
        );
    }

    #[test]
    fn the_notice_reply_is_read_from_a_map() {
        let reply = Value::Map(vec![
            (Value::SimpleString("push".into()), Value::Int(1)),
            (Value::BulkString(b"key-tracked".to_vec()), Value::Int(0)),
            (
                Value::BulkString(b"key".to_vec()),
                Value::BulkString(b"__maxage__:notice:5".to_vec()),
            ),
        ]);
        assert_eq!(int_of(field_of(&reply, "push")), Some(1));
        assert_eq!(int_of(field_of(&reply, "key-tracked")), Some(0));
        assert_eq!(
            field_of(&reply, "key").and_then(bytes_of),
            Some(&b"__maxage__:notice:5"[..])
        );
        assert_eq!(field_of(&reply, "missing"), None);
    }

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let config = ConnectionManagerConfig::new().set_max_delay(Duration::from_millis(300));
        for attempt in 0..10 {
            let delay = backoff(&config, attempt, attempt as u64);
            assert!(delay <= Duration::from_millis(300), "{delay:?}");
        }
        assert!(backoff(&config, 0, 1) <= Duration::from_millis(100));
    }
}
