//! Automatic enforcement on real servers: deadline precision, jitter, grace, exemptions,
//! replication links, observe mode, re-timing on CONFIG SET, pacing, INFO and the audit log.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Opens `count` idle connections (one right after the other) and returns how long each lived,
/// from just before its connect to its EOF. One thread watches every socket with `poll`, so the
/// figures are not how long a crowd of woken threads waits for the two cores.
fn lifetimes_of_idle_clients(server: &Server, count: usize, wait: Duration) -> Vec<Duration> {
    let mut open: Vec<(TcpStream, Instant)> = (0..count)
        .map(|_| {
            let connected = Instant::now();
            let socket = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
            (socket, connected)
        })
        .collect();
    let mut lifetimes = Vec::with_capacity(count);
    let give_up = Instant::now() + wait;
    while !open.is_empty() && Instant::now() < give_up {
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|(socket, _)| libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries for open sockets.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        let now = Instant::now();
        if ready <= 0 {
            continue;
        }
        let mut index = 0;
        open.retain(|(_, connected)| {
            let closed = fds[index].revents != 0;
            index += 1;
            if closed {
                lifetimes.push(now - *connected);
            }
            !closed
        });
    }
    lifetimes.extend(open.iter().map(|_| wait));
    lifetimes
}

/// The age of each client the module retired for its max age, from the audit log.
fn close_ages_ms(server: &Server) -> Vec<u64> {
    server
        .log()
        .lines()
        .filter(|line| line.contains("reason=max-age"))
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("age_ms=")))
        .filter_map(|age| age.parse().ok())
        .collect()
}

fn percentile(sorted: &[Duration], pct: f64) -> Duration {
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Max-age 500, jitter 0: idle clients, never sending a command, are closed between 500 and
/// 505 ms after they connected (all but the odd round that a machine stall delays).
#[test]
fn idle_clients_are_closed_within_five_ms_of_their_deadline() {
    let _alone = exclusive();
    for flavor in BOTH {
        let server = Server::start(flavor);
        server.raise_priority();
        let mut admin = server.admin();
        config_set(&mut admin, "maxage.jitter-pct", "0");
        config_set(&mut admin, "maxage.max-age-ms", "500");
        // 208 samples, so that p99 is not simply the slowest one, in rounds of 16: clients due
        // in the same millisecond are closed 8 per event-loop pass, so a round of 50 measured
        // how long the server's loop takes for seven passes, not when the module acts.
        let mut lifetimes: Vec<Duration> = (0..13)
            .flat_map(|_| lifetimes_of_idle_clients(&server, 16, Duration::from_secs(3)))
            .collect();
        lifetimes.sort();
        let (min, p99, max) = (
            lifetimes[0],
            percentile(&lifetimes, 99.0),
            lifetimes[lifetimes.len() - 1],
        );
        // The module's own view: the age of each client when it was closed, from the audit
        // log (every line is logged: 16 a round stays under the 40-a-second cap). The
        // client's view adds how soon the loaded machine schedules the test.
        let mut ages = close_ages_ms(&server);
        ages.sort_unstable();
        let age_p99 = ages[(ages.len() * 99).div_ceil(100) - 1];
        eprintln!(
            "{flavor:?}: lifetimes seen by the client min {min:?} p99 {p99:?} max {max:?}; ages at close (module) min {} p99 {age_p99} max {} ms",
            ages[0],
            ages[ages.len() - 1]
        );
        assert!(
            min >= Duration::from_millis(500),
            "{flavor:?}: closed early: {min:?}"
        );
        // All are logged but under a heavy load, when a round can straddle a second with the
        // previous one and the 40-lines-a-second cap folds a line into its summary.
        assert!(
            ages.len() >= 200,
            "{flavor:?}: {} close ages logged",
            ages.len()
        );
        assert!(ages[0] >= 500, "{flavor:?}: closed early: {ages:?}");
        // This shared 2-core machine stalls for 5-15 ms now and then whatever runs (see the
        // docs/performance.md), and a stall delays a whole round of 16: so 505 ms
        // must hold for 90 % of the closes (all but one round), and every round but the odd
        // stall within 520 ms.
        //
        // With I/O threads, the second pass of a round waits for the first, whose look-ups
        // pause the thread that owns the clients (Redis 8; `io_threads_slack` says why that is
        // the server's time): the bounds add the longest pass, and the first pass of every
        // round (half the closes) must meet 520 ms.
        let age_p90 = ages[(ages.len() * 90).div_ceil(100) - 1];
        let (p90_bound, late_bound) = match io_threads_slack(&mut admin) {
            None => (505, 520),
            Some(slack) => {
                let slack_ms = slack.as_millis() as u64;
                eprintln!("{flavor:?}: with I/O threads, the longest pass {slack_ms} ms");
                assert!(
                    slack <= MAX_THREADS_SLACK,
                    "{flavor:?}: a pass of {slack:?}"
                );
                let age_p50 = ages[ages.len().div_ceil(2) - 1];
                assert!(age_p50 <= 520, "{flavor:?}: p50 {age_p50} ms: {ages:?}");
                (505 + slack_ms, 520 + slack_ms)
            }
        };
        assert!(
            age_p90 <= p90_bound,
            "{flavor:?}: p90 {age_p90} ms (bound {p90_bound}): {ages:?}"
        );
        assert!(
            age_p99 <= late_bound,
            "{flavor:?}: p99 {age_p99} ms (bound {late_bound}): {ages:?}"
        );
        assert!(
            p99 <= Duration::from_millis(late_bound),
            "{flavor:?}: p99 {p99:?} (bound {late_bound} ms)"
        );
        assert!(max < Duration::from_secs(2), "{flavor:?}: never closed");
        assert!(info_field(&mut admin, "maxage_evicted_max_age").unwrap() >= 208);
    }
}

#[test]
fn jitter_spreads_closes_over_the_window_and_none_is_late() {
    let _alone = exclusive();
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.admin();
        config_set(&mut admin, "maxage.jitter-pct", "10");
        config_set(&mut admin, "maxage.max-age-ms", "1000");
        // 36: every close is logged (the audit log's cap is 40 lines a second).
        let mut lifetimes = lifetimes_of_idle_clients(&server, 36, Duration::from_secs(4));
        lifetimes.sort();
        let (min, max) = (lifetimes[0], lifetimes[35]);
        // With I/O threads a close can wait for the pass before it (`io_threads_slack`).
        let slack = io_threads_slack(&mut admin).unwrap_or_default();
        eprintln!(
            "{flavor:?}: jittered lifetimes {min:?} .. {max:?} (I/O threads' slack {slack:?})"
        );
        assert!(
            slack <= MAX_THREADS_SLACK,
            "{flavor:?}: a pass of {slack:?}"
        );
        assert!(min >= Duration::from_millis(900), "{flavor:?}: {min:?}");
        // The module's own view (the audit log's ages) meets the deadline within 5 ms; the
        // client's view adds how soon this shared 2-core machine schedules the test, which stalls 5-15 ms now and then
        // (a CI run saw 1.022 s here on Redis 8 with threads), as in the idle test above.
        let ages = close_ages_ms(&server);
        let latest_ms = ages.iter().copied().max().unwrap_or(0);
        eprintln!(
            "{flavor:?}: {} ages logged, the latest {latest_ms} ms",
            ages.len()
        );
        assert_eq!(ages.len(), 36, "{flavor:?}: {ages:?}");
        assert!(
            Duration::from_millis(latest_ms) <= Duration::from_millis(1005) + slack,
            "{flavor:?}: closed at {latest_ms} ms: {ages:?}"
        );
        assert!(
            percentile(&lifetimes, 99.0) <= Duration::from_millis(1020) + slack,
            "{flavor:?}: {max:?}"
        );
        assert!(
            min < Duration::from_millis(930),
            "{flavor:?}: window not covered: {min:?}"
        );
        assert!(
            max > Duration::from_millis(970),
            "{flavor:?}: window not covered: {max:?}"
        );
    }
}

#[test]
fn multi_and_blocked_clients_finish_their_request_first() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.admin();
        config_set(&mut admin, "maxage.grace-ms", "5000");
        let mut in_multi = server.idle_socket();
        raw_command(&mut in_multi, &["MULTI"]);
        raw_command(&mut in_multi, &["SET", "k", "v"]);
        let mut blocked = server.idle_socket();
        blocked.write_all_resp(&["BLPOP", "queue", "0"]);
        let mut idle = server.idle_socket();
        // The BLPOP was sent without reading a reply: the server has run it once it counts
        // the client as blocked.
        assert!(
            wait_until(Duration::from_secs(5), || blocked_clients(&mut admin) == 1),
            "{flavor:?}: BLPOP never blocked"
        );
        config_set(&mut admin, "maxage.jitter-pct", "0");
        config_set(&mut admin, "maxage.max-age-ms", "200");
        assert!(
            wait_until(Duration::from_secs(2), || is_closed(&mut idle)),
            "{flavor:?}"
        );
        // A fixed time on purpose: both are past their deadline, and nothing must close them
        // during these 500 ms while grace (5 s) holds them.
        sleep(Duration::from_millis(500));
        assert!(
            !is_closed(&mut in_multi),
            "{flavor:?}: MULTI client cut mid-transaction"
        );
        assert!(
            !is_closed(&mut blocked),
            "{flavor:?}: BLPOP client cut while blocked"
        );
        assert!(info_field(&mut admin, "maxage_clients_in_grace").unwrap() >= 2);

        let reply = raw_command(&mut in_multi, &["EXEC"]);
        assert!(reply.starts_with("*1"), "{flavor:?}: EXEC got {reply:?}");
        assert!(
            wait_until(Duration::from_secs(2), || is_closed(&mut in_multi)),
            "{flavor:?}"
        );

        run::<i64>(&mut admin, &["LPUSH", "queue", "job"]).unwrap();
        let mut served = String::new();
        assert!(
            wait_until(Duration::from_secs(2), || {
                let _ = blocked.set_nonblocking(true);
                let mut buf = [0u8; 128];
                if let Ok(n) = std::io::Read::read(&mut blocked, &mut buf) {
                    served.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                served.contains("job")
            }),
            "{flavor:?}: BLPOP was not served before its close: {served:?}"
        );
        let _ = blocked.set_nonblocking(false);
        assert!(
            wait_until(Duration::from_secs(2), || is_closed(&mut blocked)),
            "{flavor:?}"
        );
        assert_eq!(info_field(&mut admin, "maxage_clients_in_grace"), Some(0));
    }
}

#[test]
fn grace_runs_out_and_the_client_is_closed_anyway() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.admin();
        config_set(&mut admin, "maxage.grace-ms", "300");
        config_set(&mut admin, "maxage.jitter-pct", "0");
        let started = Instant::now();
        let mut in_multi = server.idle_socket();
        raw_command(&mut in_multi, &["MULTI"]);
        config_set(&mut admin, "maxage.max-age-ms", "200");
        assert!(wait_until(Duration::from_secs(3), || is_closed(
            &mut in_multi
        )));
        let lived = started.elapsed();
        assert!(lived >= Duration::from_millis(480), "{flavor:?}: {lived:?}");
        assert!(info_field(&mut admin, "maxage_evicted_max_age_after_grace").unwrap() >= 1);
        assert!(server.log().contains("reason=max-age-after-grace"));
    }
}

#[test]
fn exempt_users_names_and_no_evict_clients_survive() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.admin();
        create_user(&mut admin, "ops", &["+@all"]);
        config_set(&mut admin, "maxage.exempt-users", "ops");
        config_set(&mut admin, "maxage.exempt-names", "monitoring-* backup");
        let mut monitoring = server.idle_socket();
        raw_command(&mut monitoring, &["CLIENT", "SETNAME", "monitoring-7"]);
        let mut ops = server.idle_socket();
        raw_command(&mut ops, &["AUTH", "ops", "pw"]);
        let mut no_evict = server.idle_socket();
        raw_command(&mut no_evict, &["CLIENT", "NO-EVICT", "on"]);
        let mut web = server.idle_socket();
        raw_command(&mut web, &["CLIENT", "SETNAME", "web-1"]);
        config_set(&mut admin, "maxage.max-age-ms", "200");
        assert!(
            wait_until(Duration::from_secs(2), || is_closed(&mut web)),
            "{flavor:?}"
        );
        // A fixed time on purpose: the exempt clients are past their deadline too (they
        // connected before `web`), and nothing must close them during these 300 ms.
        sleep(Duration::from_millis(300));
        for (what, socket) in [
            ("name", &mut monitoring),
            ("user", &mut ops),
            ("no-evict", &mut no_evict),
        ] {
            assert!(
                !is_closed(socket),
                "{flavor:?}: exempt by {what} but closed"
            );
        }
        assert!(info_field(&mut admin, "maxage_exempted").unwrap() >= 3);
        // Taking no-evict out of the exempt types makes the limit hard for those clients.
        config_set(&mut admin, "maxage.exempt-types", "master replica");
        assert!(
            wait_until(Duration::from_secs(3), || is_closed(&mut no_evict)),
            "{flavor:?}"
        );
        assert!(!is_closed(&mut monitoring));
    }
}

#[test]
fn replication_links_survive_a_tiny_max_age() {
    for flavor in BOTH {
        let master = Server::builder(flavor)
            .module_args(&["max-age-ms", "200", "jitter-pct", "0"])
            .start();
        let replica = Server::builder(flavor)
            .module_args(&["max-age-ms", "200", "jitter-pct", "0"])
            .config(&format!("replicaof 127.0.0.1 {}", master.port))
            .start();
        let link_up = |server: &Server| {
            let mut conn = server.conn();
            let info: String = run(&mut conn, &["INFO", "replication"]).unwrap();
            info.contains("master_link_status:up")
        };
        assert!(
            wait_until(Duration::from_secs(10), || link_up(&replica)),
            "{flavor:?}"
        );
        let replica_link_id = |server: &Server| -> Vec<u64> {
            let mut conn = server.conn();
            let list: String = run(&mut conn, &["CLIENT", "LIST", "TYPE", "replica"]).unwrap();
            list.lines()
                .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
                .map(|id| id.parse().unwrap())
                .collect()
        };
        // Never-used connections are retired at their deadline on the master.
        let mut idle: Vec<TcpStream> = (0..5).map(|_| master.idle_socket()).collect();
        let before = replica_link_id(&master);
        assert_eq!(before.len(), 1, "{flavor:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut round = 0;
        while Instant::now() < deadline {
            round += 1;
            let mut writer = master.conn();
            run::<()>(&mut writer, &["SET", "counter", &round.to_string()]).unwrap();
            assert!(
                link_up(&replica),
                "{flavor:?}: link went down in round {round}"
            );
            // The rounds' pace over a fixed 5 s: the link must stay up through many 200 ms
            // max ages, so the time passing is the point.
            sleep(Duration::from_millis(250));
        }
        assert_eq!(
            replica_link_id(&master),
            before,
            "{flavor:?}: replica link was replaced"
        );
        let mut reader = replica.conn();
        assert!(wait_until(Duration::from_secs(2), || {
            run::<String>(&mut reader, &["GET", "counter"]).ok() == Some(round.to_string())
        }));
        let mut admin = master.admin();
        assert!(
            info_field(&mut admin, "maxage_evicted_max_age").unwrap() >= 5,
            "{flavor:?}"
        );
        assert!(idle.iter_mut().all(is_closed), "{flavor:?}");
        assert!(
            info_field(&mut admin, "maxage_exempted").unwrap() >= 1,
            "{flavor:?}"
        );
    }
}

#[test]
fn observe_mode_closes_nothing_and_counts_everything() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["mode", "observe", "jitter-pct", "0"])
            .start();
        let mut admin = server.admin();
        let mut idle: Vec<TcpStream> = (0..10).map(|_| server.idle_socket()).collect();
        config_set(&mut admin, "maxage.max-age-ms", "100");
        assert!(wait_until(Duration::from_secs(2), || {
            info_field(&mut admin, "maxage_observed_would_evict").unwrap_or(0) >= 10
        }));
        // A fixed time on purpose: all are counted as due, and nothing must close them during
        // these 200 ms in observe mode.
        sleep(Duration::from_millis(200));
        assert!(idle.iter_mut().all(|s| !is_closed(s)), "{flavor:?}");
        assert_eq!(
            info_field(&mut admin, "maxage_evicted_connections"),
            Some(0)
        );
        assert!(server.log().contains("would retire (observe mode)"));
        // Switching to enforce retires them.
        config_set(&mut admin, "maxage.mode", "enforce");
        assert!(wait_until(Duration::from_secs(2), || idle
            .iter_mut()
            .all(is_closed)));
    }
}

#[test]
fn config_set_retimes_connected_clients() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.admin();
        config_set(&mut admin, "maxage.jitter-pct", "0");
        config_set(&mut admin, "maxage.max-age-ms", "60000");
        let started = Instant::now();
        let mut idle = server.idle_socket();
        // A fixed time on purpose: the client ages 200 ms before the limit is lowered, so that
        // it is closed 600 ms after its connect, not after the CONFIG SET.
        sleep(Duration::from_millis(200));
        assert!(!is_closed(&mut idle));
        assert!(info_field(&mut admin, "maxage_next_deadline_in_ms").unwrap() > 50_000);
        // Lowering the limit applies to clients already connected, counted from their connect.
        config_set(&mut admin, "maxage.max-age-ms", "600");
        assert!(wait_until(Duration::from_secs(2), || is_closed(&mut idle)));
        let lived = started.elapsed();
        assert!(
            lived >= Duration::from_millis(600) && lived < Duration::from_millis(900),
            "{flavor:?} {lived:?}"
        );
        // Turning enforcement off stops it.
        config_set(&mut admin, "maxage.max-age-ms", "0");
        let mut spared = server.idle_socket();
        // A fixed time on purpose: with enforcement off nothing must close the client during
        // these 800 ms (longer than the 600 ms max age it would have had).
        sleep(Duration::from_millis(800));
        assert!(!is_closed(&mut spared));
        assert_eq!(
            info_field(&mut admin, "maxage_next_deadline_in_ms"),
            Some(-1)
        );
    }
}

/// 2,000 clients fall due at once; they are retired at no more than the configured rate.
#[test]
fn a_mass_expiry_is_paced() {
    let _alone = exclusive();
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.admin();
        config_set(&mut admin, "maxage.max-evictions-per-sec", "1000");
        let sockets: Vec<TcpStream> = (0..2000).map(|_| server.idle_socket()).collect();
        config_set(&mut admin, "maxage.max-age-ms", "100");
        let started = Instant::now();
        let closes = close_times(&sockets, Duration::from_secs(6));
        assert_eq!(closes.len(), 2000, "{flavor:?}: not all retired");
        let total = closes.last().unwrap().as_secs_f64();
        // 2,000 at 1,000/s with a burst of 50 takes just under two seconds.
        assert!(total >= 1.8, "{flavor:?}: too fast: {total}s");
        // The rate allows 1,000 a second plus a burst of 50; the client sees closes through
        // poll() on a busy machine, which can bunch a few milliseconds' worth together.
        let busiest_second = closes
            .iter()
            .map(|start| {
                closes
                    .iter()
                    .filter(|t| **t >= *start && **t < *start + Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap();
        eprintln!("{flavor:?}: busiest second saw {busiest_second} closes");
        assert!(
            busiest_second <= 1100,
            "{flavor:?}: {busiest_second} closes in one second"
        );
        assert!(info_field(&mut admin, "maxage_pacing_delays").unwrap() > 0);
        eprintln!(
            "{flavor:?}: 2000 retirements took {total:.2}s (started {:?} ago)",
            started.elapsed()
        );
    }
}

/// When each socket saw EOF, measured from now, sorted; polls all of them at once.
fn close_times(sockets: &[TcpStream], limit: Duration) -> Vec<Duration> {
    let started = Instant::now();
    let mut open: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        })
        .collect();
    let mut closes = Vec::new();
    while !open.is_empty() && started.elapsed() < limit {
        // SAFETY: `open` is a valid array of pollfd for the duration of the call.
        let ready = unsafe { libc::poll(open.as_mut_ptr(), open.len() as libc::nfds_t, 5) };
        if ready <= 0 {
            continue;
        }
        let now = started.elapsed();
        open.retain(|p| {
            let closed = p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
            if closed {
                closes.push(now);
            }
            !closed
        });
    }
    closes.sort();
    closes
}

#[test]
fn info_and_log_show_every_retirement() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["max-age-ms", "150", "jitter-pct", "0"])
            .start();
        let mut sockets: Vec<TcpStream> = (0..12).map(|_| server.idle_socket()).collect();
        for (i, socket) in sockets.iter_mut().enumerate() {
            raw_command(socket, &["CLIENT", "SETNAME", &format!("worker-{i}")]);
        }
        assert!(wait_until(Duration::from_secs(2), || sockets
            .iter_mut()
            .all(is_closed)));
        let mut admin = server.admin();
        run::<()>(&mut admin, &["CONFIG", "SET", "maxage.max-age-ms", "0"]).unwrap();
        let retired = info_field(&mut admin, "maxage_evicted_max_age").unwrap();
        let log = server.log();
        let logged = log.lines().filter(|l| l.contains("reason=max-age")).count() as i64;
        assert_eq!(logged, retired, "{flavor:?}");
        assert!(log.contains("name=\"worker-3\""), "{flavor:?}");
        let info: String = run(&mut admin, &["INFO", "everything"]).unwrap();
        assert!(info.contains("# maxage"), "{flavor:?}");
        for field in [
            "maxage_tracked_clients",
            "maxage_evicted_connections",
            "maxage_clients_in_grace",
            "maxage_clients_delayed_by_pacing",
            "maxage_oldest_client_age_ms",
            "maxage_next_deadline_in_ms",
            "maxage_max_age_ms",
        ] {
            assert!(info.contains(field), "{flavor:?} lacks {field}");
        }
        // Twelve retirements took at least one wake-up, and the total holds the longest.
        let wakeups = info_field(&mut admin, "maxage_wakeups").unwrap();
        let total_us = info_field(&mut admin, "maxage_wakeup_us_total").unwrap();
        let longest_us = info_field(&mut admin, "maxage_longest_wakeup_us").unwrap();
        assert!(wakeups >= 1, "{flavor:?}");
        assert!(
            total_us >= longest_us,
            "{flavor:?}: {total_us} < {longest_us}"
        );
        let stats: String = run(&mut admin, &["INFO", "stats"]).unwrap();
        assert!(stats.contains("rejected_connections"));
    }
}

/// `blocked_clients` from `INFO clients`.
fn blocked_clients(conn: &mut redis::Connection) -> i64 {
    let info: String = run(conn, &["INFO", "clients"]).unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix("blocked_clients:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(-1)
}

trait WriteResp {
    fn write_all_resp(&mut self, args: &[&str]);
}

impl WriteResp for TcpStream {
    fn write_all_resp(&mut self, args: &[&str]) {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        std::io::Write::write_all(self, request.as_bytes()).unwrap();
    }
}

/// Per-class max ages: first matching rule wins, the default applies otherwise, 0 is never.
#[test]
fn rules_give_each_class_its_own_max_age() {
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&["jitter-pct", "0"])
            .start();
        let mut admin = server.admin();
        create_user(&mut admin, "fast", &["+@all"]);
        run::<()>(
            &mut admin,
            &[
                "CONFIG",
                "SET",
                "maxage.rules",
                "name:monitoring-*=0 name:batch-*=5000 user:fast=400",
            ],
        )
        .unwrap();
        run::<()>(&mut admin, &["CONFIG", "SET", "maxage.max-age-ms", "2500"]).unwrap();
        let started = Instant::now();
        let mut fast = server.idle_socket();
        raw_command(&mut fast, &["AUTH", "fast", "pw"]);
        let mut batch = server.idle_socket();
        raw_command(&mut batch, &["CLIENT", "SETNAME", "batch-7"]);
        let mut monitoring = server.idle_socket();
        raw_command(&mut monitoring, &["CLIENT", "SETNAME", "monitoring-1"]);
        let mut plain = server.idle_socket();
        let rules: Vec<Vec<redis::Value>> =
            run(&mut admin, &["MAXAGE.LIST", "SKIPME", "yes"]).unwrap();
        let labels: Vec<String> = rules
            .iter()
            .map(|fields| {
                let at = fields
                    .iter()
                    .position(|v| *v == redis::Value::BulkString(b"rule".to_vec()))
                    .unwrap();
                redis::from_redis_value(fields[at + 1].clone()).unwrap()
            })
            .collect();
        for label in ["user:fast", "name:batch-*", "name:monitoring-*", "default"] {
            assert!(labels.iter().any(|l| l == label), "{flavor:?}: {labels:?}");
        }
        // The fast user's connection (quiet since AUTH) goes first, at 0.4-1.5 s.
        assert!(wait_until(Duration::from_secs(3), || is_closed(&mut fast)));
        let fast_lived = started.elapsed();
        assert!(
            !is_closed(&mut plain),
            "{flavor:?}: default class closed before the fast one"
        );
        // The default class (never sent a command) at 2.5 s.
        assert!(wait_until(Duration::from_secs(4), || is_closed(&mut plain)));
        let plain_lived = started.elapsed();
        assert!(
            !is_closed(&mut batch),
            "{flavor:?}: batch class closed with the default"
        );
        assert!(wait_until(Duration::from_secs(5), || is_closed(&mut batch)));
        let batch_lived = started.elapsed();
        eprintln!(
            "{flavor:?}: fast {fast_lived:?}, default {plain_lived:?}, batch {batch_lived:?}"
        );
        assert!(fast_lived < Duration::from_millis(1600), "{flavor:?}");
        assert!(plain_lived >= Duration::from_millis(2500), "{flavor:?}");
        assert!(batch_lived >= Duration::from_millis(5000), "{flavor:?}");
        assert!(
            !is_closed(&mut monitoring),
            "{flavor:?}: a max age of 0 means never"
        );
        // A malformed rule set is refused whole; the old one stays.
        let error = error_of(
            &mut admin,
            &["CONFIG", "SET", "maxage.rules", "name:a=1 colour:red=5"],
        );
        assert!(
            error.contains("unknown kind 'colour'"),
            "{flavor:?}: {error}"
        );
        let kept: Vec<String> = run(&mut admin, &["CONFIG", "GET", "maxage.rules"]).unwrap();
        assert!(kept[1].starts_with("name:monitoring-*=0"), "{flavor:?}");
    }
}

/// Client-side caching with a redirect: when the connection that receives a tracking client's
/// invalidations is retired, the tracking client is retired first, so the application
/// re-establishes both instead of keeping a data connection whose invalidations go nowhere.
/// The server redirects to a RESP2 client subscribed in any way (`SUBSCRIBE`, `PSUBSCRIBE`,
/// `SSUBSCRIBE`): each is a redirect target.
#[test]
fn tracking_redirect_pairs_are_retired_together() {
    for flavor in BOTH {
        for subscribe in [
            &["SUBSCRIBE", "__redis__:invalidate"][..],
            &["PSUBSCRIBE", "__redis__:*"][..],
            &["SSUBSCRIBE", "shard-channel"][..],
        ] {
            let server = Server::builder(flavor)
                .module_args(&["jitter-pct", "0"])
                .start();
            let mut admin = server.admin();
            run::<()>(&mut admin, &["SET", "k", "v1"]).unwrap();
            let connect_pair = |subscribe: &[&str]| {
                let mut target = server.idle_socket();
                raw_command(&mut target, &["CLIENT", "SETNAME", "invalidations"]);
                let target_id = raw_client_id(&mut target).to_string();
                raw_command(&mut target, subscribe);
                let mut data = server.idle_socket();
                let reply = raw_command(
                    &mut data,
                    &["CLIENT", "TRACKING", "on", "REDIRECT", &target_id],
                );
                assert_eq!(reply, "+OK\r\n");
                raw_command(&mut data, &["GET", "k"]);
                (target, data)
            };
            let (mut target, mut data) = connect_pair(subscribe);
            // Only the invalidation connection's class is due soon; the data connection's is not.
            run::<()>(
                &mut admin,
                &["CONFIG", "SET", "maxage.rules", "name:invalidations=300"],
            )
            .unwrap();
            run::<()>(&mut admin, &["CONFIG", "SET", "maxage.max-age-ms", "60000"]).unwrap();
            let started = Instant::now();
            let (mut data_closed, mut target_closed) = (None, None);
            wait_until(Duration::from_secs(5), || {
                if data_closed.is_none() && is_closed(&mut data) {
                    data_closed = Some(started.elapsed());
                }
                if target_closed.is_none() && is_closed(&mut target) {
                    target_closed = Some(started.elapsed());
                }
                data_closed.is_some() && target_closed.is_some()
            });
            let (data_closed, target_closed) = (
                data_closed.unwrap_or_else(|| {
                    panic!("{flavor:?} {subscribe:?}: the tracking client was left connected")
                }),
                target_closed.expect("the invalidation connection was retired"),
            );
            assert!(
                data_closed <= target_closed,
                "{flavor:?} {subscribe:?}: data {data_closed:?} target {target_closed:?}"
            );
            run::<()>(&mut admin, &["CONFIG", "SET", "maxage.rules", ""]).unwrap();
            run::<()>(&mut admin, &["CONFIG", "SET", "maxage.max-age-ms", "0"]).unwrap();
            if subscribe[0] != "SUBSCRIBE" {
                continue;
            }

            // The application reconnects both, and invalidations flow again.
            let (mut target, _data) = connect_pair(&["SUBSCRIBE", "__redis__:invalidate"]);
            run::<()>(&mut admin, &["SET", "k", "v2"]).unwrap();
            let mut received = String::new();
            assert!(
                wait_until(Duration::from_secs(2), || {
                    let _ = target.set_read_timeout(Some(Duration::from_millis(50)));
                    let mut buf = [0u8; 256];
                    if let Ok(n) = std::io::Read::read(&mut target, &mut buf) {
                        received.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                    received.contains("__redis__:invalidate") && received.contains("$1\r\nk\r\n")
                }),
                "{flavor:?}: no invalidation after reconnecting: {received:?}"
            );
        }
    }
}

/// Adaptive pacing: while the event loop is busy the retirement rate falls towards its floor,
/// the slack (max-overdue-ms) still bounds how late anyone is retired, and once the server is
/// idle again the rate climbs back to the maximum.
#[test]
fn adaptive_pacing_slows_down_under_load_within_the_slack() {
    let _alone = exclusive();
    for flavor in BOTH {
        let server = Server::builder(flavor)
            .module_args(&[
                "pacing",
                "adaptive",
                "min-evictions-per-sec",
                "20",
                "max-overdue-ms",
                "2500",
                "jitter-pct",
                "0",
            ])
            .start();
        let mut admin = server.admin();
        let mut sockets: Vec<TcpStream> = (0..400).map(|_| server.idle_socket()).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = {
            let stop = std::sync::Arc::clone(&stop);
            let url = server.url();
            std::thread::spawn(move || {
                let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
                run::<()>(&mut conn, &["CLIENT", "NO-EVICT", "on"]).unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _: redis::RedisResult<i64> = run(
                        &mut conn,
                        &[
                            "EVAL",
                            "local i = 0 while i < 2000000 do i = i + 1 end return i",
                            "0",
                        ],
                    );
                }
            })
        };
        // The module reads the busy loop before it is asked to retire anyone.
        assert!(
            wait_until(Duration::from_secs(10), || {
                info_field(&mut admin, "maxage_event_loop_busy_pct").unwrap_or(0) >= 50
            }),
            "{flavor:?}: the busy loop did not register: {:?}%",
            info_field(&mut admin, "maxage_event_loop_busy_pct")
        );
        run::<()>(&mut admin, &["CONFIG", "SET", "maxage.max-age-ms", "100"]).unwrap();
        let set_at = Instant::now();
        // A fixed time on purpose: the test counts the retirements of the first second
        // under load.
        sleep(Duration::from_millis(1000));
        let retired_under_load = info_field(&mut admin, "maxage_evicted_max_age").unwrap();
        let utilization = info_field(&mut admin, "maxage_event_loop_busy_pct").unwrap();
        let rate_now = info_field(&mut admin, "maxage_evictions_per_sec_now").unwrap();
        eprintln!(
            "{flavor:?}: {retired_under_load} retired in the first second under load, utilization {utilization}%, rate {rate_now}/s"
        );
        assert!(
            utilization >= 50,
            "{flavor:?}: the busy loop did not register: {utilization}%"
        );
        assert!(rate_now < 500, "{flavor:?}: rate {rate_now}");
        assert!(
            retired_under_load < 300,
            "{flavor:?}: {retired_under_load} retired at full speed"
        );
        // The slack: everyone is retired within max-overdue-ms of when pacing began holding
        // them back (here, right after the CONFIG SET), plus the full-size passes that follow.
        // With I/O threads each of those passes can take as long as the longest pass, which
        // the server's pauses of its threads make (`io_threads_slack`): 50 passes of 8 each.
        let threads_wait = io_threads_slack(&mut admin).map_or(Duration::ZERO, |slack| slack * 50);
        assert!(
            wait_until(Duration::from_secs(8) + threads_wait, || sockets
                .iter_mut()
                .all(is_closed)),
            "{flavor:?}: {} of 400 closed; {}",
            sockets
                .iter_mut()
                .map(is_closed)
                .filter(|closed| *closed)
                .count(),
            run::<String>(&mut admin, &["INFO", "maxage"]).unwrap_or_default()
        );
        let all_closed_after = set_at.elapsed();
        let slack = io_threads_slack(&mut admin);
        eprintln!(
            "{flavor:?}: all 400 retired {all_closed_after:?} after the CONFIG SET (I/O threads' slack {slack:?})"
        );
        assert!(
            all_closed_after >= Duration::from_millis(2400),
            "{flavor:?}: slack not held"
        );
        let bound = Duration::from_millis(5000) + slack.map_or(Duration::ZERO, |s| s * 50);
        assert!(all_closed_after < bound, "{flavor:?}: bound {bound:?}");
        if let Some(slack) = slack {
            assert!(
                slack <= MAX_THREADS_SLACK,
                "{flavor:?}: a pass of {slack:?}"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        busy.join().unwrap();

        // Idle again: the reading falls and the rate climbs back to the maximum (1000/s)...
        assert!(
            wait_until(Duration::from_secs(3), || {
                info_field(&mut admin, "maxage_evictions_per_sec_now").unwrap() >= 900
            }),
            "{flavor:?}: the rate stayed at {:?}/s",
            info_field(&mut admin, "maxage_evictions_per_sec_now")
        );
        let busy_now = info_field(&mut admin, "maxage_event_loop_busy_pct").unwrap();
        assert!(busy_now < 30, "{flavor:?}: still {busy_now}% busy");
        // ...so a new batch that falls due at once is retired at full speed (300 at 1000/s).
        let mut fresh: Vec<TcpStream> = (0..300).map(|_| server.idle_socket()).collect();
        let opened_at = Instant::now();
        assert!(
            wait_until(Duration::from_secs(10), || fresh.iter_mut().all(is_closed)),
            "{flavor:?}"
        );
        let took = opened_at.elapsed();
        // At 1,000/s the wake-ups come a token at a time, about 300 of them. With I/O threads
        // each looks at least one client up, which on Redis 8 pauses the thread that owns it:
        // 2 us with a core to spare, up to 12 ms on 2 busy cores (`thread_pause`), so the bound
        // with threads is 300 passes of up to 30 ms: 10 s.
        let threads = io_threads_slack(&mut admin);
        let bound = if threads.is_some() {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(1500)
        };
        eprintln!(
            "{flavor:?}: 300 idle clients retired {took:?} after connecting, server idle (longest pass {threads:?})"
        );
        assert!(took < bound, "{flavor:?}: {took:?} (bound {bound:?})");
    }
}

/// MAXAGE.PREVIEW: what a proposed rule set would retire, per class, without doing it.
#[test]
fn preview_reports_a_proposed_rule_set_and_changes_nothing() {
    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut web: Vec<TcpStream> = (0..3).map(|_| server.idle_socket()).collect();
        for (i, socket) in web.iter_mut().enumerate() {
            raw_command(socket, &["CLIENT", "SETNAME", &format!("web-{i}")]);
        }
        let mut job = server.idle_socket();
        raw_command(&mut job, &["CLIENT", "SETNAME", "job"]);
        // A fixed time on purpose: the web clients age past the proposed 500 ms, so that a
        // preview that applied its rules would have them closed.
        sleep(Duration::from_millis(600));
        let mut admin = server.admin();
        let reply: redis::Value = run(
            &mut admin,
            &[
                "MAXAGE.PREVIEW",
                "RULES",
                "name:web-*=500 name:job=0",
                "MAX-AGE-MS",
                "3600000",
                "WITHIN",
                "60000",
            ],
        )
        .unwrap();
        let text = format!("{reply:?}");
        let fields: Vec<String> = match reply {
            redis::Value::Array(items) => items.iter().map(|v| format!("{v:?}")).collect(),
            other => panic!("{other:?}"),
        };
        assert!(
            fields.iter().any(|f| f.contains("would-retire-within")),
            "{flavor:?}: {text}"
        );
        // RESP2: [within-ms, 60000, would-retire-within, 3, classes, [...]]
        assert!(fields[3].contains('3'), "{flavor:?}: {text}");
        for needle in [
            "name:web-*",
            "name:job",
            "default",
            "age-histogram",
            "lt-1s",
            "due-now",
        ] {
            assert!(text.contains(needle), "{flavor:?} lacks {needle}: {text}");
        }
        // Nothing was applied or closed.
        let rules: Vec<String> = run(&mut admin, &["CONFIG", "GET", "maxage.rules"]).unwrap();
        assert_eq!(rules[1], "");
        assert!(
            web.iter_mut().all(|s| !is_closed(s)) && !is_closed(&mut job),
            "{flavor:?}"
        );
        let error = error_of(&mut admin, &["MAXAGE.PREVIEW", "RULES", "name:web=soon"]);
        assert!(error.contains("not a number"), "{flavor:?}: {error}");
        assert_eq!(
            error_of(&mut admin, &["MAXAGE.PREVIEW", "WITHIN"]),
            "ERR syntax error"
        );
    }
}

/// A multiplexing client (ioredis, the Rust crate's multiplexed connection) writes requests
/// without waiting for replies, so a retired connection has requests behind the one after which
/// it is closed. Those are not run (the client may resend them); every one that was run must
/// have had its reply delivered, or the client resends it and it runs twice. On Redis 8 with
/// I/O threads, where a due client is closed inside its own next command, the socket used to
/// be closed with requests unread, which sends a reset and dropped the corked reply (ioredis
/// with its default resend: 73 executed twice in 454 retirements).
#[test]
fn a_pipelining_client_gets_the_reply_of_every_request_the_server_ran() {
    use std::io::{BufRead, BufReader, Write};

    /// Connects again and again until `until`; on each connection keeps two requests in flight
    /// (two callers sharing it, as ioredis's do), writing the next one the moment a reply comes.
    /// Returns the connections made and the replies read.
    fn pipeline_until(port: u16, key: String, until: Instant) -> (u64, u64) {
        let request = format!("INCR {key}\r\n");
        let (mut connections, mut replies) = (0, 0);
        while Instant::now() < until {
            let Ok(socket) = TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            socket.set_nodelay(true).expect("nodelay");
            connections += 1;
            let mut writer = socket.try_clone().expect("clone");
            if writer.write_all(request.repeat(2).as_bytes()).is_err() {
                continue;
            }
            let mut reader = BufReader::new(socket);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.starts_with(':') => replies += 1,
                    Ok(_) => panic!("unexpected reply {line:?}"),
                }
                // A write on a connection the server has closed fails, or is answered by
                // nothing: the read above then ends.
                let _ = writer.write_all(request.as_bytes());
            }
        }
        (connections, replies)
    }

    for flavor in BOTH {
        let server = Server::start(flavor);
        let mut admin = server.admin();
        config_set(&mut admin, "maxage.jitter-pct", "0");
        config_set(&mut admin, "maxage.max-age-ms", "200");
        let until = Instant::now() + Duration::from_secs(3);
        let loops: Vec<_> = (0..8)
            .map(|i| {
                let port = server.port;
                std::thread::spawn(move || pipeline_until(port, format!("pipelined:{i}"), until))
            })
            .collect();
        let joined: Vec<(u64, u64)> = loops
            .into_iter()
            .map(|handle| handle.join().expect("pipelining client"))
            .collect();
        eprintln!(
            "{flavor:?}: closed in the next command {:?}, after a reply {:?}, idle {:?}, after grace {:?}",
            info_field(&mut admin, "maxage_closed_in_next_command"),
            info_field(&mut admin, "maxage_closed_after_reply"),
            info_field(&mut admin, "maxage_closed_while_idle"),
            info_field(&mut admin, "maxage_evicted_max_age_after_grace"),
        );
        for (i, (connections, replies)) in joined.into_iter().enumerate() {
            let ran: Option<u64> =
                run(&mut admin, &["GET", &format!("pipelined:{i}")]).expect("GET");
            let ran = ran.unwrap_or(0);
            eprintln!(
                "{flavor:?}: client {i}: {connections} connections, {ran} INCRs run, {replies} replies"
            );
            assert!(
                connections >= 5,
                "{flavor:?}: client {i}: {connections} connections"
            );
            assert_eq!(
                ran, replies,
                "{flavor:?}: client {i}: a reply was lost for a request the server ran"
            );
        }
    }
}
