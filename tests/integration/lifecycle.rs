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
        sleep(Duration::from_millis(2100));
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
        // age= is whole seconds, rounded down: never older than the truth.
        match value("age-ms") {
            redis::Value::Int(ms) => assert!((2000..2200).contains(&ms), "{flavor:?} {ms}"),
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

#[test]
fn bad_load_arguments_refuse_the_load_with_a_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["max-age-ms"], "has no value"),
        (&["bogus", "1"], "unknown argument 'bogus'"),
        (&["max-age-ms", "soon"], "is not an integer"),
        (&["jitter-pct", "101"], "out of range"),
        (&["mode", "sometimes"], "not enforce or observe"),
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
            .start();
        let mut admin = server.conn();
        let value: Vec<String> = run(&mut admin, &["CONFIG", "GET", "maxage.max-age-ms"]).unwrap();
        assert_eq!(value[1], "123456", "{flavor:?}");
        assert_eq!(info_field(&mut admin, "maxage_max_age_ms"), Some(123_456));
    }
}
