//! Operations tooling next to the module: Debian's prometheus-redis-exporter 1.45 turning
//! INFO maxage into metrics through conf/maxage-metrics.lua, and Debian's redis-sentinel
//! watching (and failing over) data nodes that retire every connection after 400 ms.
//! Both tools come from Debian (`scripts/setup --test` installs them); the tests run the
//! binaries themselves on free loopback ports, never the system services.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::*;

fn accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A helper process (exporter, sentinel) with its own directory, holding its log; stopped and
/// removed on drop, after printing the log's tail when the test fails.
struct Process {
    name: String,
    child: Child,
    dir: PathBuf,
}

impl Process {
    fn spawn(name: &str, command: &mut Command, dir: &Path) -> Process {
        let out = std::fs::File::create(dir.join("process.log")).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {name} ({e}); scripts/setup --test installs it from Debian")
            });
        Process {
            name: name.to_string(),
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("process.log")).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            eprintln!("--- {} log, last lines ---", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "maxage-ops-{label}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Prometheus: prometheus-redis-exporter -script conf/maxage-metrics.lua

fn exporter_binary() -> PathBuf {
    std::env::var_os("MAXAGE_REDIS_EXPORTER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("prometheus-redis-exporter"))
}

fn metrics_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/maxage-metrics.lua")
}

/// The body of an HTTP/1.0 GET on loopback.
fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the exporter");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// `redis_script_values{key="..."}` samples (exporter 1.45 puts each pair the script returns
/// into the `key` label; later releases add a `filename` label, which this ignores).
fn script_values(metrics: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with("redis_script_values{"))
        .filter_map(|line| {
            let key = line.split("key=\"").nth(1)?.split('"').next()?;
            let value = line.rsplit(' ').next()?.parse().ok()?;
            Some((key.to_string(), value))
        })
        .collect()
}

#[test]
fn redis_exporter_exports_info_maxage_through_the_lua_script() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["max-age-ms", "300"])
            .start();
        // One automatic retirement for the counters to show.
        let mut idle = server.idle_socket();
        assert!(wait_until(Duration::from_secs(3), || is_closed(&mut idle)));
        let dir = temp_dir("exporter");
        let port = free_port();
        let mut exporter = Process::spawn(
            "prometheus-redis-exporter",
            Command::new(exporter_binary()).args([
                "--web.listen-address",
                &format!("127.0.0.1:{port}"),
                "--redis.addr",
                &format!("redis://127.0.0.1:{}", server.port),
                "--script",
                &metrics_script().to_string_lossy(),
            ]),
            &dir,
        );
        assert!(
            wait_until(Duration::from_secs(10), || accepts(port)
                || !exporter.alive()),
            "exporter did not listen"
        );
        assert!(exporter.alive(), "exporter exited:\n{}", exporter.log());

        let first = http_get(port, "/metrics");
        // The exporter connects anew for every scrape; its connection from the first scrape is
        // gone (closed by the exporter or retired by the module) before the second one: the
        // control connection is then the only client.
        let mut admin = server.admin();
        assert!(
            wait_until(Duration::from_secs(5), || {
                info_field(&mut admin, "maxage_tracked_clients") == Some(1)
            }),
            "{flavor:?}: the first scrape's connection stayed: {:?} clients",
            info_field(&mut admin, "maxage_tracked_clients")
        );
        let second = http_get(port, "/metrics");
        for metrics in [&first, &second] {
            assert!(metrics.contains("\nredis_up 1\n"), "{flavor:?}:\n{metrics}");
            assert!(
                metrics.contains("redis_exporter_last_scrape_error{err=\"\"} 0")
                    || metrics.contains("redis_exporter_last_scrape_error 0"),
                "{flavor:?}: the scrape failed:\n{metrics}"
            );
        }
        let before = script_values(&first);
        let values = script_values(&second);
        assert!(
            values.len() >= 30,
            "{flavor:?}: {} script values:\n{second}",
            values.len()
        );
        assert!(
            values.keys().all(|key| key.starts_with("maxage_")),
            "{values:?}"
        );
        let value = |key: &str| {
            *values
                .get(key)
                .unwrap_or_else(|| panic!("{flavor:?}: no {key} in /metrics:\n{second}"))
        };
        assert!(value("maxage_tracked_clients") >= 1.0); // the exporter itself
        assert!(value("maxage_evicted_connections") >= 1.0);
        assert!(value("maxage_evicted_max_age") >= 1.0);
        assert_eq!(value("maxage_evicted_manual"), 0.0);
        assert_eq!(value("maxage_max_age_ms"), 300.0);
        assert_eq!(value("maxage_mode_enforce"), 1.0);
        assert_eq!(value("maxage_mode_observe"), 0.0);
        assert_eq!(value("maxage_pacing_fixed"), 1.0);
        assert_eq!(value("maxage_pacing_adaptive"), 0.0);
        assert!(value("maxage_age_histogram_lt_1s") >= 1.0);
        for key in [
            "maxage_age_histogram_lt_10s",
            "maxage_age_histogram_ge_1h",
            "maxage_exempted",
            "maxage_clients_in_grace",
            "maxage_oldest_client_age_ms",
            "maxage_next_deadline_in_ms",
            "maxage_longest_wakeup_us",
            "maxage_wakeups",
            "maxage_registry_bytes",
        ] {
            value(key);
        }
        // Text fields stay out (they are not numbers).
        for key in [
            "maxage_rules",
            "maxage_exempt_types",
            "maxage_mode",
            "maxage_age_histogram",
        ] {
            assert!(!values.contains_key(key), "{key}");
        }
        // Counters only grow between scrapes.
        for key in ["maxage_evicted_connections", "maxage_wakeups"] {
            assert!(
                values[key] >= before[key],
                "{key}: {} then {}",
                before[key],
                values[key]
            );
        }
        eprintln!("{flavor:?} /metrics (maxage part):");
        for line in second
            .lines()
            .filter(|line| line.contains("redis_script_values"))
        {
            eprintln!("{line}");
        }
        drop(exporter);
    }
}

// ---------------------------------------------------------------------------------------------
// Sentinel: a master and two replicas retiring connections after 400 ms, three sentinels.

const MASTER_NAME: &str = "mymaster";

fn sentinel_binary() -> PathBuf {
    std::env::var_os("MAXAGE_REDIS_SENTINEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-sentinel"))
}

struct Sentinel {
    port: u16,
    /// Held for its drop, which stops the sentinel.
    _process: Process,
}

impl Sentinel {
    fn start(index: usize, master_port: u16) -> Sentinel {
        for _attempt in 0..5 {
            // A fresh directory each attempt: a failed attempt's Process removes its own.
            let dir = temp_dir(&format!("sentinel{index}"));
            let port = free_port();
            let config = dir.join("sentinel.conf");
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1500\n\
                     sentinel failover-timeout {MASTER_NAME} 6000\n\
                     sentinel parallel-syncs {MASTER_NAME} 2\n",
                    dir = dir.display()
                ),
            )
            .expect("sentinel config");
            let mut process = Process::spawn(
                &format!("sentinel {index}"),
                Command::new(sentinel_binary()).arg(&config),
                &dir,
            );
            let up = wait_until(Duration::from_secs(10), || {
                !process.alive() || accepts(port)
            });
            if up && process.alive() {
                return Sentinel {
                    port,
                    _process: process,
                };
            }
            assert!(
                process.log().contains("Address already in use"),
                "sentinel {index} did not start:\n{}",
                process.log()
            );
        }
        panic!("sentinel {index}: no free port");
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .unwrap()
            .get_connection()
            .expect("connect to sentinel")
    }

    fn master_port(&self) -> Option<u16> {
        let addr: Option<Vec<String>> = run(
            &mut self.conn(),
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        )
        .ok()?;
        addr?.get(1)?.parse().ok()
    }

    /// `SENTINEL MASTER <name>` as a map (flags, num-slaves, num-other-sentinels, ...).
    fn master_state(&self) -> BTreeMap<String, String> {
        let flat: Vec<String> =
            run(&mut self.conn(), &["SENTINEL", "MASTER", MASTER_NAME]).expect("SENTINEL MASTER");
        flat.chunks(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect()
    }
}

impl Sentinel {
    /// The `flags` of the master and of each replica as this sentinel sees them.
    fn link_flags(&self) -> Vec<String> {
        let mut conn = self.conn();
        let replicas: Vec<Vec<String>> =
            run(&mut conn, &["SENTINEL", "REPLICAS", MASTER_NAME]).expect("SENTINEL REPLICAS");
        let mut flags = vec![self.master_state()["flags"].clone()];
        for replica in replicas {
            let fields: BTreeMap<&str, &str> = replica
                .chunks(2)
                .map(|pair| (pair[0].as_str(), pair[1].as_str()))
                .collect();
            flags.push(fields["flags"].to_string());
        }
        flags
    }
}

/// One INFO section on a fresh connection (the nodes retire idle test connections too, and
/// Sentinel's failover kills the normal clients of the nodes it reconfigures).
fn info(server: &Server, section: &str) -> String {
    run::<String>(&mut server.conn(), &["INFO", section]).expect("INFO")
}

fn field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .map(|value| value.trim().to_string())
}

fn number(server: &Server, section: &str, name: &str) -> i64 {
    field(&info(server, section), name)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in INFO {section}"))
}

/// The replicas a master lists as connected and online (their ports).
fn online_replica_ports(replication: &str) -> BTreeSet<u16> {
    replication
        .lines()
        .filter(|line| line.starts_with("slave") && line.contains("state=online"))
        .filter_map(|line| line.split("port=").nth(1)?.split(',').next()?.parse().ok())
        .collect()
}

/// Ids and names from `CLIENT LIST [TYPE type]`.
fn clients(server: &Server, kind: Option<&str>) -> Vec<(u64, String)> {
    let mut words = vec!["CLIENT", "LIST"];
    if let Some(kind) = kind {
        words.extend(["TYPE", kind]);
    }
    let list: String = run(&mut server.conn(), &words).expect("CLIENT LIST");
    list.lines()
        .filter_map(|line| {
            let get = |key: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(&format!("{key}=")))
                    .map(str::to_string)
            };
            Some((get("id")?.parse().ok()?, get("name").unwrap_or_default()))
        })
        .collect()
}

fn replication_link_ids(server: &Server) -> BTreeSet<u64> {
    let mut ids: BTreeSet<u64> = clients(server, Some("replica"))
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ids.extend(
        clients(server, Some("master"))
            .into_iter()
            .map(|(id, _)| id),
    );
    ids
}

fn sentinel_link_ids(server: &Server) -> BTreeSet<u64> {
    clients(server, None)
        .into_iter()
        .filter(|(_, name)| name.starts_with("sentinel-"))
        .map(|(id, _)| id)
        .collect()
}

/// What must not change on a data node while the module retires the sentinels' links.
#[derive(Debug, PartialEq)]
struct Replication {
    role: String,
    online_replicas: BTreeSet<u16>,
    link_ids: BTreeSet<u64>,
    sync_full: i64,
    sync_partial_ok: i64,
    sync_partial_err: i64,
}

fn replication_state(server: &Server) -> Replication {
    let replication = info(server, "replication");
    let stats = info(server, "stats");
    let stat = |name: &str| {
        field(&stats, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    let role = field(&replication, "role").unwrap_or_default();
    if role == "slave" {
        assert_eq!(
            field(&replication, "master_link_status").as_deref(),
            Some("up"),
            "replica on port {}: {replication}",
            server.port
        );
    }
    Replication {
        role,
        online_replicas: online_replica_ports(&replication),
        link_ids: replication_link_ids(server),
        sync_full: stat("sync_full"),
        sync_partial_ok: stat("sync_partial_ok"),
        sync_partial_err: stat("sync_partial_err"),
    }
}

/// For `window`: every node's replication (links by client id, online replicas, sync counters)
/// stays as it was, and every sentinel names `master_port` and never sees it down. Returns the
/// module's retirements per node and the share of samples in which a sentinel reported its link
/// to a data node as disconnected.
fn watch_steady_state(
    nodes: &[&Server],
    sentinels: &[Sentinel],
    master_port: u16,
    window: Duration,
) -> (Vec<i64>, f64) {
    let evicted = |node: &Server| number(node, "maxage", "maxage_evicted_connections");
    let evicted_before: Vec<i64> = nodes.iter().map(|node| evicted(node)).collect();
    let expected: Vec<Replication> = nodes.iter().map(|node| replication_state(node)).collect();
    let deadline = Instant::now() + window;
    let (mut polls, mut links_seen, mut links_down) = (0, 0, 0);
    while Instant::now() < deadline {
        for (node, expected) in nodes.iter().zip(&expected) {
            assert_eq!(
                &replication_state(node),
                expected,
                "replication changed on port {}",
                node.port
            );
        }
        for sentinel in sentinels {
            assert_eq!(sentinel.master_port(), Some(master_port));
            for flags in sentinel.link_flags() {
                assert!(
                    !flags.contains("s_down") && !flags.contains("o_down"),
                    "sentinel on port {}: {flags}",
                    sentinel.port
                );
                links_seen += 1;
                links_down += usize::from(flags.contains("disconnected"));
            }
        }
        polls += 1;
        // The pace of the samples over a fixed window: the time passing is the point.
        sleep(Duration::from_millis(100));
    }
    assert!(polls >= 5);
    let retired = nodes
        .iter()
        .zip(&evicted_before)
        .map(|(node, before)| evicted(node) - before)
        .collect();
    (retired, links_down as f64 / links_seen as f64)
}

/// Max-age retirements of sentinel links this node has logged so far.
fn sentinel_retirements_logged(node: &Server) -> usize {
    node.log()
        .lines()
        .filter(|line| line.contains("retired client") && line.contains("name=\"sentinel-"))
        .count()
}

/// The redis-py client's directory: on drop (also when the test fails) it creates the `stop`
/// file the client polls, gives it a moment to see it, and removes the directory.
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let stop = self.0.join("stop");
        if !stop.exists() && std::fs::write(&stop, b"").is_ok() {
            // Only when the test failed before stopping the client itself: there is no handle
            // to wait on here, so the client gets a fixed moment to see the file.
            sleep(Duration::from_millis(200));
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A redis-py Sentinel client writing `INCR pyclient` every 20 ms until `stop` exists; prints
/// `ready` after its first write and, at the end, a JSON summary with every error it saw
/// (after redis-py's own retries).
const PY_CLIENT: &str = r#"
import json, os, sys, time
import redis
from redis.sentinel import Sentinel
ports, stop = json.loads(sys.argv[1]), sys.argv[2]
sentinel = Sentinel([("127.0.0.1", p) for p in ports], socket_timeout=0.5)
master = sentinel.master_for("mymaster", socket_timeout=0.5)
ok, errors, last_ok, last_value, first = 0, [], None, None, time.time()
while not os.path.exists(stop) and time.time() - first < 45:
    try:
        last_value = master.incr("pyclient")
        ok += 1
        last_ok = time.time()
        if ok == 1:
            print("ready", flush=True)
    except Exception as e:
        errors.append([time.time(), type(e).__name__ + ": " + str(e)[:120]])
    time.sleep(0.02)
host, port = sentinel.discover_master("mymaster")
print(json.dumps({"ok": ok, "errors": errors, "last_ok": last_ok, "last_value": last_value,
                  "master_port": port}))
"#;

/// Master and two replicas retiring every connection after 400 ms (replication links exempt, as
/// by default), three sentinels (quorum 2). Sentinel reconnects to an instance at most once a
/// second, so with a max age below that its links are down most of the time and a failover can
/// abort with -failover-abort-no-good-slave (both replicas' links down at the selection); the
/// test shows the retirements first, then applies the recommended `maxage.exempt-names
/// "sentinel-*"` and fails over while a redis-py Sentinel client (not exempt, retired every
/// 400 ms) writes throughout.
#[test]
fn sentinel_failover_with_the_module_retiring_connections_on_every_data_node() {
    // Debian's redis-sentinel watches Debian's redis-server.
    if !runs_on(Flavor::Redis) {
        return;
    }
    let _exclusive = exclusive();
    let started = Instant::now();
    // The sentinels' default exemption off, to show what it prevents.
    let module_args = ["max-age-ms", "400", "exempt-names", "\"\""];
    // No 5 s wait before a (diskless) full sync: the initial syncs and those after the
    // failover are not what this test is about.
    let no_sync_delay = "repl-diskless-sync-delay 0";
    let master = Server::builder(Flavor::Redis)
        .module_args(&module_args)
        .config(no_sync_delay)
        .start();
    let replicas: Vec<Server> = (0..2)
        .map(|_| {
            Server::builder(Flavor::Redis)
                .module_args(&module_args)
                .config(no_sync_delay)
                .config(&format!("replicaof 127.0.0.1 {}", master.port))
                .start()
        })
        .collect();
    let nodes = [&master, &replicas[0], &replicas[1]];
    let replica_ports: BTreeSet<u16> = replicas.iter().map(|r| r.port).collect();
    assert!(
        wait_until(Duration::from_secs(10), || online_replica_ports(&info(
            &master,
            "replication"
        )) == replica_ports),
        "replicas did not sync"
    );
    let sentinels: Vec<Sentinel> = (0..3).map(|i| Sentinel::start(i, master.port)).collect();
    let sentinel_ports: Vec<u16> = sentinels.iter().map(|s| s.port).collect();
    assert!(
        wait_until(Duration::from_secs(15), || sentinels.iter().all(|s| {
            let state = s.master_state();
            state["num-slaves"] == "2" && state["num-other-sentinels"] == "2"
        })),
        "sentinels did not discover each other and the replicas: {:?}",
        sentinels[0].master_state()
    );
    let discovered = started.elapsed();

    // 1. Without the sentinel exemption: the module retires the sentinels' links (normal and pubsub
    //    clients) on every node; the sentinels reconnect and keep seeing the master, never down;
    //    replication links are untouched.
    let links_before: Vec<BTreeSet<u64>> = nodes.iter().map(|n| sentinel_link_ids(n)).collect();
    let (retired, down_share) =
        watch_steady_state(&nodes, &sentinels, master.port, Duration::from_millis(2500));
    for ((node, retired), links_before) in nodes.iter().zip(&retired).zip(&links_before) {
        assert!(*retired >= 3, "port {}: {retired} retirements", node.port);
        // Replaced (new client ids) and back: 3 sentinels x (command + pubsub link).
        assert!(
            wait_until(Duration::from_secs(3), || {
                let now = sentinel_link_ids(node);
                now.len() == 6 && now.is_disjoint(links_before)
            }),
            "port {}: sentinel links before {links_before:?}, now {:?}",
            node.port,
            sentinel_link_ids(node)
        );
    }
    eprintln!(
        "sentinel links retired: max-age retirements in 2.5 s per node (master, replicas) \
         {retired:?}; sentinels reported their link to a node disconnected in {:.0}% of samples",
        down_share * 100.0
    );

    // 2. The default setting: sentinels exempt by name; their links then stay.
    for node in &nodes {
        config_set(&mut node.conn(), "maxage.exempt-names", "sentinel-*");
    }
    assert!(
        wait_until(Duration::from_secs(3), || nodes
            .iter()
            .all(|n| sentinel_link_ids(n).len() == 6)),
        "sentinel links did not come back"
    );
    let sentinel_retirements: Vec<usize> = nodes
        .iter()
        .map(|n| sentinel_retirements_logged(n))
        .collect();
    let links: Vec<BTreeSet<u64>> = nodes.iter().map(|n| sentinel_link_ids(n)).collect();
    let (retired, down_share) =
        watch_steady_state(&nodes, &sentinels, master.port, Duration::from_millis(1500));
    for (node, links) in nodes.iter().zip(&links) {
        assert_eq!(&sentinel_link_ids(node), links, "port {}", node.port);
    }
    assert_eq!(retired, [0, 0, 0]);
    assert_eq!(down_share, 0.0);

    // 3. A redis-py Sentinel client writes through the failover; the module keeps retiring its
    //    connections every 400 ms.
    let py_dir = StopOnDrop(temp_dir("pyclient"));
    let stop = py_dir.0.join("stop");
    let mut py_client = Command::new("python3")
        .args([
            "-c",
            PY_CLIENT,
            &format!("{sentinel_ports:?}"),
            &stop.to_string_lossy(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut py_stdout = BufReader::new(py_client.stdout.take().expect("stdout"));
    let mut ready = String::new();
    py_stdout.read_line(&mut ready).expect("read");
    if ready.trim() != "ready" {
        let output = py_client.wait_with_output().expect("python3");
        panic!(
            "redis-py client did not start: {ready}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // A fixed time on purpose: redis-py writes through two of its 400 ms retirements before
    // the failover, and must see no error in them.
    sleep(Duration::from_millis(1000));
    let before_failover: i64 = run(&mut master.conn(), &["GET", "pyclient"]).expect("GET");
    assert!(
        before_failover > 10,
        "redis-py wrote {before_failover} times"
    );

    let failover_at = Instant::now();
    let failover_unix = unix_now();
    run::<()>(
        &mut sentinels[0].conn(),
        &["SENTINEL", "FAILOVER", MASTER_NAME],
    )
    .expect("SENTINEL FAILOVER");
    assert!(
        wait_until(Duration::from_secs(15), || sentinels[0]
            .master_port()
            .is_some_and(|port| port != master.port)),
        "sentinel 0 never switched"
    );
    let switched = failover_at.elapsed();
    let new_port = sentinels[0].master_port().unwrap();
    let new_master = replicas
        .iter()
        .find(|r| r.port == new_port)
        .expect("a replica was promoted");
    let others: Vec<&Server> = nodes
        .iter()
        .copied()
        .filter(|n| n.port != new_port)
        .collect();
    let other_ports: BTreeSet<u16> = others.iter().map(|n| n.port).collect();
    assert!(
        wait_until(Duration::from_secs(20), || {
            sentinels.iter().all(|s| s.master_port() == Some(new_port))
                && field(&info(new_master, "replication"), "role").as_deref() == Some("master")
                && online_replica_ports(&info(new_master, "replication")) == other_ports
                && others.iter().all(|n| {
                    let replication = info(n, "replication");
                    field(&replication, "master_port") == Some(new_port.to_string())
                        && field(&replication, "master_link_status").as_deref() == Some("up")
                })
        }),
        "the new topology did not settle: {}",
        info(new_master, "replication")
    );
    // The reconfigured nodes' CLIENT KILL TYPE normal (sent by the failover leader) also cut the
    // other sentinels' links; they reconnect within a second.
    assert!(
        wait_until(Duration::from_secs(5), || sentinels.iter().all(|s| s
            .link_flags()
            .iter()
            .all(|f| !f.contains("disconnected")))),
        "sentinel links did not come back after the failover"
    );
    let settled = failover_at.elapsed();
    let settled_unix = unix_now();
    eprintln!(
        "sentinels discovered everything {discovered:?} after start; failover: sentinel 0 named \
         the new master after {switched:?}, all sentinels and replicas settled after {settled:?}"
    );

    // 4. The new topology replicates, and keeps its links while the module goes on retiring
    //    the redis-py client's connections to the new master.
    let mut conn = new_master.conn();
    run::<()>(&mut conn, &["SET", "after-failover", "yes"]).expect("SET on the new master");
    let acked: i64 = run(&mut conn, &["WAIT", "2", "2000"]).expect("WAIT");
    assert_eq!(acked, 2);
    drop(conn);
    for node in &others {
        let value: Option<String> = run(&mut node.conn(), &["GET", "after-failover"]).unwrap();
        assert_eq!(value.as_deref(), Some("yes"), "port {}", node.port);
    }
    let new_nodes: Vec<&Server> = std::iter::once(new_master)
        .chain(others.iter().copied())
        .collect();
    let sync_after = |node: &Server| {
        (
            number(node, "stats", "sync_full"),
            number(node, "stats", "sync_partial_ok"),
        )
    };
    let (retired_after, down_share) = watch_steady_state(
        &new_nodes,
        &sentinels,
        new_port,
        Duration::from_millis(2000),
    );
    assert!(
        retired_after[0] >= 1,
        "the redis-py client's connections to the new master were not retired: {retired_after:?}"
    );
    assert_eq!(down_share, 0.0);
    eprintln!(
        "after failover: max-age retirements in 2 s (new master, replicas) {retired_after:?} \
         (the redis-py client's connections); sync_full/sync_partial_ok: new master {:?}, \
         old master {:?}",
        sync_after(new_master),
        sync_after(&master)
    );
    let maxage = info(new_master, "maxage");
    eprintln!(
        "new master INFO maxage: {}",
        maxage
            .lines()
            .filter(|l| l.starts_with("maxage_evicted") || l.starts_with("maxage_exempted"))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ")
    );
    for line in new_master
        .log()
        .lines()
        .filter(|l| l.contains("esynchronization") || l.contains("Full resync"))
    {
        eprintln!("new master log: {line}");
    }

    // 5. The redis-py client wrote to the new master after the failover, and saw no error
    //    outside the failover itself.
    std::fs::write(&stop, b"").unwrap();
    let mut summary = String::new();
    py_stdout.read_to_string(&mut summary).expect("read");
    let output = py_client.wait_with_output().expect("python3");
    assert!(
        output.status.success(),
        "redis-py client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    drop(py_dir);
    let digest = python(&format!(
        "import json; s = json.loads({summary:?}); \
         late = [e for e in s['errors'] if e[0] > {settled_unix} + 1.0]; \
         early = [e for e in s['errors'] if e[0] < {failover_unix}]; \
         print(s['ok'], len(s['errors']), len(early), len(late), s['last_ok'] > {settled_unix}, \
               s['last_value'], s['master_port'])"
    ));
    eprintln!(
        "redis-py (writes ok, errors, errors before the failover, errors 1 s after it settled, \
         wrote after it, last INCR value, master): {digest}; {summary}"
    );
    let fields: Vec<&str> = digest.split(' ').collect();
    assert_eq!(
        fields[2], "0",
        "redis-py saw errors before the failover: {summary}"
    );
    assert_eq!(
        fields[3], "0",
        "redis-py saw errors after the failover: {summary}"
    );
    assert_eq!(
        fields[4], "True",
        "redis-py did not write after the failover: {summary}"
    );
    assert_eq!(fields[6], new_port.to_string());
    let last_value: i64 = fields[5].parse().unwrap();
    let on_new_master: i64 = run(&mut new_master.conn(), &["GET", "pyclient"]).unwrap();
    assert_eq!(on_new_master, last_value);

    // No sentinel link was retired after the exemption (the failover itself closes and
    // reopens some of them: CLIENT KILL TYPE normal on the reconfigured nodes).
    for (node, before) in nodes.iter().zip(&sentinel_retirements) {
        assert_eq!(
            sentinel_retirements_logged(node),
            *before,
            "port {}",
            node.port
        );
    }
    eprintln!("sentinel test took {:?}", started.elapsed());
}
