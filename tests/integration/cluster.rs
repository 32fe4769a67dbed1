//! A 3-master, 3-replica Redis Cluster on loopback with the module loaded on every node and
//! enforcement on everywhere: the cluster stays healthy, replica links are never cut, client
//! connections are retired on every node, and `redis-cli --cluster call` kills cluster-wide.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

fn info(server: &Server, section: &str) -> String {
    let mut conn = server.conn();
    run::<String>(&mut conn, &["INFO", section]).unwrap_or_default()
}

fn cluster_state_ok(server: &Server) -> bool {
    let mut conn = server.conn();
    run::<String>(&mut conn, &["CLUSTER", "INFO"])
        .map(|info| info.contains("cluster_state:ok"))
        .unwrap_or(false)
}

/// Traffic from redis-py's cluster client in the background; prints "ok failed" at the end.
fn cluster_traffic(port: u16, seconds: u64) -> Child {
    let code = format!(
        "import time, redis\n\
         from redis.cluster import RedisCluster\n\
         rc = RedisCluster(host='127.0.0.1', port={port})\n\
         ok = failed = 0\n\
         end = time.time() + {seconds}\n\
         i = 0\n\
         while time.time() < end:\n\
         \x20   i += 1\n\
         \x20   try:\n\
         \x20       rc.set(f'key:{{i % 1000}}', i); rc.get(f'key:{{i % 997}}'); ok += 2\n\
         \x20   except Exception:\n\
         \x20       failed += 1\n\
         print(ok, failed)\n"
    );
    Command::new("python3")
        .args(["-c", &code])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3")
}

#[test]
fn cluster_with_the_module_on_every_node() {
    if !runs_on(Flavor::Redis) {
        return;
    }
    let _alone = exclusive();
    let nodes: Vec<Server> = (0..6)
        .map(|_| Server::builder(Flavor::Redis).cluster_node().start())
        .collect();
    let mut create = vec!["--cluster".to_string(), "create".to_string()];
    create.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
    create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
    let args: Vec<&str> = create.iter().map(String::as_str).collect();
    let output = redis_cli(&args);
    assert!(output.contains("[OK] All 16384 slots covered"), "{output}");
    assert!(wait_until(Duration::from_secs(20), || nodes
        .iter()
        .all(cluster_state_ok)));
    let replicas: Vec<&Server> = nodes
        .iter()
        .filter(|n| info(n, "replication").contains("role:slave"))
        .collect();
    assert_eq!(replicas.len(), 3);
    assert!(wait_until(Duration::from_secs(20), || {
        replicas
            .iter()
            .all(|r| info(r, "replication").contains("master_link_status:up"))
    }));
    let replica_links_before: Vec<String> = nodes
        .iter()
        .map(|n| {
            let mut conn = n.conn();
            run::<String>(&mut conn, &["CLIENT", "LIST", "TYPE", "replica"]).unwrap_or_default()
        })
        .map(|list| {
            list.lines()
                .filter_map(|l| l.split(' ').next())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();

    // Enforcement on everywhere, configured per node.
    for node in &nodes {
        let mut conn = node.admin();
        run::<()>(&mut conn, &["CONFIG", "SET", "maxage.max-age-ms", "700"]).unwrap();
    }
    let mut idle: Vec<TcpStream> = nodes.iter().map(Server::idle_socket).collect();
    let traffic = cluster_traffic(nodes[0].port, 6);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        for node in &nodes {
            assert!(
                cluster_state_ok(node),
                "cluster_state went bad after {:?}",
                started.elapsed()
            );
        }
        for replica in &replicas {
            assert!(info(replica, "replication").contains("master_link_status:up"));
        }
        // The checks' pace over a fixed 6 s: the cluster must stay healthy through many
        // 700 ms max ages.
        std::thread::sleep(Duration::from_millis(300));
    }
    let output = traffic.wait_with_output().unwrap();
    let counts = String::from_utf8_lossy(&output.stdout);
    let (ok, failed): (u64, u64) = {
        let mut parts = counts.split_whitespace().map(|n| n.parse().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    };
    eprintln!(
        "cluster traffic: {ok} ok, {failed} failed ({})",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(ok > 1000, "too little traffic got through: {counts}");

    assert!(
        idle.iter_mut().all(is_closed),
        "an idle client outlived max-age somewhere"
    );
    for (node, before) in nodes.iter().zip(&replica_links_before) {
        let mut conn = node.admin();
        assert!(
            info_field(&mut conn, "maxage_evicted_max_age").unwrap() >= 1,
            "node {}",
            node.port
        );
        let list =
            run::<String>(&mut conn, &["CLIENT", "LIST", "TYPE", "replica"]).unwrap_or_default();
        let after = list
            .lines()
            .filter_map(|l| l.split(' ').next())
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            &after, before,
            "a replica link was replaced on node {}",
            node.port
        );
    }

    // One call reaches every node.
    let _victims: Vec<TcpStream> = nodes.iter().map(Server::idle_socket).collect();
    let first = format!("127.0.0.1:{}", nodes[0].port);
    let output = redis_cli(&[
        "--cluster",
        "call",
        &first,
        "MAXAGE.KILL",
        "MAXAGE-MS",
        "1",
        "DRYRUN",
    ]);
    let answering = output
        .lines()
        .filter(|l| l.starts_with("127.0.0.1:"))
        .count();
    assert_eq!(answering, 6, "{output}");
}
