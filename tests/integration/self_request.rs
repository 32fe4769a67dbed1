//! `MAXAGE.SELF`: a connection chooses its own max age.

use std::net::TcpStream;
use std::thread::sleep;
use std::time::Duration;

use crate::harness::{
    BOTH, Server, audit_ages, config_set, create_user, error_of, exclusive, info_field,
    io_threads_slack, is_closed, login, maxage_list_ids, python, raw_command, run, wait_until,
};

/// The redis-py example of docs/commands.md (`examples/redis_py_pool.py`): a pool whose connections ask
/// for 500 ms, eight threads of INCRs with retries off, with the operator's max age off and at
/// five minutes. Every connection is retired for its own request, none early, right after the
/// reply that follows its deadline, and no request is executed twice or lost. A request that
/// races a close (none in most runs; at most one per twenty retirements allowed) was never
/// executed.
#[test]
fn a_redis_py_pool_gets_the_max_age_it_asks_for() {
    let _alone = exclusive();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    for flavor in BOTH {
        for operator_max_age in ["0", "300000"] {
            let server = Server::builder(flavor)
                .module_args(&["max-age-ms", operator_max_age])
                .start();
            // The close ages are the server's: keep it ahead of whatever else the machine runs.
            server.raise_priority();
            let summary = python(&format!(
                r#"
import sys, threading, time
sys.path.insert(0, "{examples}")
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_py_pool import make_pool
pool = make_pool(port={port}, max_age_ms=500, retry=Retry(NoBackoff(), 0))
client = redis.Redis(connection_pool=pool)
ok = [0] * 8
failed = [0] * 8
def work(i):
    end = time.monotonic() + 3
    while time.monotonic() < end:
        try:
            client.incr(f"n{{i}}")
            ok[i] += 1
        except redis.ConnectionError:
            failed[i] += 1
threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
executed = sum(int(client.get(f"n{{i}}") or 0) for i in range(8))
print(sum(ok), sum(failed), executed)
"#,
                port = server.port
            ));
            let numbers: Vec<u64> = summary
                .split_whitespace()
                .map(|n| n.parse().unwrap())
                .collect();
            let (ok, failed, executed) = (numbers[0], numbers[1], numbers[2]);
            let ages = audit_ages(&server, "client-requested");
            eprintln!(
                "{flavor:?} max-age-ms {operator_max_age}: {ok} ok, {failed} failed, {executed} executed; {} retired, ages ms min {:?} p50 {:?} p99 {:?} max {:?}",
                ages.len(),
                ages.first(),
                ages.get(ages.len() / 2),
                ages.get(ages.len() * 99 / 100),
                ages.last()
            );
            assert!(ages.len() >= 16, "{flavor:?}: {} retirements", ages.len());
            assert!(ages[0] >= 500, "{flavor:?}: retired early: {ages:?}");
            // Closed right after the reply that follows the deadline: measured p99 503-505 ms
            // on a quiet machine. The close waits for the pool's next request, so a stall of
            // the client process delays every connection it holds at once: a CI run saw 8 of
            // 40 closed in the same millisecond at 532-540 ms (the pool's cadence, not the
            // module's). The median and three quarters are the module's; the last bound is
            // what an unhonoured request (the operator's 5 minutes, or never) could not meet.
            //
            // With `io-threads 2` on 2 cores the server takes both while the pool is busy
            // (Redis 7's and Valkey's I/O threads spin while they have work; Redis 8's main
            // thread busy-waits for its thread at each look-up), so the pool's 8 threads get
            // the CPU late, and a whole round of 8 waits for the pool's next requests (measured:
            // rounds at 517-860 ms, medians 533-644 ms, 0 failed). A connection the pool leaves
            // idle is closed 250 ms after its deadline (IDLE_CLOSE_MS): with threads that is
            // the bound of the median and of three quarters, the plain bounds elsewhere.
            let p75 = ages[(ages.len() * 75).div_ceil(100) - 1];
            let mut admin = server.conn();
            let threads = io_threads_slack(&mut admin).is_some();
            let (median_bound, p75_bound) = if threads { (750, 800) } else { (505, 520) };
            assert!(
                ages[ages.len() / 2] <= median_bound,
                "{flavor:?}: median (bound {median_bound}) {ages:?}"
            );
            assert!(
                p75 <= p75_bound,
                "{flavor:?}: p75 {p75} ms (bound {p75_bound}): {ages:?}"
            );
            assert!(ages[ages.len() - 1] <= 1_000, "{flavor:?}: {ages:?}");
            // A request that races an idle close is rare (0 in most runs, 1 in 41 retirements
            // once on Redis 7.4), so one in twenty is allowed; none may be executed.
            assert!(
                failed * 20 <= ages.len() as u64,
                "{flavor:?}: {failed} failed requests for {} retirements",
                ages.len()
            );
            assert_eq!(ok, executed, "{flavor:?}: executed twice or lost");
            assert_eq!(
                info_field(&mut admin, "maxage_evicted_client_requested"),
                Some(ages.len() as i64)
            );
            assert_eq!(info_field(&mut admin, "maxage_evicted_max_age"), Some(0));
        }
    }
}

fn report(conn: &mut redis::Connection) -> Vec<(String, redis::Value)> {
    let fields: Vec<redis::Value> = run(conn, &["MAXAGE.SELF"]).unwrap();
    fields
        .chunks(2)
        .map(|pair| {
            let name = match &pair[0] {
                redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                other => format!("{other:?}"),
            };
            (name, pair[1].clone())
        })
        .collect()
}

fn field(report: &[(String, redis::Value)], name: &str) -> redis::Value {
    report
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {name} in {report:?}"))
}

/// Shorter only: a request longer than the operator allows is capped; `0` withdraws it;
/// without an argument the command reports what applies; an exempt client's own request is
/// carried out; LIST and INFO show requests.
#[test]
fn requests_only_shorten_and_are_reported() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["max-age-ms", "400", "jitter-pct", "0"])
            .start();
        let mut admin = server.admin();
        // Capped: asks for a day, the operator's 400 ms applies.
        let mut long = server.conn();
        run::<()>(&mut long, &["MAXAGE.SELF", "86400000"]).unwrap();
        let fields = report(&mut long);
        assert_eq!(
            field(&fields, "set-by"),
            redis::Value::BulkString(b"max-age-ms".to_vec())
        );
        assert_eq!(field(&fields, "max-age-ms"), redis::Value::Int(400));
        assert_eq!(
            field(&fields, "requested-max-age-ms"),
            redis::Value::Int(86_400_000)
        );
        let id = crate::harness::client_id(&mut long);
        let listed = maxage_list_ids(&mut admin, &["ID", &id.to_string()]);
        assert_eq!(listed, vec![id]);
        // An exempt client (by name) asking for 200 ms is retired for its own request.
        config_set(&mut admin, "maxage.exempt-names", "sentinel-* keep-*");
        let mut exempt = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        assert!(raw_command(&mut exempt, &["CLIENT", "SETNAME", "keep-1"]).starts_with("+OK"));
        assert!(raw_command(&mut exempt, &["MAXAGE.SELF", "200"]).starts_with("+OK"));
        // A request withdrawn falls back to the operator's decision (here: exempt, never).
        let mut withdrawn = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        assert!(raw_command(&mut withdrawn, &["CLIENT", "SETNAME", "keep-2"]).starts_with("+OK"));
        assert!(raw_command(&mut withdrawn, &["MAXAGE.SELF", "200"]).starts_with("+OK"));
        assert!(raw_command(&mut withdrawn, &["MAXAGE.SELF", "0"]).starts_with("+OK"));
        assert!(wait_until(Duration::from_secs(3), || is_closed(
            &mut exempt
        )));
        // A fixed time on purpose: the withdrawn request was due with `exempt`'s, and nothing
        // must close its client during these 300 ms.
        sleep(Duration::from_millis(300));
        assert!(
            !is_closed(&mut withdrawn),
            "{flavor:?}: the withdrawn request was kept"
        );
        assert!(info_field(&mut admin, "maxage_evicted_client_requested").unwrap() >= 1);
        // Bad values are refused in the server's way, and nothing changes.
        for bad in ["-1", "x", "315360000001", "1.5", ""] {
            let error = error_of(&mut admin, &["MAXAGE.SELF", bad]);
            assert!(error.contains("not an integer from 0"), "{bad}: {error}");
        }
        assert!(error_of(&mut admin, &["MAXAGE.SELF", "1", "2"]).contains("wrong number"));
    }
}

/// With enforcement off (`max-age-ms 0`), a request is enforced on its own; the usual
/// application user may run `MAXAGE.SELF` but not `MAXAGE.KILL` / `MAXAGE.LIST`.
#[test]
fn application_users_may_set_their_own_max_age_only() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.conn();
        create_user(&mut admin, "app", &["+@all", "-@admin", "-@dangerous"]);
        let mut app = login(&server, "app");
        let app_id = crate::harness::client_id(&mut app);
        run::<()>(&mut app, &["MAXAGE.SELF", "300"]).unwrap();
        assert!(error_of(&mut app, &["MAXAGE.KILL", "TYPE", "normal"]).contains("NOPERM"));
        assert!(error_of(&mut app, &["MAXAGE.LIST"]).contains("NOPERM"));
        let fields = report(&mut app);
        assert_eq!(
            field(&fields, "set-by"),
            redis::Value::BulkString(b"client-requested".to_vec())
        );
        // Retired for its request: gone from the server, and audited. (Polling on `app` itself
        // would keep the client busy and move its moment.)
        assert!(
            wait_until(Duration::from_secs(5), || {
                !crate::harness::listed_ids(&mut admin).contains(&app_id)
                    && !audit_ages(&server, "client-requested").is_empty()
            }),
            "{flavor:?}: not retired"
        );
        assert!(
            run::<String>(&mut app, &["PING"]).is_err(),
            "{flavor:?}: not retired"
        );
        let ages = audit_ages(&server, "client-requested");
        assert_eq!(ages.len(), 1, "{flavor:?}");
        assert!(ages[0] >= 300, "{flavor:?}: {ages:?}");
    }
}

/// The node-redis and ioredis examples of docs/commands.md (`examples/node_clients.js`): each client asks
/// for 300 ms on every (re)connection, runs INCRs for 2 s, and is retired and reconnects again
/// and again; nothing is executed twice (ioredis resends unanswered commands by itself).
#[test]
fn the_node_redis_and_ioredis_examples_get_their_max_age() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/node_clients.js");
    for flavor in BOTH {
        let server = Server::start(flavor);
        let output = std::process::Command::new("node")
            .args([script, &server.port.to_string(), "300", "2"])
            .output()
            .expect("node (scripts/setup --test installs the examples' clients)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let numbers: Vec<u64> = String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        let [ready_node_redis, ready_ioredis, failed, ok, executed] = numbers[..] else {
            panic!("{numbers:?}");
        };
        eprintln!(
            "{flavor:?}: node-redis ready {ready_node_redis}x, ioredis {ready_ioredis}x, {ok} ok, {failed} failed, {executed} executed"
        );
        assert!(ready_node_redis >= 3 && ready_ioredis >= 3, "{numbers:?}");
        assert_eq!(ok, executed, "{flavor:?}: executed twice or lost");
        let ages = audit_ages(&server, "client-requested");
        assert!(ages.len() >= 4, "{flavor:?}: {ages:?}");
        assert!(ages[0] >= 300, "{flavor:?}: {ages:?}");
    }
}

/// The Rust example of docs/commands.md.
fn connect_with_max_age(
    client: &redis::Client,
    max_age_ms: u64,
) -> redis::RedisResult<redis::Connection> {
    let mut conn = client.get_connection()?;
    redis::cmd("MAXAGE.SELF")
        .arg(max_age_ms)
        .query::<()>(&mut conn)?;
    Ok(conn)
}

#[test]
fn the_rust_example_gets_its_max_age() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let client = server.client();
        let mut conn = connect_with_max_age(&client, 200).unwrap();
        let mut reconnects = 0;
        let deadline = std::time::Instant::now() + Duration::from_millis(2000);
        while std::time::Instant::now() < deadline {
            if run::<i64>(&mut conn, &["INCR", "n"]).is_err() {
                reconnects += 1;
                conn = connect_with_max_age(&client, 200).unwrap();
            }
            // The example's own pace of INCRs over a fixed 2 s: the time passing is the point.
            sleep(Duration::from_millis(5));
        }
        let retired = audit_ages(&server, "client-requested");
        assert!(
            reconnects >= 2,
            "{flavor:?}: {reconnects} reconnects, {retired:?}"
        );
        assert!(retired.len() >= reconnects, "{flavor:?}: {retired:?}");
        assert!(retired[0] >= 200, "{flavor:?}: {retired:?}");
    }
}

/// docs/commands.md shows the examples these tests run, word for word.
#[test]
fn the_docs_show_the_examples_the_tests_run() {
    let doc = include_str!("../../docs/commands.md");
    let redis_py = include_str!("../../examples/redis_py_pool.py");
    assert!(
        doc.contains(redis_py.trim()),
        "docs/commands.md lacks examples/redis_py_pool.py"
    );
    let node = include_str!("../../examples/node_clients.js");
    let shown = node[..node.find("module.exports").unwrap()].trim();
    assert!(
        doc.contains(shown),
        "docs/commands.md lacks examples/node_clients.js"
    );
    assert!(doc.contains("fn connect_with_max_age(client: &redis::Client, max_age_ms: u64)"));
}
