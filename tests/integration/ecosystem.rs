//! Existing tools keep working: `CLIENT KILL ... MAXAGE` from redis-py and redis-cli on Redis 7.0
//! through the compatibility filter, untouched native behaviour on Valkey 9.1, command docs,
//! replication role changes and a Redis Cluster with the module on every node.

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Three clients older than a second and two younger ones; returns (old ids, young ids, sockets).
fn aged_clients(server: &Server) -> (BTreeSet<u64>, BTreeSet<u64>, Vec<TcpStream>) {
    let mut old: Vec<TcpStream> = (0..3).map(|_| server.idle_socket()).collect();
    let old_ids = old.iter_mut().map(raw_client_id).collect();
    sleep(Duration::from_millis(2200));
    let mut young: Vec<TcpStream> = (0..2).map(|_| server.idle_socket()).collect();
    let young_ids = young.iter_mut().map(raw_client_id).collect();
    old.extend(young);
    (old_ids, young_ids, old)
}

fn redis_py_kill_maxage(port: u16, seconds: u64) -> i64 {
    python(&format!(
        "import redis; print(redis.Redis(port={port}).client_kill_filter(maxage={seconds}))"
    ))
    .parse()
    .expect("an integer")
}

#[test]
fn redis_py_client_kill_filter_maxage_works_on_redis_70() {
    let server = Server::start(Flavor::Redis);
    let (old, young, _sockets) = aged_clients(&server);
    let mut admin = server.admin();
    // redis-py sends CLIENT KILL MAXAGE 2; Redis 7.0 alone answers ERR syntax error.
    assert_eq!(redis_py_kill_maxage(server.port, 2), 3);
    let listed: BTreeSet<u64> = listed_ids(&mut admin).into_iter().collect();
    assert!(listed.is_disjoint(&old));
    assert!(listed.is_superset(&young));
    assert_eq!(
        info_field(&mut admin, "maxage_compat_client_kill_calls"),
        Some(1)
    );
    // redis-cli too: the two young ones are now older than a second.
    drop(admin);
    sleep(Duration::from_millis(1100));
    let port = server.port.to_string();
    assert_eq!(
        redis_cli(&["-p", &port, "CLIENT", "KILL", "MAXAGE", "1"]),
        "2"
    );
}

#[test]
fn valkey_native_results_are_unchanged_by_the_module() {
    let mut results = Vec::new();
    for with_module in [false, true] {
        let builder = Server::builder(Flavor::Valkey);
        let server = if with_module {
            builder.start()
        } else {
            builder.without_module().start()
        };
        let (old, _young, _sockets) = aged_clients(&server);
        let killed = redis_py_kill_maxage(server.port, 2);
        let mut admin = server.conn();
        let survivors: BTreeSet<u64> = listed_ids(&mut admin).into_iter().collect();
        let error = error_of(&mut admin, &["CLIENT", "KILL", "MAXAGE", "0"]);
        results.push((killed, survivors.is_disjoint(&old), error));
        if with_module {
            assert_eq!(
                info_field(&mut admin, "maxage_compat_client_kill_calls"),
                Some(0)
            );
        }
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0].0, 3);
}

#[test]
fn old_style_and_native_forms_are_untouched_and_compat_can_be_turned_off() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.admin();
        assert_eq!(
            error_of(&mut admin, &["CLIENT", "KILL", "1.2.3.4:5"]),
            "ERR No such client",
            "{flavor:?}"
        );
        let mut victim = server.idle_socket();
        let victim_id = raw_client_id(&mut victim);
        let addr: String = run::<String>(
            &mut admin,
            &["CLIENT", "LIST", "ID", &victim_id.to_string()],
        )
        .unwrap()
        .split(' ')
        .find_map(|f| f.strip_prefix("addr=").map(str::to_string))
        .unwrap();
        run::<()>(&mut admin, &["CLIENT", "KILL", &addr]).unwrap();
        assert!(wait_until(Duration::from_secs(2), || is_closed(
            &mut victim
        )));
        let mut other = server.idle_socket();
        // Asking it for its id makes sure the server has accepted it before the kill.
        raw_client_id(&mut other);
        assert_eq!(
            run::<i64>(&mut admin, &["CLIENT", "KILL", "TYPE", "normal"]).unwrap(),
            1
        );
        assert_eq!(
            info_field(&mut admin, "maxage_compat_client_kill_calls"),
            Some(0),
            "{flavor:?}"
        );

        run::<()>(
            &mut admin,
            &["CONFIG", "SET", "maxage.client-kill-compat", "no"],
        )
        .unwrap();
        let outcome = run::<redis::Value>(&mut admin, &["CLIENT", "KILL", "MAXAGE", "1"]);
        match flavor {
            Flavor::Redis => assert_eq!(
                error_of(&mut admin, &["CLIENT", "KILL", "MAXAGE", "1"]),
                "ERR syntax error"
            ),
            Flavor::Valkey => assert!(outcome.is_ok(), "{outcome:?}"),
        }
        // The module's own MAXAGE-MS is an addition through CLIENT KILL too, when compat is on.
        run::<()>(
            &mut admin,
            &["CONFIG", "SET", "maxage.client-kill-compat", "yes"],
        )
        .unwrap();
        let _young = server.idle_socket();
        assert_eq!(
            run::<i64>(
                &mut admin,
                &["CLIENT", "KILL", "MAXAGE-MS", "60000", "DRYRUN"]
            )
            .unwrap(),
            0,
            "{flavor:?}"
        );
    }
}

#[test]
fn compat_keeps_acl_on_the_original_command() {
    let server = Server::start(Flavor::Redis);
    let mut admin = server.admin();
    for (user, rules) in [
        ("no-client-kill", &["+@all", "-client|kill"][..]),
        ("no-module", &["+@all", "-maxage.clientkill"][..]),
        ("both", &["+@all"][..]),
    ] {
        create_user(&mut admin, user, rules);
    }
    for user in ["no-client-kill", "no-module"] {
        let mut conn = login(&server, user);
        let error = error_of(&mut conn, &["CLIENT", "KILL", "MAXAGE", "1000"]);
        assert!(error.starts_with("NOPERM"), "{user}: {error}");
    }
    let mut allowed = login(&server, "both");
    assert_eq!(
        run::<i64>(&mut allowed, &["CLIENT", "KILL", "MAXAGE", "1000"]).unwrap(),
        0
    );
}

#[test]
fn command_docs_are_complete() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.conn();
        let docs = redis_cli(&[
            "-p",
            &server.port.to_string(),
            "COMMAND",
            "DOCS",
            "maxage.kill",
        ]);
        for needle in [
            "summary",
            "since",
            "group",
            "module",
            "complexity",
            "arguments",
            "filter",
            "oneof",
            "multiple",
            "MAXAGE-MS",
            "NOT-TYPE",
            "DRYRUN",
            "LIMIT",
            "SKIPME",
            "token",
        ] {
            assert!(
                docs.contains(needle),
                "{flavor:?}: COMMAND DOCS lacks {needle}:\n{docs}"
            );
        }
        let list_docs: redis::Value = run(&mut admin, &["COMMAND", "DOCS", "maxage.list"]).unwrap();
        assert!(format!("{list_docs:?}").contains("optional"), "{flavor:?}");
    }
}

/// After REPLICAOF NO ONE / REPLICAOF host port with enforcement on, the module still tells
/// replication links from clients: links survive, writes replicate, ordinary clients retire
/// on replicas too (the limit is per server).
#[test]
fn replication_role_changes_keep_links_exempt() {
    for flavor in BOTH {
        let args = ["max-age-ms", "300", "jitter-pct", "0"];
        let first = Server::builder(flavor).module_args(&args).start();
        let second = Server::builder(flavor)
            .module_args(&args)
            .config(&format!("replicaof 127.0.0.1 {}", first.port))
            .start();
        let link_up = |server: &Server| {
            let mut conn = server.conn();
            run::<String>(&mut conn, &["INFO", "replication"])
                .map(|info| info.contains("master_link_status:up"))
                .unwrap_or(false)
        };
        assert!(
            wait_until(Duration::from_secs(10), || link_up(&second)),
            "{flavor:?}"
        );
        // Swap roles.
        let mut second_admin = second.admin();
        run::<()>(&mut second_admin, &["REPLICAOF", "NO", "ONE"]).unwrap();
        let mut first_admin = first.admin();
        run::<()>(
            &mut first_admin,
            &["REPLICAOF", "127.0.0.1", &second.port.to_string()],
        )
        .unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || link_up(&first)),
            "{flavor:?}"
        );
        let started = Instant::now();
        let mut round = 0;
        while started.elapsed() < Duration::from_secs(3) {
            round += 1;
            run::<()>(&mut second_admin, &["SET", "k", &round.to_string()]).unwrap();
            assert!(
                link_up(&first),
                "{flavor:?}: link down after {:?}",
                started.elapsed()
            );
            sleep(Duration::from_millis(200));
        }
        assert!(wait_until(Duration::from_secs(2), || {
            run::<String>(&mut first_admin, &["GET", "k"]).ok() == Some(round.to_string())
        }));
        // An ordinary client of the (new) replica is retired like any other.
        let mut reader = first.idle_socket();
        assert!(
            wait_until(Duration::from_secs(2), || is_closed(&mut reader)),
            "{flavor:?}"
        );
        assert!(info_field(&mut second_admin, "maxage_exempted").unwrap() >= 1);
    }
}
