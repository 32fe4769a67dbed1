//! Differential tests against Valkey's native `CLIENT KILL`: for the same clients and the same
//! filters, the module selects and kills exactly what the server does, and refuses bad filters
//! with the same words. Valkey 9.0+ has every filter; on an older Valkey (8.0: MAXAGE and the
//! Redis 7 set, `CLIENT LIST` only `TYPE`/`ID`) the filters it lacks are checked to be refused
//! by the server and are compared no further.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::Duration;

use crate::harness::*;

/// A varied population on one server: each connection has a role; "old-*" ones are 3.5 s older
/// than "young-*" ones, so whole-second MAXAGE/IDLE values of 2 are more than a second away
/// from every client's age.
struct Population {
    sockets: BTreeMap<String, TcpStream>,
    ids: BTreeMap<String, u64>,
}

fn connect_roles(server: &Server, prefix: &str, population: &mut Population) {
    let setups: &[(&str, &[&[&str]])] = &[
        ("plain-a", &[]),
        ("plain-b", &[]),
        ("named", &[&["CLIENT", "SETNAME", "web-1"]]),
        ("db3", &[&["SELECT", "3"]]),
        ("alice", &[&["AUTH", "alice", "pw"]]),
        (
            "lib",
            &[
                &["CLIENT", "SETINFO", "LIB-NAME", "mylib"],
                &["CLIENT", "SETINFO", "LIB-VER", "1.0"],
            ],
        ),
        ("capa", &[&["CLIENT", "CAPA", "redirect"]]),
        ("noevict", &[&["CLIENT", "NO-EVICT", "on"]]),
        ("pubsub", &[&["SUBSCRIBE", "news"]]),
        ("multi", &[&["MULTI"]]),
    ];
    for (role, commands) in setups {
        let mut socket = server.idle_socket();
        let id = raw_client_id(&mut socket);
        for command in *commands {
            raw_command(&mut socket, command);
        }
        let role = format!("{prefix}-{role}");
        population.ids.insert(role.clone(), id);
        population.sockets.insert(role, socket);
    }
}

fn build_population(server: &Server) -> Population {
    let mut population = Population {
        sockets: BTreeMap::new(),
        ids: BTreeMap::new(),
    };
    connect_roles(server, "old", &mut population);
    // A fixed time on purpose: the old clients age 3.5 s before the young ones connect.
    sleep(Duration::from_millis(3500));
    connect_roles(server, "young", &mut population);
    population
}

fn prepare(server: &Server) -> redis::Connection {
    let mut admin = server.conn();
    create_user(&mut admin, "alice", &["+@all"]);
    admin
}

/// Filter lists covering every keyword and every NOT- form, alone and combined.
fn filter_cases(population: &Population, admin_id: u64, port: u16) -> Vec<Vec<String>> {
    let id = |role: &str| population.ids[role].to_string();
    let (named, db3, plain_a, plain_b) = (
        id("old-named"),
        id("young-db3"),
        id("old-plain-a"),
        id("old-plain-b"),
    );
    let admin = admin_id.to_string();
    let laddr = format!("127.0.0.1:{port}");
    let cases: Vec<Vec<&str>> = vec![
        vec!["MAXAGE", "2"],
        vec!["IDLE", "2"],
        vec!["ID", &named, &db3],
        vec!["NOT-ID", &named, &db3],
        vec!["TYPE", "normal"],
        vec!["TYPE", "pubsub"],
        vec!["TYPE", "master"],
        vec!["TYPE", "replica"],
        vec!["NOT-TYPE", "normal"],
        vec!["NOT-TYPE", "pubsub"],
        vec!["USER", "alice"],
        vec!["NOT-USER", "alice"],
        vec!["USER", "default"],
        vec!["LADDR", &laddr],
        vec!["NOT-LADDR", &laddr],
        vec!["IP", "127.0.0.1"],
        vec!["NOT-IP", "127.0.0.1"],
        vec!["IP", "127.0.0"],
        vec!["NAME", "web-1"],
        vec!["NOT-NAME", "web-1"],
        vec!["NAME", ""],
        vec!["NOT-NAME", ""],
        vec!["LIB-NAME", "mylib"],
        vec!["NOT-LIB-NAME", "mylib"],
        vec!["LIB-VER", "1.0"],
        vec!["NOT-LIB-VER", "1.0"],
        vec!["FLAGS", "N"],
        vec!["FLAGS", "P"],
        vec!["FLAGS", "x"],
        vec!["FLAGS", "e"],
        vec!["FLAGS", ""],
        vec!["NOT-FLAGS", "N"],
        vec!["NOT-FLAGS", "xP"],
        vec!["NOT-FLAGS", ""],
        vec!["CAPA", "r"],
        vec!["NOT-CAPA", "r"],
        vec!["CAPA", ""],
        vec!["DB", "3"],
        vec!["NOT-DB", "3"],
        vec!["SKIPME", "no"],
        vec!["SKIPME", "yes"],
        vec!["MAXAGE", "2", "TYPE", "normal"],
        vec![
            "MAXAGE", "2", "NOT-DB", "3", "NOT-NAME", "web-1", "SKIPME", "no",
        ],
        vec!["USER", "default", "NOT-FLAGS", "x", "IDLE", "2"],
        vec!["TYPE", "normal", "NOT-TYPE", "normal"],
        vec!["ID", &plain_a, "NOT-ID", &plain_a],
        vec!["SKIPME", "no", "ID"],
        vec!["NOT-ID", "SKIPME", "no"],
        vec!["ID", &plain_a, "ID", &plain_b, "MAXAGE", "5", "MAXAGE", "2"],
        vec!["ID", &admin, "SKIPME", "no"],
        vec!["Type", "NORMAL", "not-db", "3", "skipme", "No"],
    ];
    cases
        .into_iter()
        .map(|case| case.into_iter().map(str::to_string).collect())
        .collect()
}

fn ids_from_client_list(text: &str) -> BTreeSet<u64> {
    text.lines()
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .filter_map(|id| id.parse().ok())
        .collect()
}

/// Selection: Valkey's `CLIENT LIST <filters>` runs the same parser and matcher as its
/// `CLIENT KILL`; ours runs in `MAXAGE.LIST`. Both run on the same connection at the same moment.
#[test]
fn selection_equals_valkey_native_for_every_filter() {
    if !runs_on(Flavor::Valkey) {
        return;
    }
    let server = Server::start(Flavor::Valkey);
    let info = server.info();
    let mut admin = prepare(&server);
    let population = build_population(&server);
    let admin_id = client_id(&mut admin);
    let mut compared = 0;
    for case in filter_cases(&population, admin_id, server.port) {
        let args: Vec<&str> = case.iter().map(String::as_str).collect();
        let mut native_words = vec!["CLIENT", "LIST"];
        native_words.extend_from_slice(&args);
        if !info.native_list_args(&args) {
            // The server refuses it (error_of panics on success); the module answers it.
            error_of(&mut admin, &native_words);
            maxage_list_ids(&mut admin, &args);
            continue;
        }
        compared += 1;
        // The native LIST spares nobody by default, as MAXAGE.LIST does.
        let native = ids_from_client_list(&run::<String>(&mut admin, &native_words).unwrap());
        let ours: BTreeSet<u64> = maxage_list_ids(&mut admin, &args).into_iter().collect();
        assert_eq!(ours, native, "filters {args:?}");
    }
    assert!(compared >= 5, "{info:?}: only {compared} cases compared");
}

/// Kills: for a few representative filter lists, one population is killed natively and an
/// identical one by MAXAGE.KILL; the same roles must die.
#[test]
fn kills_equal_valkey_native_client_kill() {
    let cases: &[&[&str]] = &[
        &["MAXAGE", "2"],
        &["MAXAGE", "2", "NOT-TYPE", "pubsub", "NOT-NAME", "web-1"],
        &["NOT-USER", "alice", "IDLE", "2", "NOT-FLAGS", "x"],
        &["TYPE", "normal", "NOT-DB", "3", "NOT-LIB-NAME", "mylib"],
    ];
    if !runs_on(Flavor::Valkey) {
        return;
    }
    let server = Server::start(Flavor::Valkey);
    let info = server.info();
    let mut admin = prepare(&server);
    let mut killed_roles: Vec<[BTreeSet<String>; 2]> = Vec::new();
    // Each side kills in its own population; NOT-ID keeps the other one's leftovers out, and
    // where the server has no NOT-ID (before Valkey 9.0) each side gets a fresh server instead.
    let isolate_by_id = info.native_kill_args(&["NOT-ID", "1", "2"]);
    let cases: Vec<&[&str]> = cases
        .iter()
        .copied()
        .filter(|case| info.native_kill_args(case))
        .collect();
    assert!(!cases.is_empty(), "{info:?}: no case the server answers");
    for case in &cases {
        let mut per_side: [BTreeSet<String>; 2] = Default::default();
        for (side, command) in [
            ("native", ["CLIENT", "KILL"]),
            ("module", ["MAXAGE.KILL", ""]),
        ] {
            let fresh = (!isolate_by_id).then(|| Server::start(Flavor::Valkey));
            let mut fresh_admin;
            let (side_server, side_admin) = match &fresh {
                Some(fresh) => {
                    fresh_admin = prepare(fresh);
                    (fresh, &mut fresh_admin)
                }
                None => (&server, &mut admin),
            };
            let mut population = build_population(side_server);
            let mut words: Vec<&str> = command.iter().copied().filter(|w| !w.is_empty()).collect();
            words.extend_from_slice(case);
            let others: Vec<String> = listed_ids(side_admin)
                .into_iter()
                .filter(|id| !population.ids.values().any(|own| own == id))
                .map(|id| id.to_string())
                .collect();
            if isolate_by_id {
                words.push("NOT-ID");
                words.extend(others.iter().map(String::as_str));
            }
            let count: i64 = run(side_admin, &words).unwrap();
            let dead: BTreeSet<String> = population
                .sockets
                .iter_mut()
                .filter_map(|(role, socket)| {
                    wait_until(Duration::from_millis(300), || is_closed(socket)).then_some(role)
                })
                .cloned()
                .collect();
            assert_eq!(dead.len() as i64, count, "{side} {case:?}");
            per_side[usize::from(side == "module")] = dead;
        }
        killed_roles.push(per_side);
    }
    for (case, [native, module]) in cases.iter().zip(&killed_roles) {
        assert_eq!(module, native, "filters {case:?}");
        assert!(
            !native.is_empty() || case.contains(&"TYPE"),
            "{case:?} killed nobody"
        );
    }
}

#[test]
fn errors_equal_valkey_native() {
    if !runs_on(Flavor::Valkey) {
        return;
    }
    let server = Server::start(Flavor::Valkey);
    let info = server.info();
    let mut admin = prepare(&server);
    let bad: &[&[&str]] = &[
        &["BOGUS", "1"],
        &["TYPE", "robot"],
        &["NOT-TYPE", "monitor"],
        &["USER", "nobody"],
        &["NOT-USER", "DEFAULT"],
        &["ID", "0"],
        &["ID", "5", "-1"],
        &["ID", "abc"],
        &["ID", "05"],
        &["MAXAGE", "x"],
        &["MAXAGE", "0"],
        &["MAXAGE", "5", "MAXAGE", "0"],
        &["IDLE", "-3"],
        &["IDLE", "1.5"],
        &["SKIPME", "maybe"],
        &["FLAGS", "Nw"],
        &["NOT-FLAGS", "n"],
        &["CAPA", "R"],
        &["NOT-CAPA", "x"],
        &["DB", "16"],
        &["DB", "01"],
        &["NOT-DB", "-1"],
        &["NOT-DB", "x"],
        &["TYPE", "normal", "NAME"],
        &["NAME", "a", "b"],
        &["NOT-MAXAGE", "1"],
        &["TYPE", "bogus", "USER", "nosuch"],
        &["USER", "nosuch", "TYPE", "bogus"],
    ];
    for args in bad {
        let mut native = vec!["CLIENT", "KILL"];
        native.extend_from_slice(args);
        let mut ours = vec!["MAXAGE.KILL"];
        ours.extend_from_slice(args);
        // The module parses ID as Valkey 8.1+ does (several ids, a non-number ends the list);
        // older servers take one id and word some errors differently.
        let single_id = !info.native_variadic_kill_id()
            && args
                .iter()
                .any(|a| ["ID", "NOT-ID"].contains(&a.to_ascii_uppercase().as_str()));
        if !info.native_kill_args(args) || single_id {
            // Not comparable word for word: both must refuse it, each in its own words.
            error_of(&mut admin, &native);
            error_of(&mut admin, &ours);
            continue;
        }
        assert_eq!(
            error_of(&mut admin, &ours),
            error_of(&mut admin, &native),
            "{args:?}"
        );
    }
}
