//! The `CLIENT KILL` filter grammar of Valkey 9.1, parsed and matched without a server.
//!
//! Parsing follows the server's own loop: keywords are case-insensitive, every keyword but
//! `ID`/`NOT-ID` and the flags takes one value, single-valued filters are last-one-wins (each
//! occurrence is still validated), `ID` lists are variadic and accumulate, the first error from
//! the left wins, and nothing is done unless the whole command parses. Which keywords there are,
//! what each takes and which command takes it comes from the table in filter_keywords.rs (the
//! module adds `MAXAGE-MS`, `LIMIT`, and for `MAXAGE.KILL` `DRYRUN`, `GRACEFUL`, `PERCENT`).

use std::collections::BTreeSet;

use crate::policy::client_list::ListedClient;
use crate::policy::filter_keywords::{ClientTest, ServerFacts, Takes, TestValue, lookup, positive};
use crate::policy::integers::parse_strict_i64;

pub const ERR_SYNTAX: &str = "ERR syntax error";
pub const ERR_CLIENT_ID: &str = "ERR client-id should be greater than 0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Kill,
    List,
}

/// One client test of the filter: a keyword's test (its row in filter_keywords.rs), in its
/// plain or `NOT-` form, with its value.
#[derive(Clone)]
pub struct Condition {
    pub keyword: &'static str,
    pub negated: bool,
    pub value: TestValue,
    test: ClientTest,
}

impl Condition {
    fn holds(&self, client: &ListedClient) -> bool {
        (self.test.holds)(&self.value, client) != self.negated
    }
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let not = if self.negated { "NOT-" } else { "" };
        write!(f, "{not}{} {:?}", self.keyword, self.value)
    }
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        (self.keyword, self.negated, &self.value) == (other.keyword, other.negated, &other.value)
    }
}

impl Eq for Condition {}

/// A parsed filter list. `None` fields were not given and constrain nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientFilter {
    /// `Some(empty)` when `ID` was given without ids: it matches nothing, as in the server.
    pub ids: Option<BTreeSet<u64>>,
    pub not_ids: BTreeSet<u64>,
    /// The client tests (`TYPE`, `NAME`, `NOT-DB`, `IDLE`, ...), each keyword and form at most
    /// once: a later occurrence replaces an earlier one, as in the server.
    pub tests: Vec<Condition>,
    pub skip_me: bool,
    /// Minimum age in milliseconds (`MAXAGE n` is `n * 1000`, `MAXAGE-MS n` is `n`).
    pub min_age_ms: Option<u64>,
    pub dry_run: bool,
    pub limit: Option<u64>,
    /// `GRACEFUL` (`MAXAGE.KILL` only): retire through enforcement instead of at once.
    pub graceful: bool,
    /// `PERCENT p` (`MAXAGE.KILL` only): only the oldest p % of the selection, rounded up.
    pub percent: Option<u64>,
}

impl ClientFilter {
    /// Whether the module's registry alone can answer the filter: it selects by id and age
    /// only, so no `CLIENT LIST` of every client is needed.
    pub fn needs_only_ids_and_age(&self) -> bool {
        self.tests.is_empty()
    }

    /// The test a keyword (in one form) sets, if given.
    pub fn test_of(&self, keyword: &str, negated: bool) -> Option<&TestValue> {
        self.tests
            .iter()
            .find(|test| test.keyword == keyword && test.negated == negated)
            .map(|test| &test.value)
    }

    fn set_test(&mut self, condition: Condition) {
        self.tests
            .retain(|t| t.keyword != condition.keyword || t.negated != condition.negated);
        self.tests.push(condition);
    }

    /// Keeps what `LIMIT` and then `PERCENT` allow of a selection sorted oldest first.
    pub fn keep_allowed<T>(&self, selection: &mut Vec<T>) {
        if let Some(limit) = self.limit {
            selection.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        }
        if let Some(percent) = self.percent {
            selection.truncate(share_of(selection.len(), percent));
        }
    }
}

/// `PERCENT p` of `count` clients: rounded up, so any share of a non-empty selection is at
/// least one client.
fn share_of(count: usize, percent: u64) -> usize {
    let percent = percent.min(100) as usize;
    (count * percent).div_ceil(100)
}

/// Parses the filter arguments that follow the command name.
pub fn parse(
    args: &[&[u8]],
    command: Command,
    facts: &mut dyn ServerFacts,
) -> Result<ClientFilter, String> {
    let mut filter = ClientFilter {
        skip_me: command == Command::Kill,
        ..ClientFilter::default()
    };
    let mut i = 0;
    while i < args.len() {
        let keyword = args[i].to_ascii_uppercase();
        i += 1;
        // The table says which keywords this command takes and what follows each; an unknown
        // one is the server's syntax error (with or without a value after it).
        let Some(spec) = lookup(&keyword).filter(|k| command == Command::Kill || !k.kill_only)
        else {
            return Err(ERR_SYNTAX.to_string());
        };
        match (spec.takes, keyword.as_slice()) {
            (Takes::Ids, _) => {
                let negated = keyword.starts_with(b"NOT-");
                let mut listed = BTreeSet::new();
                while let Some(id) = args.get(i).and_then(|a| parse_strict_i64(a)) {
                    if id <= 0 {
                        return Err(ERR_CLIENT_ID.to_string());
                    }
                    listed.insert(id as u64);
                    i += 1;
                }
                if negated {
                    filter.not_ids.extend(listed);
                } else {
                    filter.ids.get_or_insert_with(BTreeSet::new).extend(listed);
                }
                continue;
            }
            (Takes::Nothing, b"DRYRUN") => {
                filter.dry_run = true;
                continue;
            }
            (Takes::Nothing, b"GRACEFUL") => {
                filter.graceful = true;
                continue;
            }
            (Takes::Nothing, _) => unreachable!("a flag keyword without its meaning"),
            _ => {}
        }
        let Some(value) = args.get(i).copied() else {
            return Err(ERR_SYNTAX.to_string());
        };
        i += 1;
        if let Some(test) = spec.test {
            let negated = keyword.starts_with(b"NOT-");
            filter.set_test(Condition {
                keyword: spec.name,
                negated,
                value: (test.read)(value, negated, facts)?,
                test,
            });
            continue;
        }
        match keyword.as_slice() {
            b"SKIPME" => {
                filter.skip_me = match value.to_ascii_lowercase().as_slice() {
                    b"yes" => true,
                    b"no" => false,
                    _ => return Err(ERR_SYNTAX.to_string()),
                }
            }
            b"MAXAGE" => filter.min_age_ms = Some(positive(value, "maxage")?.saturating_mul(1000)),
            b"MAXAGE-MS" => filter.min_age_ms = Some(positive(value, "maxage-ms")?),
            b"LIMIT" => filter.limit = Some(positive(value, "limit")?),
            b"PERCENT" => {
                let percent = positive(value, "percent")?;
                if percent > 100 {
                    return Err("ERR percent should be between 1 and 100".to_string());
                }
                filter.percent = Some(percent);
            }
            _ => return Err(ERR_SYNTAX.to_string()),
        }
    }
    Ok(filter)
}

/// Everything a filter tests about one client.
pub struct Candidate<'a> {
    pub listed: &'a ListedClient,
    /// From the registry (milliseconds) where the client is tracked, else from `age=`.
    pub age_ms: u64,
    /// The caller's own id (`SKIPME yes` spares it).
    pub caller_id: u64,
}

impl ClientFilter {
    pub fn matches(&self, candidate: &Candidate) -> bool {
        let client = candidate.listed;
        if self.skip_me && client.id == candidate.caller_id {
            return false;
        }
        if self
            .ids
            .as_ref()
            .is_some_and(|ids| !ids.contains(&client.id))
            || self.not_ids.contains(&client.id)
        {
            return false;
        }
        if self.min_age_ms.is_some_and(|min| candidate.age_ms < min) {
            return false;
        }
        self.tests.iter().all(|test| test.holds(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::client_type::ClientType;
    use crate::policy::filter_keywords::ip_matches;

    #[test]
    fn a_percent_share_rounds_up() {
        assert_eq!(share_of(10, 25), 3);
        assert_eq!(share_of(8, 25), 2);
        assert_eq!(share_of(1, 1), 1);
        assert_eq!(share_of(0, 50), 0);
        assert_eq!(share_of(7, 100), 7);
    }

    #[test]
    fn limit_applies_before_percent() {
        let filter = ClientFilter {
            limit: Some(8),
            percent: Some(25),
            ..ClientFilter::default()
        };
        let mut selection: Vec<u32> = (0..100).collect();
        filter.keep_allowed(&mut selection);
        assert_eq!(selection, vec![0, 1]);
    }

    struct FakeServer;
    impl ServerFacts for FakeServer {
        fn user_exists(&mut self, name: &str) -> bool {
            matches!(name, "default" | "alice")
        }
        fn databases(&mut self) -> i64 {
            16
        }
    }

    fn parse_kill(args: &[&str]) -> Result<ClientFilter, String> {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        parse(&bytes, Command::Kill, &mut FakeServer)
    }

    fn client(line: &str) -> ListedClient {
        crate::policy::client_list::parse_client_line(line).unwrap()
    }

    fn matches(filter: &ClientFilter, listed: &ListedClient, age_ms: u64) -> bool {
        filter.matches(&Candidate {
            listed,
            age_ms,
            caller_id: 1,
        })
    }

    #[test]
    fn strict_integers_follow_string2ll() {
        assert_eq!(parse_strict_i64(b"5"), Some(5));
        assert_eq!(parse_strict_i64(b"-3"), Some(-3));
        assert_eq!(parse_strict_i64(b"0"), Some(0));
        assert_eq!(parse_strict_i64(b"9223372036854775807"), Some(i64::MAX));
        for bad in [
            "",
            "-",
            "+5",
            "05",
            "-0",
            " 5",
            "1.5",
            "abc",
            "99999999999999999999",
        ] {
            assert_eq!(parse_strict_i64(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn defaults_differ_between_kill_and_list() {
        assert!(parse_kill(&[]).unwrap().skip_me);
        assert!(!parse(&[], Command::List, &mut FakeServer).unwrap().skip_me);
    }

    #[test]
    fn ids_are_variadic_and_accumulate() {
        let filter = parse_kill(&["ID", "8", "9", "SKIPME", "no", "id", "10"]).unwrap();
        assert_eq!(filter.ids, Some(BTreeSet::from([8, 9, 10])));
        assert!(!filter.skip_me);
        let empty = parse_kill(&["SKIPME", "no", "ID"]).unwrap();
        assert_eq!(empty.ids, Some(BTreeSet::new()));
        let not = parse_kill(&["NOT-ID", "3", "NOT-ID", "4"]).unwrap();
        assert_eq!(not.not_ids, BTreeSet::from([3, 4]));
    }

    #[test]
    fn id_errors_match_the_server() {
        assert_eq!(parse_kill(&["ID", "0"]).unwrap_err(), ERR_CLIENT_ID);
        assert_eq!(parse_kill(&["ID", "5", "-1"]).unwrap_err(), ERR_CLIENT_ID);
        assert_eq!(parse_kill(&["NOT-ID", "-3"]).unwrap_err(), ERR_CLIENT_ID);
        for bad in ["abc", "+5", "05", "-0", "1.5"] {
            assert_eq!(parse_kill(&["ID", bad]).unwrap_err(), ERR_SYNTAX, "{bad}");
        }
    }

    #[test]
    fn every_error_message() {
        let cases: &[(&[&str], &str)] = &[
            (&["BOGUS", "1"], ERR_SYNTAX),
            (&["TYPE"], ERR_SYNTAX),
            (&["TYPE", "normal", "NAME"], ERR_SYNTAX),
            (&["NOT-SKIPME", "yes"], ERR_SYNTAX),
            (&["NOT-MAXAGE", "1"], ERR_SYNTAX),
            (&["NAME", "a", "b"], ERR_SYNTAX),
            (&["SKIPME", "maybe"], ERR_SYNTAX),
            (&["TYPE", "monitor"], "ERR Unknown client type 'monitor'"),
            (&["NOT-TYPE", "a\r\nb"], "ERR Unknown client type 'a  b'"),
            (&["USER", "nosuch"], "ERR No such user 'nosuch'"),
            (&["NOT-USER", "DEFAULT"], "ERR No such user 'DEFAULT'"),
            (
                &["MAXAGE", "x"],
                "ERR maxage is not an integer or out of range",
            ),
            (
                &["MAXAGE", "05"],
                "ERR maxage is not an integer or out of range",
            ),
            (&["MAXAGE", "0"], "ERR maxage should be greater than 0"),
            (&["MAXAGE", "-5"], "ERR maxage should be greater than 0"),
            (
                &["MAXAGE-MS", "1.5"],
                "ERR maxage-ms is not an integer or out of range",
            ),
            (
                &["MAXAGE-MS", "0"],
                "ERR maxage-ms should be greater than 0",
            ),
            (&["IDLE", "0"], "ERR idle should be greater than 0"),
            (&["IDLE", "y"], "ERR idle is not an integer or out of range"),
            (&["LIMIT", "0"], "ERR limit should be greater than 0"),
            (
                &["LIMIT", "many"],
                "ERR limit is not an integer or out of range",
            ),
            (
                &["FLAGS", "Nw"],
                "ERR Unknown flags found in the provided filter: Nw",
            ),
            (
                &["NOT-FLAGS", "n"],
                "ERR Unknown flags found in the NOT-FLAGS filter: n",
            ),
            (
                &["CAPA", "R"],
                "ERR Unknown capa found in the provided filter: R",
            ),
            (
                &["NOT-CAPA", "x"],
                "ERR Unknown capa found in the NOT-CAPA filter: x",
            ),
            (&["DB", "16"], "ERR DB number should be between 0 and 15"),
            (&["DB", "01"], "ERR DB is not an integer or out of range"),
            (
                &["NOT-DB", "-1"],
                "ERR NOT-DB number should be between 0 and 15",
            ),
            (
                &["NOT-DB", "x"],
                "ERR NOT-DB is not an integer or out of range",
            ),
            // The first error from the left wins; a later duplicate does not excuse an earlier one.
            (
                &["TYPE", "bogus", "USER", "nosuch"],
                "ERR Unknown client type 'bogus'",
            ),
            (
                &["USER", "nosuch", "TYPE", "bogus"],
                "ERR No such user 'nosuch'",
            ),
            (
                &["MAXAGE", "5", "MAXAGE", "0"],
                "ERR maxage should be greater than 0",
            ),
        ];
        for (args, expected) in cases {
            assert_eq!(parse_kill(args).unwrap_err(), *expected, "{args:?}");
        }
    }

    #[test]
    fn dryrun_is_kill_only() {
        assert!(parse_kill(&["DRYRUN"]).unwrap().dry_run);
        let drain = parse_kill(&["maxage-ms", "1", "graceful", "percent", "25"]).unwrap();
        assert!(drain.graceful);
        assert_eq!(drain.percent, Some(25));
        for (bad, error) in [
            (
                &["PERCENT", "0"][..],
                "ERR percent should be greater than 0",
            ),
            (
                &["PERCENT", "101"][..],
                "ERR percent should be between 1 and 100",
            ),
            (
                &["PERCENT", "x"][..],
                "ERR percent is not an integer or out of range",
            ),
            (&["PERCENT"][..], ERR_SYNTAX),
        ] {
            assert_eq!(parse_kill(bad).unwrap_err(), error, "{bad:?}");
        }
        let graceful: &[&[u8]] = &[b"GRACEFUL"];
        let percent: &[&[u8]] = &[b"PERCENT", b"5"];
        for kill_only in [graceful, percent] {
            assert!(parse(kill_only, Command::List, &mut FakeServer).is_err());
        }
        assert_eq!(
            parse(&[b"DRYRUN"], Command::List, &mut FakeServer).unwrap_err(),
            ERR_SYNTAX
        );
    }

    #[test]
    fn keywords_are_case_insensitive_values_are_not() {
        let filter =
            parse_kill(&["not-type", "Normal", "maxage-ms", "1500", "Skipme", "NO"]).unwrap();
        assert_eq!(
            filter.test_of("TYPE", true),
            Some(&TestValue::Type(ClientType::Normal))
        );
        assert_eq!(filter.min_age_ms, Some(1500));
        assert!(!filter.skip_me);
        assert_eq!(parse_kill(&["MAXAGE", "2"]).unwrap().min_age_ms, Some(2000));
        assert_eq!(
            parse_kill(&["TYPE", "primary"])
                .unwrap()
                .test_of("TYPE", false)
                .cloned(),
            Some(TestValue::Type(ClientType::Master))
        );
    }

    const PLAIN: &str = "id=5 addr=127.0.0.1:50100 laddr=127.0.0.1:7000 fd=8 name=web-1 age=12 idle=3 flags=N capa= db=2 multi=-1 user=alice resp=2 lib-name=redis-py lib-ver=5.0.1";
    const PUBSUB: &str =
        "id=6 addr=[::1]:40000 laddr=[::1]:7000 fd=9 name= age=1 idle=1 flags=P db=0 user=default";
    const MONITOR: &str = "id=7 addr=127.0.0.1:50101 laddr=127.0.0.1:7000 fd=10 name= age=1 idle=0 flags=O db=0 user=default";
    const REPLICA: &str = "id=8 addr=127.0.0.1:50102 laddr=127.0.0.1:7000 fd=11 name= age=9 idle=0 flags=S db=0 user=default";
    const PRIMARY: &str = "id=9 addr=127.0.0.1:7001 laddr=127.0.0.1:50103 fd=12 name= age=9 idle=0 flags=M db=0 user=(superuser)";
    const UNIX: &str = "id=10 addr=/tmp/r.sock:0 laddr=/tmp/r.sock:0 fd=13 name= age=1 idle=0 flags=U db=0 user=default";

    #[test]
    fn types_follow_get_client_type() {
        assert_eq!(ClientType::of(&client(PLAIN)), ClientType::Normal);
        assert_eq!(ClientType::of(&client(PUBSUB)), ClientType::PubSub);
        assert_eq!(ClientType::of(&client(MONITOR)), ClientType::Normal);
        assert_eq!(ClientType::of(&client(REPLICA)), ClientType::Replica);
        assert_eq!(ClientType::of(&client(PRIMARY)), ClientType::Master);
    }

    #[test]
    fn each_filter_and_its_negation() {
        let plain = client(PLAIN);
        let cases: &[&[&str]] = &[
            &["ID", "5"],
            &["TYPE", "normal"],
            &["USER", "alice"],
            &["ADDR", "127.0.0.1:50100"],
            &["LADDR", "127.0.0.1:7000"],
            &["IP", "127.0.0.1"],
            &["NAME", "web-1"],
            &["LIB-NAME", "redis-py"],
            &["LIB-VER", "5.0.1"],
            &["FLAGS", "N"],
            &["DB", "2"],
        ];
        for args in cases {
            let filter = parse_kill(args).unwrap();
            assert!(matches(&filter, &plain, 0), "{args:?}");
            let mut negated = args.to_vec();
            let not_keyword = format!("NOT-{}", args[0]);
            negated[0] = &not_keyword;
            let filter = parse_kill(&negated).unwrap();
            assert!(!matches(&filter, &plain, 0), "{negated:?}");
        }
    }

    #[test]
    fn ages_and_idle_are_minimums() {
        let plain = client(PLAIN);
        let filter = parse_kill(&["MAXAGE-MS", "1000"]).unwrap();
        assert!(matches(&filter, &plain, 1000));
        assert!(!matches(&filter, &plain, 999));
        assert!(matches(&parse_kill(&["IDLE", "3"]).unwrap(), &plain, 0));
        assert!(!matches(&parse_kill(&["IDLE", "4"]).unwrap(), &plain, 0));
    }

    #[test]
    fn filters_and_together() {
        let plain = client(PLAIN);
        assert!(matches(
            &parse_kill(&["TYPE", "normal", "DB", "2", "MAXAGE", "1"]).unwrap(),
            &plain,
            1500
        ));
        assert!(!matches(
            &parse_kill(&["TYPE", "normal", "DB", "3"]).unwrap(),
            &plain,
            1500
        ));
        assert!(!matches(
            &parse_kill(&["TYPE", "normal", "NOT-TYPE", "normal"]).unwrap(),
            &plain,
            0
        ));
        assert!(!matches(
            &parse_kill(&["ID", "5", "NOT-ID", "5"]).unwrap(),
            &plain,
            0
        ));
        assert!(!matches(
            &parse_kill(&["SKIPME", "no", "ID"]).unwrap(),
            &plain,
            0
        ));
    }

    #[test]
    fn skipme_spares_the_caller() {
        let plain = client(PLAIN);
        let me = Candidate {
            listed: &plain,
            age_ms: 0,
            caller_id: 5,
        };
        assert!(!parse_kill(&["ID", "5"]).unwrap().matches(&me));
        assert!(
            parse_kill(&["ID", "5", "SKIPME", "no"])
                .unwrap()
                .matches(&me)
        );
    }

    #[test]
    fn flag_edge_cases() {
        let monitor = client(MONITOR);
        let replica = client(REPLICA);
        let pubsub = client(PUBSUB);
        assert!(matches(&parse_kill(&["FLAGS", "S"]).unwrap(), &monitor, 0));
        assert!(matches(&parse_kill(&["FLAGS", "S"]).unwrap(), &replica, 0));
        assert!(!matches(&parse_kill(&["FLAGS", "N"]).unwrap(), &pubsub, 0));
        assert!(!matches(&parse_kill(&["FLAGS", "NP"]).unwrap(), &pubsub, 0));
        assert!(matches(&parse_kill(&["FLAGS", ""]).unwrap(), &pubsub, 0));
        assert!(!matches(
            &parse_kill(&["NOT-FLAGS", ""]).unwrap(),
            &pubsub,
            0
        ));
        assert!(matches(
            &parse_kill(&["NOT-FLAGS", "xP"]).unwrap(),
            &pubsub,
            0
        ));
    }

    #[test]
    fn unset_names_never_match() {
        let pubsub = client(PUBSUB);
        assert!(!matches(&parse_kill(&["NAME", ""]).unwrap(), &pubsub, 0));
        assert!(matches(
            &parse_kill(&["NOT-NAME", "x"]).unwrap(),
            &pubsub,
            0
        ));
        assert!(matches(&parse_kill(&["NOT-NAME", ""]).unwrap(), &pubsub, 0));
        assert!(!matches(
            &parse_kill(&["LIB-NAME", ""]).unwrap(),
            &pubsub,
            0
        ));
        assert!(matches(
            &parse_kill(&["NOT-LIB-VER", "1"]).unwrap(),
            &pubsub,
            0
        ));
    }

    #[test]
    fn ip_matching_like_the_server() {
        assert!(ip_matches("127.0.0.1:5000", "127.0.0.1"));
        assert!(!ip_matches("127.0.0.1:5000", "127.0.0"));
        assert!(!ip_matches("127.0.0.1:5000", "127"));
        assert!(ip_matches("[::1]:5000", "::1"));
        assert!(!ip_matches("[::1]:5000", "[::1]"));
        assert!(!ip_matches("/tmp/r.sock:0", "/tmp/r.sock"));
        assert!(!ip_matches("127.0.0.1:5000", ""));
        let unix = client(UNIX);
        assert!(matches(
            &parse_kill(&["NOT-IP", "/tmp/r.sock"]).unwrap(),
            &unix,
            0
        ));
    }

    #[test]
    fn primary_link_has_no_user() {
        let primary = client(PRIMARY);
        assert!(!matches(
            &parse_kill(&["USER", "default"]).unwrap(),
            &primary,
            0
        ));
        assert!(matches(
            &parse_kill(&["NOT-USER", "default"]).unwrap(),
            &primary,
            0
        ));
    }

    #[test]
    fn capa_on_servers_without_it() {
        let plain = client(PLAIN);
        assert!(!matches(&parse_kill(&["CAPA", "r"]).unwrap(), &plain, 0));
        assert!(matches(&parse_kill(&["CAPA", ""]).unwrap(), &plain, 0));
        assert!(!matches(&parse_kill(&["NOT-CAPA", ""]).unwrap(), &plain, 0));
        assert!(matches(&parse_kill(&["NOT-CAPA", "r"]).unwrap(), &plain, 0));
    }
}

/// The matcher against a deliberately simple reference model, on random clients and random
/// (valid) filter lists: no server, no extra crates, a fixed seed so failures reproduce.
#[cfg(test)]
mod model_tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;
    use crate::policy::client_list::ListedClient;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    struct AnyUser;
    impl ServerFacts for AnyUser {
        fn user_exists(&mut self, _name: &str) -> bool {
            true
        }
        fn databases(&mut self) -> i64 {
            16
        }
    }

    const NAMES: [&str; 3] = ["", "web", "job"];
    const USERS: [&str; 3] = ["default", "alice", "(superuser)"];
    const FLAGS: [&str; 7] = ["N", "P", "x", "S", "M", "O", "be"];
    const ADDRS: [&str; 3] = ["127.0.0.1:1000", "127.0.0.1:2000", "[::1]:3000"];

    fn random_client(rng: &mut Rng, id: u64) -> ListedClient {
        ListedClient {
            id,
            addr: rng.pick(&ADDRS).to_string(),
            laddr: rng.pick(&["127.0.0.1:6379", "[::1]:6379"]).to_string(),
            name: rng.pick(&NAMES).to_string(),
            idle_s: rng.next() % 5,
            flags: rng.pick(&FLAGS).to_string(),
            capa: rng.pick(&["", "r"]).to_string(),
            db: (rng.next() % 3) as i64,
            user: rng.pick(&USERS).to_string(),
            lib_name: rng.pick(&["", "redis-py"]).to_string(),
            lib_ver: rng.pick(&["", "1.0"]).to_string(),
            ..ListedClient::default()
        }
    }

    fn random_filter(rng: &mut Rng) -> Vec<String> {
        let keywords = [
            "ID",
            "NOT-ID",
            "TYPE",
            "NOT-TYPE",
            "USER",
            "NOT-USER",
            "ADDR",
            "NOT-ADDR",
            "LADDR",
            "NOT-LADDR",
            "IP",
            "NOT-IP",
            "NAME",
            "NOT-NAME",
            "LIB-NAME",
            "NOT-LIB-NAME",
            "LIB-VER",
            "NOT-LIB-VER",
            "FLAGS",
            "NOT-FLAGS",
            "CAPA",
            "NOT-CAPA",
            "DB",
            "NOT-DB",
            "SKIPME",
            "MAXAGE",
            "MAXAGE-MS",
            "IDLE",
        ];
        let mut args = Vec::new();
        for _ in 0..(rng.next() % 4) {
            let keyword = rng.pick(&keywords);
            args.push(keyword.to_string());
            let value = match keyword {
                "ID" | "NOT-ID" => {
                    for _ in 0..(rng.next() % 3) {
                        args.push((1 + rng.next() % 6).to_string());
                    }
                    continue;
                }
                "TYPE" | "NOT-TYPE" => rng.pick(&["normal", "master", "replica", "pubsub"]),
                "USER" | "NOT-USER" => rng.pick(&USERS[..2]),
                "ADDR" | "NOT-ADDR" => rng.pick(&ADDRS),
                "LADDR" | "NOT-LADDR" => rng.pick(&["127.0.0.1:6379", "x"]),
                "IP" | "NOT-IP" => rng.pick(&["127.0.0.1", "::1", "127.0.0"]),
                "NAME" | "NOT-NAME" => rng.pick(&NAMES),
                "LIB-NAME" | "NOT-LIB-NAME" => rng.pick(&["", "redis-py"]),
                "LIB-VER" | "NOT-LIB-VER" => rng.pick(&["", "1.0"]),
                "FLAGS" | "NOT-FLAGS" => rng.pick(&["", "N", "P", "x", "S", "be", "Nx"]),
                "CAPA" | "NOT-CAPA" => rng.pick(&["", "r"]),
                "DB" | "NOT-DB" => rng.pick(&["0", "1", "2"]),
                "SKIPME" => rng.pick(&["yes", "no"]),
                "MAXAGE" => rng.pick(&["1", "2", "3"]),
                "MAXAGE-MS" => rng.pick(&["500", "1500", "2500"]),
                _ => rng.pick(&["1", "2", "3"]),
            };
            args.push(value.to_string());
        }
        args
    }

    /// The reference: the argument list read as "last value per keyword, ids pooled", then each
    /// filter evaluated on its own with plain string tests.
    fn reference_matches(args: &[String], client: &ListedClient, age_ms: u64, caller: u64) -> bool {
        let mut last: HashMap<String, String> = HashMap::new();
        let (mut ids, mut not_ids): (Option<BTreeSet<u64>>, BTreeSet<u64>) =
            (None, BTreeSet::new());
        let mut i = 0;
        while i < args.len() {
            let keyword = args[i].to_uppercase();
            i += 1;
            if keyword == "ID" || keyword == "NOT-ID" {
                let mut listed = BTreeSet::new();
                while i < args.len() && args[i].chars().all(|c| c.is_ascii_digit()) {
                    listed.insert(args[i].parse::<u64>().unwrap());
                    i += 1;
                }
                if keyword == "ID" {
                    ids.get_or_insert_with(BTreeSet::new).extend(listed);
                } else {
                    not_ids.extend(listed);
                }
                continue;
            }
            last.insert(keyword, args[i].clone());
            i += 1;
        }
        let client_type = if client.flags.contains('M') {
            "master"
        } else if client.flags.contains('S') {
            "replica"
        } else if client.flags.contains('P') {
            "pubsub"
        } else {
            "normal"
        };
        let ip = client
            .addr
            .trim_start_matches('[')
            .rsplit_once(':')
            .unwrap()
            .0
            .trim_end_matches(']');
        let flag_holds = |letter: char| match letter {
            'N' => client.flags == "N",
            'S' => client.flags.contains('S') || client.flags.contains('O'),
            other => client.flags.contains(other),
        };
        let positive = |keyword: &str, value: &str| -> bool {
            match keyword {
                "TYPE" => client_type == value,
                "USER" => client.user == value && !client.flags.contains('M'),
                "ADDR" => client.addr == value,
                "LADDR" => client.laddr == value,
                "IP" => ip == value,
                "NAME" => !client.name.is_empty() && client.name == value,
                "LIB-NAME" => !client.lib_name.is_empty() && client.lib_name == value,
                "LIB-VER" => !client.lib_ver.is_empty() && client.lib_ver == value,
                "FLAGS" => value.chars().all(flag_holds),
                "CAPA" => value.chars().all(|c| client.capa.contains(c)),
                "DB" => client.db.to_string() == value,
                "MAXAGE" => age_ms >= value.parse::<u64>().unwrap() * 1000,
                "MAXAGE-MS" => age_ms >= value.parse::<u64>().unwrap(),
                "IDLE" => client.idle_s >= value.parse::<u64>().unwrap(),
                _ => true,
            }
        };
        let skip_me = last.get("SKIPME").is_none_or(|v| v == "yes");
        if skip_me && client.id == caller {
            return false;
        }
        if ids.is_some_and(|ids| !ids.contains(&client.id)) || not_ids.contains(&client.id) {
            return false;
        }
        // MAXAGE and MAXAGE-MS set the same minimum: the later one wins.
        let age_keyword = args
            .iter()
            .rev()
            .map(|a| a.to_uppercase())
            .find(|a| a == "MAXAGE" || a == "MAXAGE-MS");
        last.iter()
            .all(|(keyword, value)| match keyword.strip_prefix("NOT-") {
                Some(base) => !positive(base, value),
                None if keyword == "MAXAGE" || keyword == "MAXAGE-MS" => {
                    age_keyword.as_deref() != Some(keyword.as_str()) || positive(keyword, value)
                }
                None => positive(keyword, value),
            })
    }

    #[test]
    fn matcher_agrees_with_the_reference_model() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut compared = 0;
        for _ in 0..4000 {
            let args = random_filter(&mut rng);
            let arg_bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            let filter = parse(&arg_bytes, Command::Kill, &mut AnyUser)
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            for id in 1..=6 {
                let client = random_client(&mut rng, id);
                let age_ms = rng.next() % 4000;
                let caller = 1 + rng.next() % 6;
                let candidate = Candidate {
                    listed: &client,
                    age_ms,
                    caller_id: caller,
                };
                assert_eq!(
                    filter.matches(&candidate),
                    reference_matches(&args, &client, age_ms, caller),
                    "filters {args:?} client {client:?} age {age_ms} caller {caller}"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 24_000);
    }
}
