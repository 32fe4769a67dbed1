//! Existing tools keep working: `CLIENT KILL ... MAXAGE` from redis-py and redis-cli through the
//! compatibility filter where the server lacks the filter (Redis 7.0, 7.2), untouched native
//! behaviour where it has it (Redis 7.4+, Valkey 8+), command docs, replication role changes and
//! a Redis Cluster with the module on every node.

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Three clients older than `KILL_AGE_S` and two younger ones; returns (old ids, young ids,
/// sockets). The young ones have that many seconds of slack, for a loaded machine's slow start
/// of the Python process that sends the kill.
fn aged_clients(server: &Server) -> (BTreeSet<u64>, BTreeSet<u64>, Vec<TcpStream>) {
    let mut old: Vec<TcpStream> = (0..3).map(|_| server.idle_socket()).collect();
    let old_ids = old.iter_mut().map(raw_client_id).collect();
    // A fixed time on purpose: the old clients age past `KILL_AGE_S`.
    sleep(Duration::from_millis(KILL_AGE_S * 1000 + 200));
    let mut young: Vec<TcpStream> = (0..2).map(|_| server.idle_socket()).collect();
    let young_ids = young.iter_mut().map(raw_client_id).collect();
    old.extend(young);
    (old_ids, young_ids, old)
}

const KILL_AGE_S: u64 = 3;

fn redis_py_kill_maxage(port: u16, seconds: u64) -> i64 {
    python(&format!(
        "import redis; print(redis.Redis(port={port}).client_kill_filter(maxage={seconds}))"
    ))
    .parse()
    .expect("an integer")
}

/// On Redis 7.0-7.2 the module answers; on Redis 7.4+ (native MAXAGE) the server does, alone.
#[test]
fn redis_py_client_kill_filter_maxage_works_on_redis_70() {
    if !runs_on(Flavor::Redis) {
        return;
    }
    let server = Server::start(Flavor::Redis);
    let native = server.info().native_kill_maxage();
    let (old, young, _sockets) = aged_clients(&server);
    let mut admin = server.admin();
    // redis-py sends CLIENT KILL MAXAGE 3; Redis 7.0 alone answers ERR syntax error.
    assert_eq!(redis_py_kill_maxage(server.port, KILL_AGE_S), 3);
    let listed: BTreeSet<u64> = listed_ids(&mut admin).into_iter().collect();
    assert!(listed.is_disjoint(&old));
    assert!(listed.is_superset(&young));
    assert_eq!(
        info_field(&mut admin, "maxage_compat_client_kill_calls"),
        Some(if native { 0 } else { 1 }),
        "{:?}",
        server.info()
    );
    // redis-cli too: the two young ones are now older than a second (a fixed time on purpose:
    // they age).
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
    if !runs_on(Flavor::Valkey) {
        return;
    }
    let mut results = Vec::new();
    for with_module in [false, true] {
        let builder = Server::builder(Flavor::Valkey);
        let server = if with_module {
            builder.start()
        } else {
            builder.without_module().start()
        };
        let (old, _young, _sockets) = aged_clients(&server);
        let killed = redis_py_kill_maxage(server.port, KILL_AGE_S);
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
        let info = server.info();
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
        // With compat off the server alone answers: what it has works, what it lacks is an error.
        let outcome = run::<redis::Value>(&mut admin, &["CLIENT", "KILL", "MAXAGE", "1"]);
        if info.native_kill_maxage() {
            assert!(outcome.is_ok(), "{info:?}: {outcome:?}");
        } else {
            assert_eq!(
                error_of(&mut admin, &["CLIENT", "KILL", "MAXAGE", "1"]),
                "ERR syntax error",
                "{info:?}"
            );
        }
        if let Some((keyword, value)) = info.lacking_kill_filter() {
            assert_eq!(
                error_of(&mut admin, &["CLIENT", "KILL", keyword, value]),
                "ERR syntax error",
                "{info:?}"
            );
        }
        assert_eq!(
            info_field(&mut admin, "maxage_compat_client_kill_calls"),
            Some(0),
            "{info:?}"
        );
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

/// Loaded with compat off, the module registers no command filter at all (the server would
/// otherwise call it for every command); turning the setting on at runtime registers it, and
/// off again removes it.
#[test]
fn compat_filter_follows_the_setting_from_load_on() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["client-kill-compat", "no"])
            .start();
        let mut admin = server.admin();
        let module_only = ["CLIENT", "KILL", "MAXAGE-MS", "60000", "DRYRUN"];
        assert_eq!(
            error_of(&mut admin, &module_only),
            "ERR syntax error",
            "{flavor:?}"
        );
        for (setting, answered_by_module) in [("yes", true), ("no", false), ("yes", true)] {
            run::<()>(
                &mut admin,
                &["CONFIG", "SET", "maxage.client-kill-compat", setting],
            )
            .unwrap();
            let outcome = run::<i64>(&mut admin, &module_only);
            assert_eq!(
                outcome.is_ok(),
                answered_by_module,
                "{flavor:?} {setting}: {outcome:?}"
            );
        }
        assert_eq!(
            info_field(&mut admin, "maxage_compat_client_kill_calls"),
            Some(2),
            "{flavor:?}"
        );
    }
}

/// A `CLIENT KILL` the module answers (a filter the server lacks: MAXAGE on Redis 7.0-7.2,
/// IDLE on Redis 7.4 and Valkey 8) needs both the original command and the module's; one the
/// server answers itself (MAXAGE on Redis 7.4+, Valkey 8+) needs only the original.
#[test]
fn compat_keeps_acl_on_the_original_command() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let info = server.info();
        let mut admin = server.admin();
        for (user, rules) in [
            ("no-client-kill", &["+@all", "-client|kill"][..]),
            ("no-module", &["+@all", "-maxage.clientkill"][..]),
            ("both", &["+@all"][..]),
        ] {
            create_user(&mut admin, user, rules);
        }
        if info.native_kill_maxage() {
            let native = ["CLIENT", "KILL", "MAXAGE", "1000"];
            let error = error_of(&mut login(&server, "no-client-kill"), &native);
            assert!(error.starts_with("NOPERM"), "{info:?}: {error}");
            let mut without_module = login(&server, "no-module");
            assert_eq!(run::<i64>(&mut without_module, &native).unwrap(), 0);
        }
        if let Some((keyword, value)) = info.lacking_kill_filter() {
            let command = ["CLIENT", "KILL", keyword, value];
            for user in ["no-client-kill", "no-module"] {
                let error = error_of(&mut login(&server, user), &command);
                assert!(error.starts_with("NOPERM"), "{info:?} {user}: {error}");
            }
            let mut allowed = login(&server, "both");
            assert_eq!(run::<i64>(&mut allowed, &command).unwrap(), 0, "{info:?}");
        }
        let answered_by_module = i64::from(info.lacking_kill_filter().is_some());
        assert_eq!(
            info_field(&mut admin, "maxage_compat_client_kill_calls"),
            Some(answered_by_module),
            "{info:?}"
        );
    }
}

/// What the suite expects of each server (harness::ServerInfo) agrees with what the module
/// found at load and with the server itself: which CLIENT KILL filters the module answers,
/// whether clients can set lib-name (Redis 7.2+, Valkey) and capa (Valkey 8+), and the module's
/// LIB-NAME and CAPA filters see what the server shows in CLIENT LIST (capa only from Valkey 9.0:
/// on 8.0 the CAPA filter matches nobody).
#[test]
fn the_module_and_the_server_agree_with_the_capability_table() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let info = server.info();
        assert_eq!(
            info.product == Product::Valkey,
            flavor == Flavor::Valkey,
            "{info:?}"
        );
        let log = server.log();
        let lacks = log.lines().find(|line| line.contains("CLIENT KILL lacks"));
        match info.lacking_kill_filter() {
            None => assert!(lacks.is_none(), "{info:?}: {lacks:?}"),
            Some(_) => {
                let lacks = lacks.unwrap_or_else(|| panic!("{info:?}: no 'lacks' line:\n{log}"));
                for keyword in ["MAXAGE", "NAME", "IDLE", "NOT-ID"] {
                    let listed = lacks.split([' ', ',']).any(|word| word == keyword);
                    assert_eq!(
                        listed,
                        !info.native_kill_filter(keyword),
                        "{info:?} {keyword}: {lacks}"
                    );
                }
            }
        }
        let mut admin = server.admin();
        let mut lib = server.idle_socket();
        let lib_id = raw_client_id(&mut lib);
        let reply = raw_command(&mut lib, &["CLIENT", "SETINFO", "LIB-NAME", "mylib"]);
        let mut capa = server.idle_socket();
        let capa_id = raw_client_id(&mut capa);
        let capa_reply = raw_command(&mut capa, &["CLIENT", "CAPA", "redirect"]);
        for (has, shown, reply, filter, id) in [
            (
                info.client_setinfo(),
                info.client_setinfo(),
                reply,
                ["LIB-NAME", "mylib"],
                lib_id,
            ),
            (
                info.client_capa(),
                info.client_list_capa(),
                capa_reply,
                ["CAPA", "r"],
                capa_id,
            ),
        ] {
            let listed = maxage_list_ids(&mut admin, &filter);
            if has {
                assert_eq!(reply, "+OK\r\n", "{info:?} {filter:?}");
                let expected = if shown { vec![id] } else { vec![] };
                assert_eq!(listed, expected, "{info:?} {filter:?}");
            } else {
                assert!(
                    reply.starts_with("-ERR unknown subcommand"),
                    "{info:?}: {reply}"
                );
                assert!(listed.is_empty(), "{info:?} {filter:?}: {listed:?}");
            }
        }
    }
}

/// On a server without the module APIs it needs (Redis 6.2: no SetCommandInfo, no module
/// configs) the module refuses with a log line, at startup (the server exits 1, not by a
/// signal) and on MODULE LOAD (an error reply; the server keeps running).
#[test]
fn refuses_to_load_on_a_server_too_old() {
    let Some(binary) = old_server() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("maxage-old-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log_path = dir.join("server.log");
    let start = |load: bool| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let _ = std::fs::remove_file(&log_path);
        let mut args = vec![
            "--port".to_string(),
            port.to_string(),
            "--bind".to_string(),
            "127.0.0.1".to_string(),
            "--save".to_string(),
            String::new(),
            "--dir".to_string(),
            dir.display().to_string(),
            "--logfile".to_string(),
            log_path.display().to_string(),
        ];
        if load {
            args.extend([
                "--loadmodule".to_string(),
                module_path().display().to_string(),
            ]);
        }
        let child = std::process::Command::new(&binary)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {binary:?}: {e}"));
        (child, port)
    };
    let refusal = "maxage: refusing to load: the server lacks the module API";
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let (mut child, _) = start(true);
    let mut status = None;
    assert!(wait_until(Duration::from_secs(10), || {
        status = child.try_wait().unwrap();
        status.is_some()
    }));
    let status = status.unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}:\n{}", log());
    assert!(log().contains(refusal), "{}", log());

    let (mut child, port) = start(false);
    let url = format!("redis://127.0.0.1:{port}/");
    let mut conn = None;
    assert!(wait_until(Duration::from_secs(10), || {
        conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .ok();
        conn.is_some()
    }));
    let mut conn = conn.unwrap();
    let module = module_path().display().to_string();
    let error = error_of(&mut conn, &["MODULE", "LOAD", &module]);
    assert!(error.starts_with("ERR"), "{error}");
    assert_eq!(run::<String>(&mut conn, &["PING"]).unwrap(), "PONG");
    assert!(child.try_wait().unwrap().is_none(), "the server died");
    assert!(log().contains(refusal), "{}", log());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
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
            // The rounds' pace over a fixed 3 s: the link must stay up through many max ages.
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
