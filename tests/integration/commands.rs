//! MAXAGE.KILL and MAXAGE.LIST on both servers: ages, DRYRUN, LIMIT, SKIPME, every filter,
//! every error, ACL and command metadata.

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::thread::sleep;
use std::time::Duration;

use crate::harness::*;

fn ids_of(sockets: &mut [TcpStream]) -> BTreeSet<u64> {
    sockets.iter_mut().map(raw_client_id).collect()
}

/// The "done when": 20 clients older than 1.2 s and 10 younger; MAXAGE-MS 1000 kills
/// exactly the 20, and DRYRUN kills none.
#[test]
fn kill_by_age_in_milliseconds_takes_exactly_the_old_clients() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.conn();
        let mut old: Vec<TcpStream> = (0..20).map(|_| server.idle_socket()).collect();
        let old_ids = ids_of(&mut old);
        // A fixed time on purpose: the old clients age past 1.2 s.
        sleep(Duration::from_millis(1250));
        let mut young: Vec<TcpStream> = (0..10).map(|_| server.idle_socket()).collect();
        let young_ids = ids_of(&mut young);

        let would: i64 = run(&mut admin, &["MAXAGE.KILL", "MAXAGE-MS", "1000", "DRYRUN"]).unwrap();
        assert_eq!(would, 20, "{flavor:?} DRYRUN count");
        let listed: BTreeSet<u64> = listed_ids(&mut admin).into_iter().collect();
        assert!(
            listed.is_superset(&old_ids),
            "{flavor:?}: DRYRUN killed someone"
        );

        let killed: i64 = run(&mut admin, &["MAXAGE.KILL", "MAXAGE-MS", "1000"]).unwrap();
        assert_eq!(killed, 20, "{flavor:?}");
        assert!(wait_until(Duration::from_secs(2), || old
            .iter_mut()
            .all(is_closed)));
        let listed: BTreeSet<u64> = listed_ids(&mut admin).into_iter().collect();
        assert!(listed.is_disjoint(&old_ids), "{flavor:?}");
        assert!(listed.is_superset(&young_ids), "{flavor:?}");
        assert!(young.iter_mut().all(|s| !is_closed(s)));
        assert_eq!(info_field(&mut admin, "maxage_evicted_manual"), Some(20));
        assert!(server.log().contains("reason=manual"));
    }
}

#[test]
fn maxage_in_seconds_and_limit_oldest_first() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut oldest = server.idle_socket();
        let oldest_id = raw_client_id(&mut oldest);
        // Fixed times on purpose: the clients age (1.3 s and 0.7 s).
        sleep(Duration::from_millis(600));
        let mut middle = server.idle_socket();
        let middle_id = raw_client_id(&mut middle);
        sleep(Duration::from_millis(700));
        // Connected last, so the admin is the youngest and LIST's oldest-first order is clear.
        let mut admin = server.conn();
        // Only the oldest has lived a full second (1.3 s against 0.7 s).
        let would: i64 = run(&mut admin, &["MAXAGE.KILL", "MAXAGE", "1", "DRYRUN"]).unwrap();
        assert_eq!(would, 1, "{flavor:?}");
        let killed: i64 = run(
            &mut admin,
            &["MAXAGE.KILL", "MAXAGE-MS", "100", "LIMIT", "1"],
        )
        .unwrap();
        assert_eq!(killed, 1);
        assert!(wait_until(Duration::from_secs(2), || is_closed(
            &mut oldest
        )));
        assert!(!is_closed(&mut middle));
        let remaining = maxage_list_ids(&mut admin, &[]);
        assert_eq!(
            remaining.first(),
            Some(&middle_id),
            "{flavor:?} oldest first"
        );
        assert!(!remaining.contains(&oldest_id));
    }
}

#[test]
fn skipme_spares_the_caller_by_default_and_closes_it_after_the_reply_when_told() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut caller = server.idle_socket();
        let caller_id = raw_client_id(&mut caller).to_string();
        let reply = raw_command(&mut caller, &["MAXAGE.KILL", "ID", &caller_id]);
        assert_eq!(reply, ":0\r\n", "{flavor:?}");
        let reply = raw_command(
            &mut caller,
            &["MAXAGE.KILL", "ID", &caller_id, "SKIPME", "no"],
        );
        assert_eq!(
            reply, ":1\r\n",
            "{flavor:?}: the caller gets its reply first"
        );
        assert!(wait_until(Duration::from_secs(2), || is_closed(
            &mut caller
        )));
        let mut admin = server.conn();
        assert!(!listed_ids(&mut admin).contains(&caller_id.parse().unwrap()));
    }
}

#[test]
fn list_reports_fields_oldest_first_in_resp2_and_resp3() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut first = server.idle_socket();
        raw_command(&mut first, &["CLIENT", "SETNAME", "first"]);
        // A fixed time on purpose: `first` is clearly older than `second`.
        sleep(Duration::from_millis(50));
        let mut second = server.idle_socket();
        raw_command(&mut second, &["SELECT", "3"]);
        let mut admin = server.conn();
        let admin_id = client_id(&mut admin).to_string();
        let entries: Vec<Vec<redis::Value>> =
            run(&mut admin, &["MAXAGE.LIST", "NOT-ID", &admin_id]).unwrap();
        assert_eq!(entries.len(), 2, "{flavor:?}");
        let keys: Vec<String> = entries[0]
            .iter()
            .step_by(2)
            .map(|k| redis::from_redis_value(k.clone()).unwrap())
            .collect();
        for expected in [
            "id",
            "addr",
            "laddr",
            "name",
            "user",
            "type",
            "db",
            "age-ms",
            "age-approximate",
            "deadline-in-ms",
        ] {
            assert!(
                keys.iter().any(|k| k == expected),
                "{flavor:?} missing {expected}"
            );
        }
        let field = |entry: &Vec<redis::Value>, key: &str| -> redis::Value {
            let at = entry
                .iter()
                .position(|v| *v == redis::Value::BulkString(key.as_bytes().to_vec()))
                .unwrap();
            entry[at + 1].clone()
        };
        assert_eq!(
            field(&entries[0], "name"),
            redis::Value::BulkString(b"first".to_vec())
        );
        assert_eq!(field(&entries[1], "db"), redis::Value::Int(3));
        assert_eq!(
            field(&entries[0], "type"),
            redis::Value::BulkString(b"normal".to_vec())
        );
        assert_eq!(field(&entries[0], "age-approximate"), redis::Value::Int(0));
        assert_eq!(field(&entries[0], "deadline-in-ms"), redis::Value::Nil);
        let age = |entry: &Vec<redis::Value>| match field(entry, "age-ms") {
            redis::Value::Int(ms) => ms,
            other => panic!("{other:?}"),
        };
        assert!(
            age(&entries[0]) >= age(&entries[1]) + 40,
            "{flavor:?} oldest first"
        );

        // RESP3 clients get real maps.
        let mut resp3 = server.idle_socket();
        raw_command(&mut resp3, &["HELLO", "3"]);
        let reply = raw_command(&mut resp3, &["MAXAGE.LIST", "NAME", "first"]);
        assert!(reply.starts_with("*1\r\n%16\r\n"), "{flavor:?}: {reply:?}");
    }
}

/// Every malformed call gets the server's own words and kills nothing.
#[test]
fn bad_input_is_refused_in_the_servers_words_and_changes_nothing() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["MAXAGE.KILL"],
            "ERR wrong number of arguments for 'maxage.kill' command",
        ),
        (&["MAXAGE.KILL", "BOGUS", "1"], "ERR syntax error"),
        (&["MAXAGE.KILL", "MAXAGE"], "ERR syntax error"),
        (&["MAXAGE.KILL", "MAXAGE", "1", "extra"], "ERR syntax error"),
        (
            &["MAXAGE.KILL", "MAXAGE", "soon"],
            "ERR maxage is not an integer or out of range",
        ),
        (
            &["MAXAGE.KILL", "MAXAGE", "-1"],
            "ERR maxage should be greater than 0",
        ),
        (
            &["MAXAGE.KILL", "MAXAGE-MS", "-1"],
            "ERR maxage-ms should be greater than 0",
        ),
        (
            &["MAXAGE.KILL", "MAXAGE-MS", "1.5"],
            "ERR maxage-ms is not an integer or out of range",
        ),
        (
            &["MAXAGE.KILL", "IDLE", "0"],
            "ERR idle should be greater than 0",
        ),
        (
            &["MAXAGE.KILL", "LIMIT", "0"],
            "ERR limit should be greater than 0",
        ),
        (
            &["MAXAGE.KILL", "TYPE", "robot"],
            "ERR Unknown client type 'robot'",
        ),
        (
            &["MAXAGE.KILL", "USER", "nobody"],
            "ERR No such user 'nobody'",
        ),
        (
            &["MAXAGE.KILL", "ID", "0"],
            "ERR client-id should be greater than 0",
        ),
        (&["MAXAGE.KILL", "ID", "abc"], "ERR syntax error"),
        (&["MAXAGE.KILL", "SKIPME", "maybe"], "ERR syntax error"),
        (
            &["MAXAGE.KILL", "FLAGS", "w"],
            "ERR Unknown flags found in the provided filter: w",
        ),
        (
            &["MAXAGE.KILL", "DB", "99"],
            "ERR DB number should be between 0 and 15",
        ),
        (
            &["MAXAGE.KILL", "NOT-CAPA", "q"],
            "ERR Unknown capa found in the NOT-CAPA filter: q",
        ),
        (&["MAXAGE.LIST", "DRYRUN"], "ERR syntax error"),
        (&["MAXAGE.LIST", "NAME"], "ERR syntax error"),
    ];
    for flavor in BOTH {
        let mut server = Server::start(flavor);
        let mut bystander = server.idle_socket();
        let mut admin = server.conn();
        for (words, expected) in cases {
            assert_eq!(
                error_of(&mut admin, words),
                *expected,
                "{flavor:?} {words:?}"
            );
        }
        assert!(
            !is_closed(&mut bystander),
            "{flavor:?}: a refused call killed someone"
        );
        assert_eq!(
            info_field(&mut admin, "maxage_evicted_connections"),
            Some(0)
        );
        assert!(server.alive());
    }
}

#[test]
fn acl_user_without_the_commands_gets_noperm() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.conn();
        // Redis 7.0 cannot put module commands in ACL categories: deny them by name.
        create_user(
            &mut admin,
            "app",
            &["+@all", "-maxage.kill", "-maxage.list"],
        );
        create_user(&mut admin, "reader", &["-@all", "+get"]);
        let mut sessions = Vec::new();
        for user in ["app", "reader"] {
            let mut limited = login(&server, user);
            for command in [&["MAXAGE.KILL", "MAXAGE", "1"][..], &["MAXAGE.LIST"][..]] {
                let error = error_of(&mut limited, command);
                assert!(
                    error.starts_with("NOPERM"),
                    "{flavor:?} {user} {command:?}: {error}"
                );
            }
            sessions.push(limited);
        }
        assert_eq!(
            run::<i64>(&mut admin, &["MAXAGE.KILL", "USER", "app", "DRYRUN"]).unwrap(),
            1
        );
    }
}

#[test]
fn command_info_has_arity_flags_and_no_keys() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.conn();
        for (name, arity) in [("maxage.kill", -2), ("maxage.list", -1)] {
            let info: Vec<Vec<redis::Value>> = run(&mut admin, &["COMMAND", "INFO", name]).unwrap();
            let entry = &info[0];
            assert_eq!(entry[1], redis::Value::Int(arity), "{flavor:?} {name}");
            let flags: Vec<String> = redis::from_redis_value(entry[2].clone()).unwrap();
            assert!(flags.contains(&"admin".to_string()), "{flavor:?} {flags:?}");
            assert!(
                flags.contains(&"noscript".to_string()),
                "{flavor:?} {flags:?}"
            );
            assert_eq!(entry[3], redis::Value::Int(0), "first key");
            assert_eq!(entry[4], redis::Value::Int(0), "last key");
        }
        let error = error_of(
            &mut admin,
            &["EVAL", "return redis.call('MAXAGE.LIST')", "0"],
        );
        assert!(
            error.contains("not allowed from script"),
            "{flavor:?}: {error}"
        );
    }
}

/// Each filter and its NOT- form on a small known population (Redis 7.0 lacks lib-name, capa).
#[test]
fn every_filter_and_not_form_on_both_servers() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.conn();
        create_user(&mut admin, "alice", &["+@all"]);
        let mut named = server.idle_socket();
        raw_command(&mut named, &["CLIENT", "SETNAME", "web-1"]);
        let mut in_db3 = server.idle_socket();
        raw_command(&mut in_db3, &["SELECT", "3"]);
        let mut alice = server.idle_socket();
        raw_command(&mut alice, &["AUTH", "alice", "pw"]);
        let mut subscriber = server.idle_socket();
        raw_command(&mut subscriber, &["SUBSCRIBE", "news"]);
        let mut in_multi = server.idle_socket();
        raw_command(&mut in_multi, &["MULTI"]);
        let mut no_evict = server.idle_socket();
        raw_command(&mut no_evict, &["CLIENT", "NO-EVICT", "on"]);
        let named_id = raw_client_id(&mut named);
        let db3_id = raw_client_id(&mut in_db3);
        let alice_id = raw_client_id(&mut alice);
        let multi_id = in_multi_id(&mut admin, &mut in_multi);
        let subscriber_id = id_by_flag(&mut admin, 'P');
        let no_evict_id = raw_client_id(&mut no_evict);
        let admin_id = client_id(&mut admin);
        let everyone: BTreeSet<u64> = [
            named_id,
            db3_id,
            alice_id,
            subscriber_id,
            multi_id,
            no_evict_id,
            admin_id,
        ]
        .into();
        let addr_of_named = addr_of(&mut admin, named_id);

        let cases: Vec<(Vec<String>, BTreeSet<u64>)> = vec![
            (words(&["NAME", "web-1"]), [named_id].into()),
            (words(&["DB", "3"]), [db3_id].into()),
            (words(&["USER", "alice"]), [alice_id].into()),
            (words(&["TYPE", "pubsub"]), [subscriber_id].into()),
            (words(&["FLAGS", "x"]), [multi_id].into()),
            (words(&["FLAGS", "e"]), [no_evict_id].into()),
            (
                words(&["ID", &named_id.to_string(), &db3_id.to_string()]),
                [named_id, db3_id].into(),
            ),
            (words(&["ADDR", &addr_of_named]), [named_id].into()),
            (words(&["IP", "127.0.0.1"]), everyone.clone()),
            (
                words(&["LADDR", &format!("127.0.0.1:{}", server.port)]),
                everyone.clone(),
            ),
            (words(&["TYPE", "master"]), BTreeSet::new()),
            (words(&["LIB-NAME", "no-such-lib"]), BTreeSet::new()),
        ];
        for (filter, expected) in cases {
            let mut args: Vec<&str> = filter.iter().map(String::as_str).collect();
            let got: BTreeSet<u64> = maxage_list_ids(&mut admin, &args).into_iter().collect();
            assert_eq!(got, expected, "{flavor:?} {args:?}");
            let negated = format!("NOT-{}", args[0]);
            args[0] = &negated;
            let got: BTreeSet<u64> = maxage_list_ids(&mut admin, &args).into_iter().collect();
            let complement: BTreeSet<u64> = everyone.difference(&expected).copied().collect();
            assert_eq!(got, complement, "{flavor:?} {args:?}");
        }
        // IDLE counts whole seconds and a slow machine may spend one on the cases above, so
        // only a bound no client can reach here is timing-free.
        let idle: BTreeSet<u64> = maxage_list_ids(&mut admin, &["IDLE", "3600"])
            .into_iter()
            .collect();
        assert!(idle.is_empty(), "{flavor:?}: nobody has been idle an hour");
        // SKIPME no on LIST is the default; on KILL the default spares the caller.
        assert_eq!(
            run::<i64>(&mut admin, &["MAXAGE.KILL", "DRYRUN"]).unwrap() as usize,
            everyone.len() - 1
        );
        assert_eq!(
            run::<i64>(&mut admin, &["MAXAGE.KILL", "DRYRUN", "SKIPME", "no"]).unwrap() as usize,
            everyone.len()
        );
    }
}

fn words(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn addr_of(admin: &mut redis::Connection, id: u64) -> String {
    let list: String = run(admin, &["CLIENT", "LIST", "ID", &id.to_string()]).unwrap();
    list.split(' ')
        .find_map(|f| f.strip_prefix("addr="))
        .unwrap()
        .to_string()
}

fn id_by_flag(admin: &mut redis::Connection, flag: char) -> u64 {
    let list: String = run(admin, &["CLIENT", "LIST"]).unwrap();
    list.lines()
        .find(|line| {
            line.split(' ')
                .find_map(|f| f.strip_prefix("flags="))
                .is_some_and(|flags| flags.contains(flag))
        })
        .and_then(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .unwrap()
        .parse()
        .unwrap()
}

/// A client in MULTI queues `CLIENT ID` instead of answering it, so find it by its flag.
fn in_multi_id(admin: &mut redis::Connection, _socket: &mut TcpStream) -> u64 {
    id_by_flag(admin, 'x')
}

/// How often the server has run `CLIENT LIST` (the module's calls count too).
fn client_list_calls(conn: &mut redis::Connection) -> u64 {
    let stats: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_client|list:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

/// Filters of ids and ages are answered from the module's registry: the kill touches only the
/// clients it selects, with no `CLIENT LIST` of everyone (only each logged audit line lists its
/// one client); other filters need one.
#[test]
fn kills_by_id_and_age_take_no_client_list() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["max-age-ms", "0"])
            .start();
        let mut admin = server.admin();
        let mut idle = server.idle_sockets_tracked(&mut admin, 20, 1);
        // A fixed time on purpose: the clients age past the 1 ms the kills ask for.
        sleep(Duration::from_millis(20));
        let before = client_list_calls(&mut admin);
        let counted: i64 = run(&mut admin, &["MAXAGE.KILL", "MAXAGE-MS", "1", "DRYRUN"]).unwrap();
        assert_eq!(counted, 20, "{flavor:?}");
        assert_eq!(client_list_calls(&mut admin), before, "{flavor:?}");
        let killed: i64 =
            run(&mut admin, &["MAXAGE.KILL", "MAXAGE-MS", "1", "LIMIT", "5"]).unwrap();
        assert_eq!(killed, 5, "{flavor:?}");
        // Only the audit line of each looks its one client up (`CLIENT LIST ID <id>`).
        assert!(client_list_calls(&mut admin) <= before + 5, "{flavor:?}");
        assert!(wait_until(Duration::from_secs(3), || {
            idle.iter_mut()
                .map(is_closed)
                .filter(|closed| *closed)
                .count()
                == 5
        }));
        assert_eq!(info_field(&mut admin, "maxage_evicted_manual"), Some(5));
        // A kill later in the same pass does not count the ones being closed again.
        let again: Vec<redis::Value> = redis::pipe()
            .cmd("MAXAGE.KILL")
            .arg("MAXAGE-MS")
            .arg("1")
            .arg("LIMIT")
            .arg("3")
            .cmd("MAXAGE.KILL")
            .arg("MAXAGE-MS")
            .arg("1")
            .arg("DRYRUN")
            .query(&mut admin)
            .unwrap();
        assert_eq!(
            again,
            vec![redis::Value::Int(3), redis::Value::Int(12)],
            "{flavor:?}"
        );
        let typed: i64 = run(&mut admin, &["MAXAGE.KILL", "TYPE", "normal", "DRYRUN"]).unwrap();
        assert_eq!(typed, 12, "{flavor:?}");
        assert!(client_list_calls(&mut admin) > before, "{flavor:?}");
    }
}

/// The audit log's per-second cap: a kill of 100 logs 40 lines, then one summary of the rest
/// once the second is over, even with enforcement off (no deadline to wake up for).
#[test]
fn a_mass_kill_logs_forty_lines_and_a_summary() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["max-age-ms", "0"])
            .start();
        let mut admin = server.admin();
        let mut idle = server.idle_sockets_tracked(&mut admin, 100, 1);
        // A fixed time on purpose: the clients age past the 1 ms the kill asks for.
        sleep(Duration::from_millis(5));
        let killed: i64 = run(&mut admin, &["MAXAGE.KILL", "MAXAGE-MS", "1"]).unwrap();
        assert_eq!(killed, 100, "{flavor:?}");
        assert!(wait_until(Duration::from_secs(3), || idle
            .iter_mut()
            .all(is_closed)));
        assert!(
            wait_until(Duration::from_secs(5), || server.log().contains(
                "60 more retirements in the last second were not logged one by one (40 were)"
            )),
            "{flavor:?}: no summary line"
        );
        assert_eq!(audit_ages(&server, "manual").len(), 40, "{flavor:?}");
    }
}

/// A kill of more clients than one event-loop pass closes (`KILL_PASS`, 100) is spread over
/// the next passes: the reply counts them all, a kill right behind it (same pipeline, so in
/// the same pass) finds none of them again, every one is closed and counted once, by the
/// registry path and the `CLIENT LIST` path alike, and a `MODULE UNLOAD` before the last pass
/// still closes the rest.
#[test]
fn a_kill_of_hundreds_is_spread_over_passes_and_counted_once() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["max-age-ms", "0"])
            .start();
        let mut admin = server.admin();
        let mut expected_manual = 0;
        for (round, filters) in [
            vec!["MAXAGE-MS", "1"],
            vec!["TYPE", "normal", "MAXAGE-MS", "1"],
            vec!["MAXAGE-MS", "1"],
        ]
        .into_iter()
        .enumerate()
        {
            let mut idle = server.idle_sockets_tracked(&mut admin, 350, 1);
            // A fixed time on purpose: the clients age past the 1 ms the kills ask for.
            sleep(Duration::from_millis(5));
            let mut pipeline = redis::pipe();
            pipeline.cmd("MAXAGE.KILL").arg(&filters);
            pipeline.cmd("MAXAGE.KILL").arg(&filters).arg("DRYRUN");
            let unload = round == 2;
            if unload {
                pipeline.cmd("MODULE").arg("UNLOAD").arg("maxage");
            }
            let replies: Vec<redis::Value> = pipeline.query(&mut admin).unwrap();
            assert_eq!(replies[0], redis::Value::Int(350), "{flavor:?} {filters:?}");
            assert_eq!(replies[1], redis::Value::Int(0), "{flavor:?} {filters:?}");
            assert!(
                wait_until(Duration::from_secs(5), || idle.iter_mut().all(is_closed)),
                "{flavor:?} {filters:?}: not all closed"
            );
            if unload {
                assert_eq!(replies[2], redis::Value::Okay, "{flavor:?}");
                break;
            }
            expected_manual += 350;
            assert_eq!(
                info_field(&mut admin, "maxage_evicted_manual"),
                Some(expected_manual),
                "{flavor:?} {filters:?}"
            );
        }
    }
}

/// The `INFO maxage` table of docs/operations.md lists exactly the fields the module writes (each
/// field is written in one place, `stats::write_info`; the settings come from the settings table).
#[test]
fn the_docs_list_every_info_field() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let table = doc
        .split("`INFO maxage` (also in `INFO everything`")
        .nth(1)
        .expect("the INFO section")
        .split("\n\n")
        .nth(1)
        .expect("its table");
    let documented: std::collections::BTreeSet<String> = table
        .lines()
        .filter_map(|line| line.strip_prefix("| "))
        .filter_map(|line| line.split(" | ").next())
        .flat_map(|cell| cell.split(", "))
        .filter_map(|name| name.strip_prefix('`')?.strip_suffix('`'))
        .map(str::to_string)
        .collect();
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut conn = server.conn();
        let info: String = run(&mut conn, &["INFO", "maxage"]).unwrap();
        let written: std::collections::BTreeSet<String> = info
            .lines()
            .filter_map(|line| line.split_once(':'))
            .filter_map(|(name, _)| name.strip_prefix("maxage_"))
            .map(str::to_string)
            .collect();
        assert_eq!(
            written, documented,
            "{flavor:?}: INFO maxage vs docs/operations.md"
        );
    }
}
