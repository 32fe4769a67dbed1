//! Loading and unloading: runtime MODULE LOAD seeds already-connected clients, MODULE UNLOAD
//! works (also while enforcing), bad load arguments and bad CONFIG SET values are refused.

use std::thread::sleep;
use std::time::Duration;

use crate::harness::*;

#[test]
fn runtime_load_seeds_existing_clients_with_approximate_ages() {
    for flavor in BOTH {
        let server = Server::builder(flavor).without_module().start();
        let mut early = server.idle_socket();
        let early_id = raw_client_id(&mut early);
        // A fixed time on purpose: the clients age 3.1 s before the module is loaded.
        sleep(Duration::from_millis(3100));
        let mut admin = server.conn();
        let module = module_path();
        run::<()>(&mut admin, &["MODULE", "LOAD", module.to_str().unwrap()]).unwrap();
        assert_eq!(
            info_field(&mut admin, "maxage_approximate_age_clients"),
            Some(2)
        );
        let entries: Vec<Vec<redis::Value>> =
            run(&mut admin, &["MAXAGE.LIST", "ID", &early_id.to_string()]).unwrap();
        let fields = &entries[0];
        let value = |key: &str| {
            let at = fields
                .iter()
                .position(|v| *v == redis::Value::BulkString(key.as_bytes().to_vec()))
                .unwrap();
            fields[at + 1].clone()
        };
        assert_eq!(value("age-approximate"), redis::Value::Int(1), "{flavor:?}");
        // age= is whole seconds and can run a second ahead: seeded at its lower bound, a client
        // is never thought older than it is (3.1 s here).
        match value("age-ms") {
            redis::Value::Int(ms) => assert!((2000..3200).contains(&ms), "{flavor:?} {ms}"),
            other => panic!("{other:?}"),
        }
        // A seeded client is killable by age like any other.
        assert_eq!(
            run::<i64>(&mut admin, &["MAXAGE.KILL", "MAXAGE-MS", "1500"]).unwrap(),
            1,
            "{flavor:?}"
        );
        assert!(wait_until(Duration::from_secs(2), || is_closed(&mut early)));
        // New clients are tracked exactly from now on.
        let _late = server.idle_socket();
        assert_eq!(
            info_field(&mut admin, "maxage_approximate_age_clients"),
            Some(1)
        );
        assert_eq!(info_field(&mut admin, "maxage_tracked_clients"), Some(2));
    }
}

#[test]
fn unload_while_enforcing_and_load_again() {
    for flavor in BOTH {
        let mut server = Server::builder(flavor)
            .module_args(&["max-age-ms", "60000"])
            .start();
        let mut admin = server.conn();
        let _idle: Vec<_> = (0..5).map(|_| server.idle_socket()).collect();
        for _cycle in 0..3 {
            run::<()>(&mut admin, &["MODULE", "UNLOAD", "maxage"]).unwrap();
            let error = error_of(&mut admin, &["MAXAGE.LIST"]);
            assert!(error.contains("unknown command"), "{flavor:?}: {error}");
            let module = module_path();
            run::<()>(
                &mut admin,
                &[
                    "MODULE",
                    "LOAD",
                    module.to_str().unwrap(),
                    "max-age-ms",
                    "60000",
                ],
            )
            .unwrap();
            assert_eq!(info_field(&mut admin, "maxage_tracked_clients"), Some(6));
            assert!(info_field(&mut admin, "maxage_next_deadline_in_ms").unwrap() > 50_000);
        }
        assert!(server.alive());
    }
}

/// A reload draws a new jitter seed: two servers reloaded alike must not retire the same
/// clients at the same moments (a `MODULE UNLOAD` used to leave the seed at 0 for the next
/// load, as the library stays mapped).
#[test]
fn a_reload_draws_a_new_jitter_seed() {
    for flavor in BOTH {
        let args = ["max-age-ms", "1000000000", "jitter-pct", "50"];
        let jittered_max_ages: Vec<Vec<i64>> = (0..2)
            .map(|_| {
                let server = Server::builder(flavor).module_args(&args).start();
                let mut admin = server.conn();
                run::<()>(&mut admin, &["MODULE", "UNLOAD", "maxage"]).unwrap();
                let module = module_path();
                let mut load = vec!["MODULE", "LOAD", module.to_str().unwrap()];
                load.extend_from_slice(&args);
                run::<()>(&mut admin, &load).unwrap();
                (0..4)
                    .map(|_| {
                        let mut client = server.conn();
                        let report: Vec<redis::Value> = run(&mut client, &["MAXAGE.SELF"]).unwrap();
                        match &report[3] {
                            redis::Value::Int(max_age_ms) => *max_age_ms,
                            other => panic!("{flavor:?}: max-age-ms is {other:?}"),
                        }
                    })
                    .collect()
            })
            .collect();
        assert_ne!(
            jittered_max_ages[0], jittered_max_ages[1],
            "{flavor:?}: both reloaded servers drew the same jitter"
        );
    }
}

#[test]
fn bad_load_arguments_refuse_the_load_with_a_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["max-age-ms"], "has no value"),
        (&["bogus", "1"], "unknown argument 'bogus'"),
        (&["max-age-ms", "soon"], "is not an integer"),
        (&["jitter-pct", "101"], "out of range"),
        (&["mode", "sometimes"], "is not one of enforce, observe"),
        (&["exempt-types", "robots"], "unknown client type 'robots'"),
    ];
    for flavor in BOTH {
        for (args, reason) in cases {
            let log = match Server::builder(flavor).module_args(args).try_start() {
                Ok(_) => panic!("{flavor:?} loaded with {args:?}"),
                Err(log) => log,
            };
            assert!(
                log.contains("maxage: refusing to load"),
                "{flavor:?} {args:?}:\n{log}"
            );
            assert!(log.contains(reason), "{flavor:?} {args:?}:\n{log}");
        }
        // At runtime the server refuses the load and keeps running.
        let mut server = Server::builder(flavor).without_module().start();
        let mut admin = server.conn();
        let module = module_path();
        let error = error_of(
            &mut admin,
            &["MODULE", "LOAD", module.to_str().unwrap(), "bogus", "1"],
        );
        assert!(error.contains("ERR"), "{error}");
        assert!(server.log().contains("unknown argument 'bogus'"));
        assert!(run::<String>(&mut admin, &["PING"]).is_ok());
        assert!(server.alive());
    }
}

#[test]
fn config_set_refuses_bad_values_and_keeps_the_old_one() {
    let cases: &[(&str, &str)] = &[
        ("maxage.max-age-ms", "-1"),
        ("maxage.max-age-ms", "soon"),
        ("maxage.jitter-pct", "101"),
        ("maxage.max-evictions-per-sec", "-5"),
        ("maxage.grace-ms", "x"),
        ("maxage.exempt-types", "master robots"),
        ("maxage.mode", "sometimes"),
        ("maxage.client-kill-compat", "perhaps"),
    ];
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.conn();
        for (name, value) in cases {
            let before: Vec<String> = run(&mut admin, &["CONFIG", "GET", name]).unwrap();
            let error = error_of(&mut admin, &["CONFIG", "SET", name, value]);
            assert!(
                error.starts_with("ERR"),
                "{flavor:?} {name}={value}: {error}"
            );
            let after: Vec<String> = run(&mut admin, &["CONFIG", "GET", name]).unwrap();
            assert_eq!(before, after, "{flavor:?} {name}");
        }
    }
}

#[test]
fn config_rewrite_persists_settings() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.conn();
        for (name, value) in [
            ("maxage.max-age-ms", "300000"),
            ("maxage.jitter-pct", "20"),
            ("maxage.exempt-names", "monitoring-*"),
            ("maxage.mode", "observe"),
        ] {
            run::<()>(&mut admin, &["CONFIG", "SET", name, value]).unwrap();
        }
        run::<()>(&mut admin, &["CONFIG", "REWRITE"]).unwrap();
        let config = server.config_file();
        for line in [
            "maxage.max-age-ms 300000",
            "maxage.jitter-pct 20",
            "maxage.exempt-names \"monitoring-*\"",
            "maxage.mode observe",
        ] {
            let normalized = config.replace('"', "");
            assert!(
                normalized.contains(&line.replace('"', "")),
                "{flavor:?} missing {line}:\n{config}"
            );
        }
    }
}

#[test]
fn settings_in_the_config_file_apply_at_startup() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .config("maxage.max-age-ms 123456")
            .config("maxage.exempt-users \"ops-*\"")
            .config("maxage.pacing adaptive")
            .start();
        let mut admin = server.conn();
        let value: Vec<String> = run(&mut admin, &["CONFIG", "GET", "maxage.max-age-ms"]).unwrap();
        assert_eq!(value[1], "123456", "{flavor:?}");
        assert_eq!(info_field(&mut admin, "maxage_max_age_ms"), Some(123_456));
        // Settings from the file are applied before the module's init has a context; adaptive
        // pacing must still be measuring the event loop once the server runs.
        let _: i64 = run(
            &mut admin,
            &[
                "EVAL",
                "local i = 0 while i < 20000000 do i = i + 1 end return 1",
                "0",
            ],
        )
        .unwrap();
        let busy = info_field(&mut admin, "maxage_event_loop_busy_pct").unwrap();
        assert!(
            busy >= 20,
            "{flavor:?}: event loop {busy}% busy after a long script"
        );
    }
}

/// 100 unload/load cycles with clients connected and enforcement on (fixed and adaptive pacing
/// in turn): no crash, no leak (RSS flat), and after every load the registry holds exactly the
/// connected clients.
#[test]
fn a_hundred_unload_load_cycles() {
    for flavor in BOTH {
        let mut server = Server::builder(flavor)
            .module_args(&["max-age-ms", "60000"])
            .start();
        let mut admin = server.admin();
        let _idle: Vec<_> = (0..20).map(|_| server.idle_socket()).collect();
        let module = module_path();
        let module = module.to_str().unwrap();
        let used_memory = |conn: &mut redis::Connection| -> u64 {
            let info: String = run(conn, &["INFO", "memory"]).unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap()
        };
        let (mut rss_after_warmup, mut memory_after_warmup) = (0, 0);
        for cycle in 1..=100 {
            run::<()>(&mut admin, &["MODULE", "UNLOAD", "maxage"]).unwrap();
            // Every other load watches the event loop (adaptive pacing): the server must drop
            // that subscription with the module.
            let pacing = if cycle % 2 == 0 { "fixed" } else { "adaptive" };
            run::<()>(
                &mut admin,
                &[
                    "MODULE",
                    "LOAD",
                    module,
                    "max-age-ms",
                    "60000",
                    "pacing",
                    pacing,
                ],
            )
            .unwrap_or_else(|e| panic!("{flavor:?} cycle {cycle}: {e}"));
            assert!(
                registry_matches_client_list(&mut admin),
                "{flavor:?} cycle {cycle}"
            );
            if cycle == 10 {
                rss_after_warmup = server.rss_kb();
                memory_after_warmup = used_memory(&mut admin);
            }
        }
        let growth_kb = server.rss_kb().saturating_sub(rss_after_warmup);
        let memory_growth = used_memory(&mut admin).saturating_sub(memory_after_warmup);
        eprintln!(
            "{flavor:?}: over 90 cycles RSS grew {growth_kb} kB, used_memory {memory_growth} B"
        );
        // About 0.8 kB a cycle remains, all of it in the redis-module crate's config
        // registration (boxed callback data it never frees) and the server's own bookkeeping.
        assert!(
            memory_growth < 90 * 2048,
            "{flavor:?}: used_memory grew {memory_growth} B"
        );
        assert!(
            growth_kb < 2048,
            "{flavor:?}: RSS grew {growth_kb} kB over 90 cycles"
        );
        assert!(server.alive());
    }
}

/// The shipped config snippet is valid on both servers and states the real defaults.
#[test]
fn the_example_config_loads_and_states_the_defaults() {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/maxage.conf"))
        .expect("conf/maxage.conf");
    let settings: Vec<&str> = example
        .lines()
        .filter(|line| line.starts_with("maxage."))
        .collect();
    for flavor in BOTH {
        let mut builder = Server::builder(flavor);
        for line in &settings {
            builder = builder.config(line);
        }
        let server = builder.start();
        let mut admin = server.conn();
        let registered: Vec<String> = run(&mut admin, &["CONFIG", "GET", "maxage.*"]).unwrap();
        assert_eq!(
            settings.len(),
            registered.len() / 2,
            "every setting is in the example"
        );
        for line in &settings {
            let (name, value) = line.split_once(' ').unwrap();
            let got: Vec<String> = run(&mut admin, &["CONFIG", "GET", name]).unwrap();
            assert_eq!(got[1], value.trim_matches('"'), "{flavor:?} {name}");
        }
        // And the defaults of a module loaded without any of those lines are the same.
        let bare = Server::start(flavor);
        let mut conn = bare.conn();
        for line in &settings {
            let (name, value) = line.split_once(' ').unwrap();
            let got: Vec<String> = run(&mut conn, &["CONFIG", "GET", name]).unwrap();
            assert_eq!(
                got[1],
                value.trim_matches('"'),
                "{flavor:?} default of {name}"
            );
        }
    }
}

#[test]
fn install_puts_the_module_in_place_and_prints_the_loadmodule_line() {
    let dir = std::env::temp_dir().join(format!("maxage-install-{}", std::process::id()));
    let output =
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install"))
            .env("MAXAGE_MODULE_PATH", module_path())
            .env("MAXAGE_MODULE_DIR", &dir)
            .output()
            .expect("scripts/install");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let installed = dir.join("libredis_maxage.so");
    assert!(installed.exists());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("loadmodule {}", installed.display())
    );
    let _ = std::fs::remove_dir_all(&dir);
}
