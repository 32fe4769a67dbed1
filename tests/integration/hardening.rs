//! Inputs, settings and role changes that once crashed, hung or silently corrupted a server.
//! Each test reproduces the report against a real server and checks what must happen instead.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::harness::{
    BOTH, Product, Server, config_set, create_user, error_of, info_field, is_closed, login,
    raw_client_id, run, wait_until,
};

/// Encodes one command in RESP from raw byte arguments.
fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg);
        request.extend_from_slice(b"\r\n");
    }
    request
}

/// Sends raw byte arguments and returns the first chunk of the reply.
fn send(socket: &mut TcpStream, args: &[&[u8]]) -> String {
    socket.write_all(&resp(args)).expect("send");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let n = socket.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Each of these aborted redis-server 7.0.15 (signal 6): the crate's reply and config paths
/// turned the text into a C string with `unwrap`, and a character whose code is a multiple of
/// 256 (U+0100 'Ā') became a NUL byte. Every one must get an error in the server's words.
#[test]
fn client_bytes_in_errors_and_settings_never_abort_the_server() {
    let commands: &[(&[&[u8]], &str)] = &[
        (
            &[b"MAXAGE.KILL", b"TYPE", "Ā".as_bytes()],
            "-ERR Unknown client type",
        ),
        (
            &[b"CLIENT", b"KILL", b"TYPE", "Ā".as_bytes(), b"MAXAGE", b"1"],
            "-ERR Unknown client type",
        ),
        (
            &[b"MAXAGE.LIST", b"TYPE", "一".as_bytes()],
            "-ERR Unknown client type",
        ),
        (&[b"MAXAGE.PREVIEW", b"RULES", "Ā".as_bytes()], "-ERR rule"),
        (
            &[b"MAXAGE.KILL", b"FLAGS", "Ā".as_bytes()],
            "-ERR Unknown flags",
        ),
        (
            &[b"MAXAGE.KILL", b"TYPE", b"a\0b\r\nc"],
            "-ERR Unknown client type",
        ),
        (
            &[b"MAXAGE.KILL", b"USER", b"\xff\xfe\0"],
            "-ERR No such user",
        ),
        (
            &[b"MAXAGE.KILL", b"MAXAGE-MS", b"18446744073709552000"],
            "-ERR",
        ),
        (&[b"MAXAGE.KILL", b"LIMIT", b"-9223372036854775808"], "-ERR"),
        (
            &[b"MAXAGE.PREVIEW", b"MAX-AGE-MS", b"18446744073709552"],
            "-ERR",
        ),
        (&[b"MAXAGE.PREVIEW", b"WITHIN", "Ā".as_bytes()], "-ERR"),
        (
            &[b"CONFIG", b"SET", b"maxage.exempt-types", b"x\0"],
            "-ERR CONFIG SET failed",
        ),
        (
            &[b"CONFIG", b"SET", b"maxage.exempt-users", b"x\0"],
            "-ERR CONFIG SET failed",
        ),
        (
            &[b"CONFIG", b"SET", b"maxage.exempt-names", b"x\0"],
            "-ERR CONFIG SET failed",
        ),
        (
            &[b"CONFIG", b"SET", b"maxage.rules", b"type:normal=1\0"],
            "-ERR CONFIG SET failed",
        ),
        (
            &[b"CONFIG", b"SET", b"maxage.rules", "name:Ā=1x".as_bytes()],
            "-ERR CONFIG SET failed",
        ),
        (
            &[b"CONFIG", b"SET", b"maxage.exempt-names", b"\xff"],
            "-ERR CONFIG SET failed",
        ),
        (
            &[b"CONFIG", b"SET", b"maxage.exempt-types", "Ā".as_bytes()],
            "-ERR CONFIG SET failed",
        ),
    ];
    for flavor in BOTH {
        let mut server = Server::start(flavor);
        let mut socket = server.idle_socket();
        for (args, expected) in commands {
            let reply = send(&mut socket, args);
            assert!(
                reply.starts_with(expected),
                "{flavor:?} {args:?}: {reply:?}"
            );
            // One line: nothing in the value ended the error early or forged a second reply.
            assert_eq!(reply.matches("\r\n").count(), 1, "{flavor:?} {reply:?}");
            assert!(server.alive(), "{flavor:?}: {args:?} killed the server");
        }
        // 100,000 arguments of junk.
        let junk: Vec<Vec<u8>> = (0..100_000u32)
            .map(|i| match i % 4 {
                0 => b"NOT-ID".to_vec(),
                1 => i.to_string().into_bytes(),
                2 => "Ā".as_bytes().to_vec(),
                _ => vec![0, 255, b'\r'],
            })
            .collect();
        let mut args: Vec<&[u8]> = vec![b"MAXAGE.KILL"];
        args.extend(junk.iter().map(Vec::as_slice));
        assert!(send(&mut socket, &args).starts_with("-ERR"), "{flavor:?}");
        let mut admin = server.conn();
        assert_eq!(run::<String>(&mut admin, &["PING"]).unwrap(), "PONG");
        // The refused values left the old ones in place, and they read back fine.
        let types: Vec<String> =
            run(&mut admin, &["CONFIG", "GET", "maxage.exempt-types"]).unwrap();
        assert_eq!(types[1], "master replica no-evict", "{flavor:?}");
        let all: Vec<String> = run(&mut admin, &["CONFIG", "GET", "maxage.*"]).unwrap();
        let example = include_str!("../../conf/maxage.conf");
        let settings = example.lines().filter(|l| l.starts_with("maxage.")).count();
        assert_eq!(all.len(), 2 * settings, "{flavor:?}: {all:?}");
        assert!(server.alive());
    }
}

/// Load arguments with bytes a C string cannot hold refuse the load with a reason instead of
/// aborting at startup.
#[test]
fn load_arguments_with_any_bytes_refuse_cleanly() {
    for flavor in BOTH {
        let mut server = Server::builder(flavor).without_module().start();
        let mut socket = server.idle_socket();
        let module = crate::harness::module_path();
        let path = module.to_str().unwrap().as_bytes();
        for (name, value) in [
            (&b"exempt-users"[..], &b"ops\0x"[..]),
            (b"rules", "type:normal=18446744073709552".as_bytes()),
            (b"max-age-ms", b"-1"),
            (b"\xff\0", b"1"),
            (b"mode", "Ā".as_bytes()),
        ] {
            let reply = send(&mut socket, &[b"MODULE", b"LOAD", path, name, value]);
            assert!(reply.starts_with("-ERR"), "{flavor:?}: {reply}");
            assert!(server.alive(), "{flavor:?}");
        }
        assert!(server.log().contains("maxage: refusing to load"));
        // Nothing of a refused load is left behind: clients come and go (a leftover event
        // listener crashed the server on the next disconnect), and where the server lacks
        // CLIENT KILL MAXAGE no filter answers it.
        for _ in 0..20 {
            drop(server.idle_socket());
        }
        let mut admin = server.conn();
        assert_eq!(run::<String>(&mut admin, &["PING"]).unwrap(), "PONG");
        if !server.info().native_kill_maxage() {
            assert!(error_of(&mut admin, &["CLIENT", "KILL", "MAXAGE", "1"]).contains("syntax"));
        }
        let reply = send(&mut socket, &[b"MODULE", b"LOAD", path]);
        assert!(reply.starts_with("+OK"), "{flavor:?}: {reply}");
    }
}

fn replication_info(conn: &mut redis::Connection) -> String {
    run(conn, &["INFO", "replication"]).unwrap()
}

fn dbsize(conn: &mut redis::Connection) -> i64 {
    run(conn, &["DBSIZE"]).unwrap()
}

/// `MAXAGE.KILL TYPE master` on a replica whose `default` user is restricted: the module API's
/// close resets the master client's user to `default`, and after the partial resync every
/// replicated write was refused by ACL (master 22 keys, replica 2, link "up"). The link must
/// be closed the way `CLIENT KILL` closes it, so it keeps its rights.
#[test]
fn killing_the_master_link_keeps_replication_applying_writes() {
    for flavor in BOTH {
        let master = Server::start(flavor);
        let replica = Server::builder(flavor)
            .module_args(&["max-age-ms", "200", "jitter-pct", "0"])
            .config(&format!("replicaof 127.0.0.1 {}", master.port))
            .start();
        let mut replica_admin = replica.conn();
        create_user(&mut replica_admin, "operator", &["+@all"]);
        run::<()>(
            &mut replica_admin,
            &[
                "ACL",
                "SETUSER",
                "default",
                "on",
                "nopass",
                "-@all",
                "+@connection",
            ],
        )
        .unwrap();
        let mut operator = login(&replica, "operator");
        run::<()>(&mut operator, &["CLIENT", "NO-EVICT", "on"]).unwrap();
        let link_up =
            |conn: &mut redis::Connection| replication_info(conn).contains("master_link_status:up");
        assert!(wait_until(Duration::from_secs(10), || link_up(
            &mut operator
        )));
        let mut writer = master.conn();
        for round in 0..3 {
            for key in 0..10 {
                run::<()>(&mut writer, &["SET", &format!("k{round}-{key}"), "v"]).unwrap();
            }
            let killed: i64 = run(&mut operator, &["MAXAGE.KILL", "TYPE", "master"]).unwrap();
            assert_eq!(killed, 1, "{flavor:?} round {round}");
            assert!(wait_until(Duration::from_secs(10), || link_up(
                &mut operator
            )));
            for key in 10..20 {
                run::<()>(&mut writer, &["SET", &format!("k{round}-{key}"), "v"]).unwrap();
            }
            let expected = dbsize(&mut writer);
            assert!(
                wait_until(Duration::from_secs(5), || dbsize(&mut operator) == expected),
                "{flavor:?} round {round}: master {expected} keys, replica {}",
                dbsize(&mut operator)
            );
        }
        let denials: Vec<redis::Value> = run(&mut operator, &["ACL", "LOG"]).unwrap();
        assert!(denials.is_empty(), "{flavor:?}: ACL LOG {denials:?}");
        // Enforcement never touches the link, even when `master` is not exempt: the server
        // announces neither its connect nor its disconnect, so it is not tracked.
        config_set(&mut operator, "maxage.exempt-types", "replica no-evict");
        let syncs_before = replication_info(&mut operator);
        // A fixed time on purpose: the link must stay up through these 800 ms, four of the
        // replica's 200 ms max ages.
        sleep(Duration::from_millis(800));
        run::<()>(&mut writer, &["SET", "after", "v"]).unwrap();
        assert!(wait_until(Duration::from_secs(5), || {
            run::<Option<String>>(&mut operator, &["GET", "after"]).unwrap() == Some("v".into())
        }));
        let offset_line = |info: &str| {
            info.lines()
                .find(|l| l.starts_with("master_link_down_since_seconds"))
                .map(str::to_string)
        };
        assert_eq!(
            offset_line(&syncs_before),
            offset_line(&replication_info(&mut operator)),
            "{flavor:?}"
        );
    }
}

/// An application user defined the usual way may not list or retire other clients: every
/// module command needs the rights of the server command that does the same, and a denial
/// lands in `ACL LOG` as the server's own do.
#[test]
fn application_users_get_noperm_and_an_acl_log_entry() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.conn();
        create_user(&mut admin, "app", &["+@all", "-@admin", "-@dangerous"]);
        // Allowed the module command by name, but not CLIENT KILL / CLIENT LIST.
        create_user(
            &mut admin,
            "narrow",
            &["-@all", "+maxage.kill", "+maxage.list", "+maxage.preview"],
        );
        run::<()>(&mut admin, &["ACL", "LOG", "RESET"]).unwrap();
        for user in ["app", "narrow"] {
            let mut conn = login(&server, user);
            for command in [
                &["MAXAGE.KILL", "MAXAGE-MS", "0"][..],
                &["MAXAGE.LIST"],
                &["MAXAGE.PREVIEW"],
            ] {
                let error = error_of(&mut conn, command);
                assert!(
                    error.contains("NOPERM"),
                    "{flavor:?} {user} {command:?}: {error}"
                );
            }
            assert!(
                error_of(&mut conn, &["CLIENT", "KILL", "MAXAGE", "1"]).contains("NOPERM"),
                "{flavor:?} {user}"
            );
        }
        let log: Vec<Vec<redis::Value>> = run(&mut admin, &["ACL", "LOG"]).unwrap();
        let text = format!("{log:?}");
        assert!(log.len() >= 2, "{flavor:?}: {text}");
        assert!(text.contains("narrow"), "{flavor:?}: {text}");
        // Where the server has ACL categories, the commands are in them.
        let categorized: Vec<String> = run(
            &mut admin,
            &["COMMAND", "LIST", "FILTERBY", "ACLCAT", "dangerous"],
        )
        .unwrap();
        let has_categories = categorized.iter().any(|c| c == "maxage.kill");
        let info = server.info();
        let server_has_categories = info.product == Product::Valkey || info.version >= (7, 2, 0);
        assert_eq!(
            has_categories, server_has_categories,
            "{flavor:?}: {categorized:?}"
        );
        // An operator keeps every right.
        let killed: i64 = run(&mut admin, &["MAXAGE.KILL", "MAXAGE-MS", "999999999"]).unwrap();
        assert_eq!(killed, 0);
    }
}

/// A huge per-class max age (`type:normal=18446744073709552`) made `wake_ms * 1000` wrap and
/// the timer fire ~45,000 times a second. Rule values now have max-age-ms's bounds, and the
/// largest allowed one arms one wake-up, far away.
#[test]
fn huge_max_ages_neither_wrap_nor_spin() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.admin();
        config_set(&mut admin, "maxage.jitter-pct", "0");
        let error = error_of(
            &mut admin,
            &[
                "CONFIG",
                "SET",
                "maxage.rules",
                "type:normal=18446744073709552",
            ],
        );
        assert!(error.contains("from 0 to 315360000000"), "{error}");
        config_set(&mut admin, "maxage.rules", "type:normal=315360000000");
        config_set(&mut admin, "maxage.max-age-ms", "315360000000");
        // Tracked, and its one wake-up armed far away.
        let _idle = server.idle_sockets_tracked(&mut admin, 1, 1);
        assert!(
            wait_until(Duration::from_secs(5), || {
                info_field(&mut admin, "maxage_next_deadline_in_ms")
                    .is_some_and(|next| next > 315_000_000_000)
            }),
            "{flavor:?}: next deadline {:?}",
            info_field(&mut admin, "maxage_next_deadline_in_ms")
        );
        let wakeups_before = info_field(&mut admin, "maxage_wakeups").unwrap();
        // A fixed time on purpose: the test counts the wake-ups of one second.
        sleep(Duration::from_millis(1000));
        let wakeups = info_field(&mut admin, "maxage_wakeups").unwrap() - wakeups_before;
        assert!(wakeups <= 2, "{flavor:?}: {wakeups} wake-ups in a second");
        let next = info_field(&mut admin, "maxage_next_deadline_in_ms").unwrap();
        assert!(next > 315_000_000_000, "{flavor:?}: {next}");
    }
}

/// `SKIPME no` closes the caller exactly like the server's `CLIENT KILL`: the reply is
/// written, then the connection closes, and nothing pipelined behind the command runs (the
/// module used to poll the caller's output buffer and let pipelined commands through).
#[test]
fn skipme_no_closes_the_caller_after_its_reply_and_runs_nothing_behind_it() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut socket = server.idle_socket();
        let id = raw_client_id(&mut socket).to_string();
        let mut pipeline = resp(&[b"MAXAGE.KILL", b"ID", id.as_bytes(), b"SKIPME", b"no"]);
        pipeline.extend(resp(&[b"SET", b"ran-after-kill", b"yes"]));
        socket.write_all(&pipeline).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut reply = Vec::new();
        let started = Instant::now();
        let _ = socket.read_to_end(&mut reply);
        assert_eq!(String::from_utf8_lossy(&reply), ":1\r\n", "{flavor:?}");
        assert!(started.elapsed() < Duration::from_millis(500), "{flavor:?}");
        let mut admin = server.conn();
        let exists: i64 = run(&mut admin, &["EXISTS", "ran-after-kill"]).unwrap();
        assert_eq!(exists, 0, "{flavor:?}: the pipelined command ran");
        // The compatibility form behaves the same.
        let mut socket = server.idle_socket();
        let id = raw_client_id(&mut socket).to_string();
        // A fixed time on purpose: the client ages past the 1 ms the kill asks for.
        sleep(Duration::from_millis(5));
        let mut pipeline = resp(&[
            b"CLIENT",
            b"KILL",
            b"ID",
            id.as_bytes(),
            b"MAXAGE-MS",
            b"1",
            b"SKIPME",
            b"no",
        ]);
        pipeline.extend(resp(&[b"SET", b"ran-after-kill", b"yes"]));
        socket.write_all(&pipeline).unwrap();
        let mut reply = Vec::new();
        let _ = socket.read_to_end(&mut reply);
        assert_eq!(String::from_utf8_lossy(&reply), ":1\r\n", "{flavor:?}");
        let exists: i64 = run(&mut admin, &["EXISTS", "ran-after-kill"]).unwrap();
        assert_eq!(exists, 0, "{flavor:?}");
    }
}

/// Two kills in one event-loop pass (pipelined) see the same clients still listed, being
/// closed: the second must not close, count or log them again (the server's own CLIENT KILL
/// frees them at once, so its second call finds none).
#[test]
fn a_client_is_retired_once_even_when_two_kills_meet_it_in_one_pass() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut victims: Vec<TcpStream> = (0..5).map(|_| server.idle_socket()).collect();
        let mut admin = server.admin();
        assert!(wait_until(Duration::from_secs(2), || {
            info_field(&mut admin, "maxage_tracked_clients") == Some(6)
        }));
        let mut socket = server.idle_socket();
        let _ = raw_client_id(&mut socket);
        let kill: &[&[u8]] = &[b"MAXAGE.KILL", b"TYPE", b"normal", b"NOT-FLAGS", b"e"];
        let mut pipeline = resp(kill);
        pipeline.extend(resp(kill));
        socket.write_all(&pipeline).unwrap();
        let mut reply = vec![0u8; 64];
        let mut got = String::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while got.matches("\r\n").count() < 2 && Instant::now() < deadline {
            let n = socket.read(&mut reply).unwrap_or(0);
            got.push_str(&String::from_utf8_lossy(&reply[..n]));
        }
        assert_eq!(got, ":5\r\n:0\r\n", "{flavor:?}");
        assert!(wait_until(Duration::from_secs(2), || victims
            .iter_mut()
            .all(is_closed)));
        assert_eq!(info_field(&mut admin, "maxage_evicted_manual"), Some(5));
        let logged = server.log().matches("reason=manual").count();
        assert_eq!(logged, 5, "{flavor:?}");
    }
}

/// Lowering the max age on a long-running server makes every old client overdue by far more
/// than the slack at once. Pacing must still spread them (the slack counts from when pacing
/// began holding them back), instead of closing them all in one go.
#[test]
fn lowering_the_max_age_on_old_clients_is_paced() {
    let _alone = crate::harness::exclusive();
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&[
                "max-evictions-per-sec",
                "100",
                "max-overdue-ms",
                "2000",
                "jitter-pct",
                "0",
            ])
            .start();
        let mut admin = server.admin();
        let mut sockets: Vec<TcpStream> = (0..300).map(|_| server.idle_socket()).collect();
        // A fixed time on purpose: the clients age 3 s under a max age of 300 s.
        sleep(Duration::from_millis(3000));
        // Every client is now ~2.5 s past the new deadline, beyond the 2 s slack.
        config_set(&mut admin, "maxage.max-age-ms", "500");
        let set_at = Instant::now();
        // A fixed time on purpose: the test counts the retirements of the first second.
        sleep(Duration::from_millis(1000));
        let retired = info_field(&mut admin, "maxage_evicted_max_age").unwrap();
        assert!(
            (60..=160).contains(&retired),
            "{flavor:?}: {retired} retired in the first second at 100/s"
        );
        assert!(wait_until(Duration::from_secs(6), || sockets
            .iter_mut()
            .all(is_closed)));
        let all_closed = set_at.elapsed();
        assert!(
            all_closed < Duration::from_millis(3500),
            "{flavor:?}: the slack did not end the wait: {all_closed:?}"
        );
    }
}

/// A setting persisted with CONFIG SET + CONFIG REWRITE is what the server runs with after a
/// restart, even when the `loadmodule` line gives another value: load arguments are the
/// registered defaults, and the config file wins over them.
#[test]
fn config_rewrite_wins_over_load_arguments_after_a_restart() {
    for flavor in BOTH {
        let mut server = Server::builder(flavor)
            .module_args(&["max-age-ms", "300000", "exempt-names", "batch-*"])
            .start();
        let mut admin = server.conn();
        config_set(&mut admin, "maxage.max-age-ms", "120000");
        // Back to the table's default, which differs from the loaded one.
        config_set(&mut admin, "maxage.exempt-names", "");
        config_set(&mut admin, "maxage.jitter-pct", "25");
        run::<()>(&mut admin, &["CONFIG", "REWRITE"]).unwrap();
        server.restart();
        let mut admin = server.conn();
        let get = |conn: &mut redis::Connection, name: &str| -> String {
            let pair: Vec<String> = run(conn, &["CONFIG", "GET", name]).unwrap();
            pair[1].clone()
        };
        assert_eq!(get(&mut admin, "maxage.max-age-ms"), "120000", "{flavor:?}");
        assert_eq!(get(&mut admin, "maxage.exempt-names"), "", "{flavor:?}");
        assert_eq!(get(&mut admin, "maxage.jitter-pct"), "25", "{flavor:?}");
        // A setting nobody changed keeps the load argument's value.
        let mut fresh = Server::builder(flavor)
            .module_args(&["max-age-ms", "300000"])
            .start();
        let mut conn = fresh.conn();
        run::<()>(&mut conn, &["CONFIG", "REWRITE"]).unwrap();
        fresh.restart();
        let mut conn = fresh.conn();
        assert_eq!(get(&mut conn, "maxage.max-age-ms"), "300000", "{flavor:?}");
    }
}
