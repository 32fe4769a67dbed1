//! `MAXAGE.NOTICE`: a connection that opts in is told before its deadline (a RESP3
//! invalidation push of its own key), may leave by itself, and is closed by the module only
//! once the notice's lead has passed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::{
    BOTH, Server, config_set, create_user, exclusive, info_field, run, wait_until,
};

/// A raw connection that keeps everything it reads, to see pushes among replies.
struct Wire {
    socket: TcpStream,
    seen: Vec<u8>,
    closed: bool,
}

impl Wire {
    fn open(server: &Server) -> Wire {
        let socket = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        Wire {
            socket,
            seen: Vec::new(),
            closed: false,
        }
    }

    fn send(&mut self, words: &[&str]) {
        let mut frame = format!("*{}\r\n", words.len()).into_bytes();
        for word in words {
            frame.extend_from_slice(format!("${}\r\n{word}\r\n", word.len()).as_bytes());
        }
        self.socket.write_all(&frame).unwrap();
    }

    /// Reads what has arrived; false once the server has closed the connection.
    fn pump(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match self.socket.read(&mut chunk) {
            Ok(0) => self.closed = true,
            Ok(n) => self.seen.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => self.closed = true,
            Err(_) => {}
        }
        !self.closed
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Waits until the text read so far contains `what`.
    fn wait_for(&mut self, what: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.pump();
            self.text().contains(what)
        })
    }

    /// The integer a map field of the last `MAXAGE.NOTICE` reply holds.
    fn field(&self, name: &str) -> Option<i64> {
        let text = self.text();
        let at = text.rfind(&format!("${}\r\n{name}\r\n", name.len()))?;
        let rest = &text[at..];
        let value = rest.split("\r\n").nth(2)?;
        value.strip_prefix(':')?.parse().ok()
    }

    fn key(&self) -> String {
        let text = self.text();
        let at = text.rfind("$3\r\nkey\r\n").expect("key field");
        text[at..].split("\r\n").nth(3).unwrap().to_string()
    }

    /// HELLO 3, tracking in OPTIN mode, MAXAGE.NOTICE; on Redis 7.0 (`key-tracked` 0) the key
    /// read by the client itself, as docs/notices.md says.
    fn opt_in(&mut self) -> String {
        self.send(&["HELLO", "3"]);
        self.send(&["CLIENT", "TRACKING", "ON", "OPTIN"]);
        self.send(&["CLIENT", "CACHING", "YES"]);
        self.send(&["MAXAGE.NOTICE"]);
        assert!(
            self.wait_for("no-push-reason", Duration::from_secs(5)),
            "{}",
            self.text()
        );
        assert_eq!(self.field("push"), Some(1), "{}", self.text());
        let key = self.key();
        if self.field("key-tracked") == Some(0) {
            self.send(&["CLIENT", "CACHING", "YES"]);
            self.send(&["MAXAGE.NOTICEKEY", &key]);
            assert!(self.wait_for("+OK\r\n+OK\r\n", Duration::from_secs(5)));
        }
        key
    }

    fn notice_of(key: &str) -> String {
        format!(
            ">2\r\n$10\r\ninvalidate\r\n*1\r\n${}\r\n{key}\r\n",
            key.len()
        )
    }
}

/// `tracking_total_keys` of `INFO stats`: keys the server tracks for some client.
fn tracked_keys(server: &Server) -> i64 {
    let mut admin = server.admin();
    let stats: String = run(&mut admin, &["INFO", "stats"]).unwrap_or_default();
    stats
        .lines()
        .find_map(|line| line.strip_prefix("tracking_total_keys:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(-1)
}

/// Told `notice-lead-ms` before the deadline, the connection closes itself: counted as such,
/// its key gone from the server's tracking table, and no close by the module.
#[test]
fn a_connection_is_told_before_its_deadline_and_leaves_by_itself() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&[
                "max-age-ms",
                "3000",
                "jitter-pct",
                "0",
                "notice-lead-ms",
                "1000",
            ])
            .start();
        let mut wire = Wire::open(&server);
        let connected = Instant::now();
        let key = wire.opt_in();
        assert!(key.starts_with("__maxage__:notice:"), "{key}");
        let deadline_in = wire.field("deadline-in-ms").unwrap();
        assert!((2500..=3010).contains(&deadline_in), "{deadline_in}");
        assert_eq!(wire.field("notice-lead-ms"), Some(1000));
        assert!(
            wire.wait_for(&Wire::notice_of(&key), Duration::from_secs(10)),
            "{}",
            wire.text()
        );
        let told_after = connected.elapsed();
        assert!(told_after >= Duration::from_millis(1900), "{told_after:?}");
        assert!(!wire.closed);
        drop(wire);
        let mut admin = server.admin();
        assert!(wait_until(Duration::from_secs(5), || info_field(
            &mut admin,
            "maxage_noticed_left_themselves"
        ) == Some(1)));
        assert_eq!(info_field(&mut admin, "maxage_notices_sent"), Some(1));
        assert_eq!(
            info_field(&mut admin, "maxage_noticed_closed_by_module"),
            Some(0)
        );
        assert_eq!(
            info_field(&mut admin, "maxage_evicted_connections"),
            Some(0)
        );
        assert_eq!(tracked_keys(&server), 0);
        assert!(
            wait_until(Duration::from_secs(5), || server
                .log()
                .contains("reason=left-after-notice")),
            "{}",
            server.log()
        );
    }
}

/// A told connection that stays is closed by the module, but only once the lead has passed
/// since the notice (here later than its deadline, as it was told late).
#[test]
fn a_told_connection_that_stays_is_closed_after_the_lead() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&[
                "max-age-ms",
                "1200",
                "jitter-pct",
                "0",
                "notice-lead-ms",
                "1000",
            ])
            .start();
        let mut wire = Wire::open(&server);
        let connected = Instant::now();
        let key = wire.opt_in();
        assert!(wire.wait_for(&Wire::notice_of(&key), Duration::from_secs(10)));
        let told = connected.elapsed();
        assert!(wait_until(Duration::from_secs(10), || !wire.pump()));
        let closed = connected.elapsed();
        assert!(
            closed >= told + Duration::from_millis(950),
            "told {told:?}, closed {closed:?}"
        );
        let mut admin = server.admin();
        assert!(wait_until(Duration::from_secs(5), || info_field(
            &mut admin,
            "maxage_noticed_closed_by_module"
        ) == Some(1)));
        assert!(
            server.log().contains("reason=max-age-after-notice"),
            "{}",
            server.log()
        );
    }
}

/// The notice follows the deadline: a max age lowered by CONFIG SET, a graceful kill and the
/// client's own MAXAGE.SELF each bring it forward.
#[test]
fn the_notice_follows_the_deadline_when_it_moves() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["max-age-ms", "600000", "notice-lead-ms", "1000"])
            .start();
        let mut admin = server.admin();
        // A lowered max age.
        let mut by_config = Wire::open(&server);
        let key = by_config.opt_in();
        // Another connection, told through a graceful kill.
        let mut by_drain = Wire::open(&server);
        let drain_key = by_drain.opt_in();
        // And one that asks for a short life itself.
        let mut by_self = Wire::open(&server);
        let self_key = by_self.opt_in();
        by_config.pump();
        assert!(!by_config.text().contains("invalidate"));
        config_set(&mut admin, "maxage.max-age-ms", "1500");
        assert!(by_config.wait_for(&Wire::notice_of(&key), Duration::from_secs(10)));
        config_set(&mut admin, "maxage.max-age-ms", "600000");
        let drain_id = drain_key.rsplit(':').next().unwrap().to_string();
        let scheduled: i64 =
            run(&mut admin, &["MAXAGE.KILL", "ID", &drain_id, "GRACEFUL"]).unwrap();
        assert_eq!(scheduled, 1);
        assert!(by_drain.wait_for(&Wire::notice_of(&drain_key), Duration::from_secs(5)));
        by_self.send(&["MAXAGE.SELF", "100"]);
        assert!(by_self.wait_for(&Wire::notice_of(&self_key), Duration::from_secs(5)));
        // The drained one is closed by the module once its lead has passed (it stayed).
        assert!(wait_until(Duration::from_secs(10), || !by_drain.pump()));
    }
}

/// Without RESP3 or tracking, or with notices off, the reply says why and gives the deadline.
#[test]
fn without_a_way_to_push_the_reply_says_why() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["max-age-ms", "60000"])
            .start();
        let mut resp2 = Wire::open(&server);
        resp2.send(&["MAXAGE.NOTICE"]);
        assert!(
            resp2.wait_for("resp2", Duration::from_secs(5)),
            "{}",
            resp2.text()
        );
        assert!(resp2.text().contains("deadline-in-ms"));
        let mut untracked = Wire::open(&server);
        untracked.send(&["HELLO", "3"]);
        untracked.send(&["MAXAGE.NOTICE"]);
        assert!(untracked.wait_for("tracking-off", Duration::from_secs(5)));
        assert_eq!(untracked.field("push"), Some(0));
        let mut admin = server.admin();
        config_set(&mut admin, "maxage.notice-lead-ms", "0");
        let mut off = Wire::open(&server);
        off.send(&["HELLO", "3"]);
        off.send(&["CLIENT", "TRACKING", "ON"]);
        off.send(&["MAXAGE.NOTICE"]);
        assert!(off.wait_for("notices-off", Duration::from_secs(5)));
        let mut bad = Wire::open(&server);
        bad.send(&["MAXAGE.NOTICE", "MAYBE"]);
        assert!(bad.wait_for("-ERR syntax error", Duration::from_secs(5)));
        assert_eq!(
            info_field(&mut admin, "maxage_clients_opted_in_to_notices"),
            Some(0)
        );
    }
}

/// An application user opting in over and over keeps one entry and one tracked key; opting
/// out and leaving release them.
#[test]
fn opting_in_again_and_again_grows_nothing() {
    let _alone = exclusive();
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["max-age-ms", "600000"])
            .start();
        let mut admin = server.admin();
        create_user(&mut admin, "app", &["+@all", "-@admin", "-@dangerous"]);
        let mut wire = Wire::open(&server);
        wire.send(&["AUTH", "app", "pw"]);
        wire.opt_in();
        let before = info_field(&mut admin, "maxage_registry_bytes").unwrap();
        let rounds = 100_000;
        let mut pipeline = Vec::new();
        for _ in 0..rounds {
            pipeline.extend_from_slice(b"*3\r\n$6\r\nCLIENT\r\n$7\r\nCACHING\r\n$3\r\nYES\r\n");
            pipeline.extend_from_slice(b"*1\r\n$13\r\nMAXAGE.NOTICE\r\n");
        }
        wire.socket.write_all(&pipeline).unwrap();
        assert!(wait_until(Duration::from_secs(120), || {
            wire.pump();
            wire.text().matches("no-push-reason").count() > rounds
        }));
        let after = info_field(&mut admin, "maxage_registry_bytes").unwrap();
        assert!(after - before < 1024, "{before} -> {after}");
        assert_eq!(tracked_keys(&server), 1);
        assert_eq!(
            info_field(&mut admin, "maxage_clients_opted_in_to_notices"),
            Some(1)
        );
        wire.send(&["MAXAGE.NOTICE", "OFF"]);
        assert!(wait_until(Duration::from_secs(5), || info_field(
            &mut admin,
            "maxage_clients_opted_in_to_notices"
        ) == Some(0)));
        wire.opt_in();
        drop(wire);
        // The key of a connection that left untold is invalidated, so the server forgets it.
        assert!(wait_until(Duration::from_secs(5), || tracked_keys(&server) == 0));
        assert_eq!(info_field(&mut admin, "maxage_notices_sent"), Some(0));
    }
}

/// On a cluster node the key carries a hash tag of this node's slots (the server tracks only
/// keys it serves), and the notice comes as on a single server.
#[test]
fn a_cluster_node_tells_its_own_connections() {
    let _alone = exclusive();
    let server = Server::builder(crate::harness::Flavor::Redis)
        .cluster_node()
        // One node serving a few slots: the cluster is up without the rest.
        .config("cluster-require-full-coverage no")
        .module_args(&[
            "max-age-ms",
            "2000",
            "jitter-pct",
            "0",
            "notice-lead-ms",
            "1000",
        ])
        .start();
    let mut admin = server.admin();
    run::<()>(&mut admin, &["CLUSTER", "ADDSLOTSRANGE", "5000", "5100"]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        run::<String>(&mut admin, &["CLUSTER", "INFO"])
            .map(|info| {
                info.contains("cluster_slots_assigned:101") && info.contains("cluster_state:ok")
            })
            .unwrap_or(false)
    }));
    let mut wire = Wire::open(&server);
    let key = wire.opt_in();
    let tag = key
        .split('{')
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("a hash tag");
    let slot: i64 = run(&mut admin, &["CLUSTER", "KEYSLOT", tag]).unwrap();
    assert!((5000..=5100).contains(&slot), "{key}: slot {slot}");
    assert!(wire.wait_for(&Wire::notice_of(&key), Duration::from_secs(10)));
}
