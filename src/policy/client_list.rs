//! Parsing the server's `CLIENT LIST` reply into per-client records.
//!
//! The module API exposes only a few client fields (flags, address, db); everything else a
//! `CLIENT KILL` filter can test (name, idle, user, laddr, lib-name, ...) comes from one
//! `CLIENT LIST` call per command. Fields a server version lacks (lib-name on 7.0) parse as empty.

/// The most bytes of a client-chosen text (`CLIENT SETNAME`, `CLIENT SETINFO`) the module keeps.
/// The server takes names of any length (hundreds of MB); the module copies a listed client into
/// its closing set, its retire queue and audit lines, so it keeps only the start. A longer text
/// is cut at a character boundary and ends in a NUL byte, which no name the server accepts
/// contains: an exact filter (`NAME`, `LIB-NAME`, `LIB-VER`) never matches it, and a pattern
/// (`maxage.exempt-names`, a rule) sees its first `MAX_CLIENT_TEXT_BYTES` and the marker, so one
/// with a fixed ending does not match.
pub const MAX_CLIENT_TEXT_BYTES: usize = 512;

fn bounded_text(value: &str) -> String {
    if value.len() <= MAX_CLIENT_TEXT_BYTES {
        return value.to_string();
    }
    let mut end = MAX_CLIENT_TEXT_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = String::with_capacity(end + 1);
    cut.push_str(&value[..end]);
    cut.push('\0');
    cut
}

/// One line of `CLIENT LIST`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListedClient {
    pub id: u64,
    pub addr: String,
    pub laddr: String,
    /// The connection's file descriptor in the server (-1 for clients without one).
    pub fd: i32,
    pub name: String,
    /// Whole seconds, as the server reports it.
    pub age_s: u64,
    pub idle_s: u64,
    pub flags: String,
    /// `r` when the client sent `CLIENT CAPA redirect` (Valkey 8+; always empty on Redis 7.0).
    pub capa: String,
    pub db: i64,
    /// Commands queued in an open transaction (-1 outside one; Valkey 9.1 shows 0 after EXEC).
    pub multi: i64,
    pub sub: u64,
    pub psub: u64,
    pub ssub: u64,
    pub qbuf: u64,
    /// Memory of a parsed command not yet run: with Valkey's I/O threads a request can be read
    /// and parsed (`qbuf=0`) before the main thread executes it.
    pub argv_mem: u64,
    pub obl: u64,
    pub oll: u64,
    pub cmd: String,
    pub user: String,
    pub resp: u32,
    pub lib_name: String,
    pub lib_ver: String,
    /// The client that receives this client's tracking invalidations (-1 when none).
    pub redir: i64,
    /// Redis 8: the I/O thread that reads, parses and writes for this client (0: the main
    /// thread, and on every server without the field).
    pub io_thread: i32,
}

/// Formatting and parsing one line of a whole `CLIENT LIST` (us): 10,000 lines took the
/// server 15.5 ms to format on Redis 8.0.6, and the module about as long again to parse.
pub const WHOLE_LIST_LINE_US: u64 = 2;

/// What a pause of an I/O thread costs (us), as the module's look-ups measure it. On Redis 8
/// each client an I/O thread owns that `CLIENT LIST ID a b c` (or any look-up) shows pauses
/// that thread once: the main thread asks it to stop and busy-waits until it has, which is a
/// wake-up of the thread and its scheduling. That is 20-40 us with a core to spare, and 2-12
/// ms on 2 busy cores (the server's own SLOWLOG, without the module: `CLIENT LIST ID <one
/// client>` 7.8 ms, 16 ids 128 ms). A whole `CLIENT LIST` pauses every thread once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PauseCost {
    pub us: u64,
}

impl PauseCost {
    /// Until measured: a pause with a core to spare.
    pub const START: PauseCost = PauseCost { us: 50 };

    /// Folds in a look-up of given ids that took `elapsed_us` and showed `thread_owned` clients
    /// of I/O threads.
    pub fn after_id_lookup(self, elapsed_us: u64, thread_owned: usize) -> PauseCost {
        if thread_owned == 0 {
            return self;
        }
        let sample = elapsed_us / thread_owned as u64;
        PauseCost {
            us: (self.us * 3 + sample) / 4,
        }
    }

    /// A whole listing answered a look-up, so no pause was measured: the estimate drifts back
    /// toward `START` (an eighth of the way), so that after a while ids are looked up again and
    /// measure it afresh (a machine that was busy may be quiet now).
    pub fn after_whole_list(self) -> PauseCost {
        PauseCost {
            us: (self.us * 7 + Self::START.us) / 8,
        }
    }
}

/// Whether a look-up of `wanted` clients costs less as one whole `CLIENT LIST` (one pause of
/// each I/O thread, `connected` lines) than as `CLIENT LIST ID ...` (one pause per client), by
/// the pause measured: only where I/O threads own clients (`io-thread=` above 0 in a listing).
/// So a look-up never costs more than the look-up of the given ids would, whatever clients do.
pub fn whole_list_answers_lookup(
    wanted: usize,
    connected: usize,
    threads_own_clients: bool,
    pause: PauseCost,
) -> bool {
    let whole = (connected as u64)
        .saturating_mul(WHOLE_LIST_LINE_US)
        .saturating_add(pause.us);
    threads_own_clients && wanted >= 2 && whole < (wanted as u64).saturating_mul(pause.us)
}

impl ListedClient {
    /// Heap bytes of its text fields (each kept to a bounded prefix by the parser).
    pub fn heap_bytes(&self) -> usize {
        [
            &self.addr,
            &self.laddr,
            &self.name,
            &self.flags,
            &self.capa,
            &self.cmd,
            &self.user,
            &self.lib_name,
            &self.lib_ver,
        ]
        .iter()
        .map(|text| text.capacity())
        .sum()
    }

    /// The IP part of `addr`: everything before the last colon (`[::1]` for `[::1]:6379`).
    pub fn ip(&self) -> &str {
        self.addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(ip, _)| ip)
    }

    /// The least the client's age can be. `age=` is the server's cached whole-second clock minus
    /// the whole second the client connected in, so it can be up to a second more than the
    /// real age (connected at x.9 s, asked at (x+1).0 s: `age=1`).
    pub fn lower_bound_age_ms(&self) -> u64 {
        self.age_s.saturating_sub(1) * 1000
    }

    pub fn has_flag(&self, flag: char) -> bool {
        self.flags.contains(flag)
    }
}

/// Parses a whole `CLIENT LIST` reply; lines without a numeric id are skipped.
pub fn parse_client_list(text: &str) -> Vec<ListedClient> {
    text.lines().filter_map(parse_client_line).collect()
}

pub fn parse_client_line(line: &str) -> Option<ListedClient> {
    let mut client = ListedClient {
        fd: -1,
        multi: -1,
        redir: -1,
        ..ListedClient::default()
    };
    let mut has_id = false;
    for field in line.split(' ') {
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "id" => {
                client.id = value.parse().ok()?;
                has_id = true;
            }
            "addr" => client.addr = value.to_string(),
            "laddr" => client.laddr = value.to_string(),
            "fd" => client.fd = value.parse().unwrap_or(-1),
            "name" => client.name = bounded_text(value),
            "age" => client.age_s = value.parse().unwrap_or(0),
            "idle" => client.idle_s = value.parse().unwrap_or(0),
            "flags" => client.flags = value.to_string(),
            "capa" => client.capa = value.to_string(),
            "db" => client.db = value.parse().unwrap_or(0),
            "multi" => client.multi = value.parse().unwrap_or(-1),
            "sub" => client.sub = value.parse().unwrap_or(0),
            "psub" => client.psub = value.parse().unwrap_or(0),
            "ssub" => client.ssub = value.parse().unwrap_or(0),
            "qbuf" => client.qbuf = value.parse().unwrap_or(0),
            "argv-mem" => client.argv_mem = value.parse().unwrap_or(0),
            "obl" => client.obl = value.parse().unwrap_or(0),
            "oll" => client.oll = value.parse().unwrap_or(0),
            "cmd" => client.cmd = value.to_string(),
            "user" => client.user = value.to_string(),
            "resp" => client.resp = value.parse().unwrap_or(2),
            "lib-name" => client.lib_name = bounded_text(value),
            "lib-ver" => client.lib_ver = bounded_text(value),
            "redir" => client.redir = value.parse().unwrap_or(-1),
            "io-thread" => client.io_thread = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    has_id.then_some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REDIS_70_LINE: &str = "id=5 addr=127.0.0.1:50100 laddr=127.0.0.1:7000 fd=8 name=web-1 age=12 idle=3 flags=N db=2 sub=0 psub=0 ssub=0 multi=-1 qbuf=26 qbuf-free=20448 argv-mem=10 multi-mem=0 rbs=1024 rbp=0 obl=0 oll=0 omem=0 tot-mem=22298 events=r cmd=client|list user=default redir=-1 resp=2";
    const VALKEY_91_LINE: &str = "id=7 addr=[::1]:41234 laddr=[::1]:7001 fd=9 name= age=0 idle=0 flags=P capa= db=0 sub=1 psub=0 ssub=0 multi=-1 watch=0 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=1024 rbp=5 obl=0 oll=0 omem=0 tot-mem=1928 events=r cmd=subscribe user=alice redir=-1 resp=3 lib-name=redis-py lib-ver=5.0.1 tot-net-in=30";

    #[test]
    fn parses_a_redis_70_line() {
        let client = parse_client_line(REDIS_70_LINE).unwrap();
        assert_eq!(client.id, 5);
        assert_eq!(client.addr, "127.0.0.1:50100");
        assert_eq!(client.ip(), "127.0.0.1");
        assert_eq!(client.laddr, "127.0.0.1:7000");
        assert_eq!(client.fd, 8);
        assert_eq!(client.name, "web-1");
        assert_eq!((client.age_s, client.idle_s), (12, 3));
        assert_eq!(client.lower_bound_age_ms(), 11_000);
        assert_eq!(client.db, 2);
        assert_eq!(client.qbuf, 26);
        assert_eq!(client.user, "default");
        assert_eq!(client.lib_name, "");
        assert!(client.has_flag('N'));
    }

    #[test]
    fn parses_a_valkey_91_line_with_ipv6_and_lib_fields() {
        let client = parse_client_line(VALKEY_91_LINE).unwrap();
        assert_eq!(client.id, 7);
        assert_eq!(client.ip(), "[::1]");
        assert_eq!(client.name, "");
        assert_eq!(client.sub, 1);
        assert_eq!(client.resp, 3);
        assert_eq!(client.lib_name, "redis-py");
        assert_eq!(client.lib_ver, "5.0.1");
    }

    #[test]
    fn client_chosen_texts_are_kept_short_and_marked() {
        let long = "n".repeat(10 * MAX_CLIENT_TEXT_BYTES);
        let line = format!("id=3 name={long} lib-name={long} lib-ver=1.0 multi=2 flags=x");
        let client = parse_client_line(&line).unwrap();
        assert_eq!(client.name.len(), MAX_CLIENT_TEXT_BYTES + 1);
        assert!(client.name.ends_with('\0') && client.lib_name.ends_with('\0'));
        assert_eq!(client.lib_ver, "1.0");
        assert_eq!(client.multi, 2);
        let accented = format!("id=3 name={}", "é".repeat(MAX_CLIENT_TEXT_BYTES));
        let client = parse_client_line(&accented).unwrap();
        assert!(client.name.len() <= MAX_CLIENT_TEXT_BYTES + 1);
        assert!(!crate::policy::glob::glob_matches(b"*n", b"nnn\0"));
    }

    #[test]
    fn skips_lines_without_an_id() {
        let text = format!("{REDIS_70_LINE}\n\ngarbage\nid=x addr=1\n{VALKEY_91_LINE}\n");
        let ids: Vec<u64> = parse_client_list(&text).iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![5, 7]);
    }

    #[test]
    fn a_whole_list_answers_a_lookup_only_when_threads_own_clients_and_it_is_cheaper() {
        let quiet = PauseCost::START;
        // Without I/O threads that own clients, or for one client, look the ids up.
        assert!(!whole_list_answers_lookup(16, 20, false, quiet));
        assert!(!whole_list_answers_lookup(1, 5, true, quiet));
        // A core to spare: 16 wanted among 200 clients, one pause instead of 16; among 10,000
        // the 16 pauses are cheaper than 10,000 lines.
        assert!(whole_list_answers_lookup(16, 200, true, quiet));
        assert!(!whole_list_answers_lookup(16, 10_000, true, quiet));
        // Pauses measured at 8 ms (2 busy cores): the whole listing of 10,000 is cheaper.
        let mut busy = quiet;
        for _ in 0..20 {
            busy = busy.after_id_lookup(16 * 8_000, 16);
        }
        assert!(busy.us > 7_000, "{busy:?}");
        assert!(whole_list_answers_lookup(8, 10_000, true, busy));
        // Answered by whole listings, the estimate drifts back until ids are looked up again.
        let mut drifted = busy;
        let mut whole_lists = 0;
        while whole_list_answers_lookup(8, 10_000, true, drifted) {
            drifted = drifted.after_whole_list();
            whole_lists += 1;
        }
        assert!((5..40).contains(&whole_lists), "{whole_lists}");
        // A look-up that shows no client of a thread measures nothing.
        assert_eq!(quiet.after_id_lookup(900, 0), quiet);
    }
}
