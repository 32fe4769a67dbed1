//! The `redis` crate under scripts/client-impact's load (see scripts/maxage_tools/client_impact.py
//! for the protocol every load generator shares):
//!
//!     impact-load-rs --client rust-redis --port N [--host H] [--tls-ca PEM] --seconds S
//!                    --workers W --connections C --prefix P
//!
//! C `ConnectionManager`s (each one multiplexed connection that reconnects by itself), shared by
//! W tokio tasks (task w uses manager w % C); with `--client rust-redis+adapter` they are
//! clients/rust's `redis_maxage_client::ConnectionManager` on RESP3, which opts in to the
//! module's notice and swaps in a new connection when told (docs/notices.md). Each task loops
//! until S seconds have passed: GET or SET on a random key `{P}key:{n}`, or INCR on its own
//! `{P}incr:{w}`, one third each. Every error is one failed request (then the task pauses 1 ms,
//! as an error path would). The crate has no request retry:
//! `ConnectionManagerConfig::number_of_retries` is how often a *reconnect* is attempted, and is
//! left at its default (the adapter's too). Response and connection timeouts are 5 s.
//!
//! Prints one JSON object on stdout: requests ok/failed, per-task INCR successes and failures,
//! latency percentiles (ms, all requests), the error messages, and with the adapter its
//! counters (`adapter`: notices, replacements, ...).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RedisResult};

const REDIS_CRATE: &str = "redis 1.8.1 (ConnectionManager)";
const ADAPTER: &str = "rust-redis+adapter";
const REDIS_CRATE_ADAPTER: &str =
    "redis 1.8.1 + redis-maxage-client (clients/rust: ConnectionManager taking notices, RESP3)";
const KEYSPACE: u64 = 10_000;
const VALUE: &[u8] = &[b'v'; 100];
const TIMEOUT: Duration = Duration::from_secs(5);
const PAUSE_AFTER_FAILURE: Duration = Duration::from_millis(1);

struct Args {
    client: String,
    host: String,
    port: u16,
    tls_ca: Option<String>,
    seconds: f64,
    workers: usize,
    connections: usize,
    prefix: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        client: "rust-redis".into(),
        host: "127.0.0.1".into(),
        port: 0,
        tls_ca: None,
        seconds: 5.0,
        workers: 32,
        connections: 16,
        prefix: "impact:".into(),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--client" => args.client = value,
            "--host" => args.host = value,
            "--port" => args.port = value.parse().map_err(|e| bad(&e))?,
            "--tls-ca" => args.tls_ca = Some(value),
            "--seconds" => args.seconds = value.parse().map_err(|e| bad(&e))?,
            "--workers" => args.workers = value.parse().map_err(|e| bad(&e))?,
            "--connections" => args.connections = value.parse().map_err(|e| bad(&e))?,
            "--prefix" => args.prefix = value,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if args.port == 0 || args.workers == 0 || args.connections == 0 {
        return Err("--port, --workers and --connections are required and positive".into());
    }
    Ok(args)
}

/// xorshift64*: a few random numbers per request, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    incr_ok: u64,
    incr_failed: u64,
    latencies_us: Vec<u32>,
    errors: HashMap<String, u64>,
}

async fn worker<C: AsyncCommands + Send>(
    mut con: C,
    index: usize,
    prefix: String,
    deadline: Instant,
) -> Tally {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((index as u64 + 1) << 17));
    let incr_key = format!("{prefix}incr:{index}");
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        let op = rng.next() % 3;
        let key = format!("{prefix}key:{}", rng.next() % KEYSPACE);
        let started = Instant::now();
        let result: RedisResult<()> = match op {
            0 => con.get::<_, Option<Vec<u8>>>(&key).await.map(drop),
            1 => con.set::<_, _, ()>(&key, VALUE).await,
            _ => con.incr::<_, _, i64>(&incr_key, 1).await.map(drop),
        };
        let micros = started.elapsed().as_micros();
        tally
            .latencies_us
            .push(u32::try_from(micros).unwrap_or(u32::MAX));
        match result {
            Ok(()) => {
                tally.ok += 1;
                if op == 2 {
                    tally.incr_ok += 1;
                }
            }
            Err(error) => {
                tally.failed += 1;
                if op == 2 {
                    tally.incr_failed += 1;
                }
                *tally.errors.entry(error.to_string()).or_default() += 1;
                tokio::time::sleep(PAUSE_AFTER_FAILURE).await;
            }
        }
    }
    tally
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn percentile_ms(sorted_us: &[u32], fraction: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((sorted_us.len() as f64) * fraction).ceil() as usize;
    f64::from(sorted_us[rank.clamp(1, sorted_us.len()) - 1]) / 1000.0
}

fn client(args: &Args) -> RedisResult<redis::Client> {
    // The adapter needs RESP3 for the notice push.
    let query = if args.client == ADAPTER {
        "?protocol=resp3"
    } else {
        ""
    };
    Ok(match &args.tls_ca {
        None => redis::Client::open(format!("redis://{}:{}/{query}", args.host, args.port))?,
        Some(ca) => {
            let root_cert = std::fs::read(ca)?;
            redis::Client::build_with_tls(
                format!("rediss://{}:{}/{query}", args.host, args.port),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )?
        }
    })
}

async fn connect(args: &Args) -> RedisResult<Vec<ConnectionManager>> {
    let client = client(args)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(TIMEOUT))
        .set_connection_timeout(Some(TIMEOUT));
    let mut managers = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        managers.push(
            client
                .get_connection_manager_with_config(config.clone())
                .await?,
        );
    }
    Ok(managers)
}

/// The same with the adapter (the same timeouts and reconnect defaults).
async fn connect_adapter(args: &Args) -> RedisResult<Vec<redis_maxage_client::ConnectionManager>> {
    let client = client(args)?;
    let config = redis_maxage_client::ConnectionManagerConfig::new()
        .set_response_timeout(Some(TIMEOUT))
        .set_connection_timeout(Some(TIMEOUT));
    let mut managers = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        managers.push(
            redis_maxage_client::ConnectionManager::new_with_config(client.clone(), config.clone())
                .await?,
        );
    }
    Ok(managers)
}

/// Starts the W load tasks on the C managers.
fn spawn_workers<C: AsyncCommands + Clone + Send + Sync + 'static>(
    managers: &[C],
    args: &Args,
    deadline: Instant,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    (0..args.workers)
        .map(|index| {
            let con = managers[index % managers.len()].clone();
            tokio::spawn(worker(con, index, args.prefix.clone(), deadline))
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("impact-load-rs: {message}");
            std::process::exit(2);
        }
    };
    let adapter = args.client == ADAPTER;
    let (plain, adapted) = if adapter {
        (Ok(Vec::new()), connect_adapter(&args).await)
    } else {
        (connect(&args).await, Ok(Vec::new()))
    };
    let (plain, adapted) = match (plain, adapted) {
        (Ok(plain), Ok(adapted)) => (plain, adapted),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("impact-load-rs: cannot connect: {error}");
            std::process::exit(1);
        }
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let tasks = if adapter {
        spawn_workers(&adapted, &args, deadline)
    } else {
        spawn_workers(&plain, &args, deadline)
    };
    let mut tallies = Vec::with_capacity(tasks.len());
    for task in tasks {
        tallies.push(task.await.expect("load task panicked"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The adapter's own counters, summed over its managers (the longest replacement: the max).
    let adapter_json = if adapter {
        let stats: Vec<_> = adapted.iter().map(|m| m.stats()).collect();
        let sum = |f: fn(&redis_maxage_client::Stats) -> u64| stats.iter().map(f).sum::<u64>();
        format!(
            ", \"adapter\": {{\"connections\": {}, \"opted_in\": {}, \"notices\": {}, \
             \"replacements\": {}, \"swapped_before_ready\": {}, \"reconnects\": {}, \
             \"longest_replacement_ms\": {:.3}}}",
            sum(|s| s.connections),
            sum(|s| s.opted_in),
            sum(|s| s.notices),
            sum(|s| s.replacements),
            sum(|s| s.swapped_before_ready),
            sum(|s| s.reconnects),
            stats
                .iter()
                .map(|s| s.longest_replacement_us)
                .max()
                .unwrap_or(0) as f64
                / 1000.0,
        )
    } else {
        String::new()
    };

    let mut latencies: Vec<u32> = tallies
        .iter_mut()
        .flat_map(|t| std::mem::take(&mut t.latencies_us))
        .collect();
    latencies.sort_unstable();
    let mut errors: HashMap<String, u64> = HashMap::new();
    for tally in &tallies {
        for (message, count) in &tally.errors {
            *errors.entry(message.clone()).or_default() += count;
        }
    }
    let list = |f: fn(&Tally) -> u64| {
        tallies
            .iter()
            .map(|t| f(t).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let errors_json = errors
        .iter()
        .map(|(message, count)| format!("{}: {count}", json_string(message)))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "{{\"client\": {}, \"library\": {}, \"settings\": {}, \"elapsed_s\": {elapsed:.3}, \
         \"requests_ok\": {}, \"requests_failed\": {}, \"incr_ok\": [{}], \"incr_failed\": [{}], \
         \"latency_ms\": {{\"p50\": {:.3}, \"p99\": {:.3}, \"p999\": {:.3}, \"max\": {:.3}}}, \
         \"errors\": {{{errors_json}}}{adapter_json}}}",
        json_string(&args.client),
        json_string(if adapter {
            REDIS_CRATE_ADAPTER
        } else {
            REDIS_CRATE
        }),
        json_string(
            "no request retry in the crate; reconnect: ConnectionManager default \
             (number_of_retries 6, exponential backoff); response/connection timeout 5 s"
        ),
        tallies.iter().map(|t| t.ok).sum::<u64>(),
        tallies.iter().map(|t| t.failed).sum::<u64>(),
        list(|t| t.incr_ok),
        list(|t| t.incr_failed),
        percentile_ms(&latencies, 0.50),
        percentile_ms(&latencies, 0.99),
        percentile_ms(&latencies, 0.999),
        latencies.last().map_or(0.0, |&us| f64::from(us) / 1000.0),
    );
}
