//! Every filter keyword of `MAXAGE.KILL`, `MAXAGE.LIST` and the `CLIENT KILL` compatibility
//! path, in one table: its name, whether it has a `NOT-` form, what value it takes, which
//! commands take it, whether servers have it natively (and how to probe for it), and its
//! `COMMAND DOCS` line. The parser (filter.rs) takes arity and acceptance from here, the
//! compatibility probe (compat.rs), `COMMAND DOCS` (docs.rs) and the load log read it, and unit
//! tests tie the filter table of docs/commands.md and the wire fuzzer's grammar to it.
//!
//! A keyword that tests one thing about a client (`NAME`, `DB`, `IDLE`, ...) carries its meaning
//! in its row (`ClientTest`: how its value is read and how a client is tested), so a new one is
//! a row here and nothing else in `src/`. The others (`ID`, `SKIPME`, the ages, `LIMIT`,
//! `DRYRUN`, `GRACEFUL`, `PERCENT`) shape the selection itself and are read by filter.rs.

use crate::policy::client_list::ListedClient;
use crate::policy::client_type::ClientType;
use crate::policy::integers::parse_strict_i64;

/// What a keyword takes after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takes {
    /// One or more client ids (variadic, accumulating).
    Ids,
    /// Nothing: a flag.
    Nothing,
    /// One integer.
    Integer,
    /// One text value.
    Text,
    /// One of these words.
    OneOf(&'static [&'static str]),
}

/// Whether servers answer a keyword themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Native {
    /// Every supported server's `CLIENT KILL` has it (since Redis 6); its `NOT-` form is probed.
    Always,
    /// Some servers have it: probed at load with this harmless value (both forms).
    Probed(&'static str),
    /// Only the module has it; `CLIENT KILL` hands it to the module.
    ModuleOnly,
    /// Only `MAXAGE.KILL` / `MAXAGE.LIST` take it; `CLIENT KILL` never does.
    ModuleCommandsOnly,
}

/// What the parser needs to ask the server: whether an ACL user exists, how many databases.
pub trait ServerFacts {
    fn user_exists(&mut self, name: &str) -> bool;
    fn databases(&mut self) -> i64;
}

/// A value a client test compares with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TestValue {
    Text(String),
    Integer(i64),
    Type(ClientType),
}

/// How a keyword that tests one client attribute reads its value (`negated`: written as its
/// `NOT-` form, which some errors name) and tests a client. The `NOT-` form holds where the
/// test does not.
#[derive(Clone, Copy)]
pub struct ClientTest {
    pub read:
        fn(value: &[u8], negated: bool, facts: &mut dyn ServerFacts) -> Result<TestValue, String>,
    pub holds: fn(value: &TestValue, client: &ListedClient) -> bool,
}

pub struct Keyword {
    pub name: &'static str,
    /// The `NOT-` form and its `COMMAND DOCS` name, if the keyword has one.
    pub negated: Option<(&'static str, &'static str)>,
    pub takes: Takes,
    /// Taken by `MAXAGE.KILL` (and `CLIENT KILL`) only, not by `MAXAGE.LIST`.
    pub kill_only: bool,
    pub native: Native,
    /// The argument's name in `COMMAND DOCS`.
    pub docs_name: &'static str,
    pub docs_summary: Option<&'static str>,
    /// What it tests about a client, if it is such a keyword.
    pub test: Option<ClientTest>,
}

const CLIENT_TYPES: &[&str] = &["normal", "master", "primary", "replica", "slave", "pubsub"];

const fn keyword(
    name: &'static str,
    takes: Takes,
    native: Native,
    docs_name: &'static str,
) -> Keyword {
    Keyword {
        name,
        negated: None,
        takes,
        kill_only: false,
        native,
        docs_name,
        docs_summary: None,
        test: None,
    }
}

const fn testing(mut keyword: Keyword, test: ClientTest) -> Keyword {
    keyword.test = Some(test);
    keyword
}

const fn negatable(mut keyword: Keyword, name: &'static str, docs_name: &'static str) -> Keyword {
    keyword.negated = Some((name, docs_name));
    keyword
}

const fn summary(mut keyword: Keyword, text: &'static str) -> Keyword {
    keyword.docs_summary = Some(text);
    keyword
}

const fn kill_only(mut keyword: Keyword) -> Keyword {
    keyword.kill_only = true;
    keyword
}

/// The flag letters a `FLAGS`/`NOT-FLAGS` filter may use (Valkey 9.1's set).
const KNOWN_FLAG_LETTERS: &str = "bcdeirtuxABEIMNOPRSTU";

/// Replaces CR and LF the way the server does when it echoes a value in an error.
pub fn echo(value: &[u8]) -> String {
    String::from_utf8_lossy(value).replace(['\r', '\n'], " ")
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value).into_owned()
}

fn read_text(value: &[u8], _: bool, _: &mut dyn ServerFacts) -> Result<TestValue, String> {
    Ok(TestValue::Text(text(value)))
}

fn text_of(value: &TestValue) -> &str {
    match value {
        TestValue::Text(text) => text,
        _ => "",
    }
}

fn integer_of(value: &TestValue) -> i64 {
    match value {
        TestValue::Integer(n) => *n,
        _ => i64::MIN,
    }
}

/// A positive integer, with the server's two errors.
pub fn positive(value: &[u8], what: &str) -> Result<u64, String> {
    match parse_strict_i64(value) {
        None => Err(format!("ERR {what} is not an integer or out of range")),
        Some(n) if n <= 0 => Err(format!("ERR {what} should be greater than 0")),
        Some(n) => Ok(n as u64),
    }
}

/// Letters from `allowed` only, or the server's error naming the filter.
fn letters(value: &[u8], allowed: &str, what: &str, negated: bool) -> Result<TestValue, String> {
    if value.iter().all(|b| allowed.as_bytes().contains(b)) {
        return Ok(TestValue::Text(text(value)));
    }
    let filter = if negated {
        format!("the NOT-{what} filter")
    } else {
        "the provided filter".to_string()
    };
    let noun = what.to_ascii_lowercase();
    Err(format!(
        "ERR Unknown {noun} found in {filter}: {}",
        echo(value)
    ))
}

/// `FLAGS` needs every letter. `N` means "no other flag"; `S` is the replica flag, which MONITOR
/// clients (shown as `O`) carry too.
fn has_all_flags(client_flags: &str, letters: &str) -> bool {
    letters.chars().all(|letter| match letter {
        'N' => client_flags == "N",
        'S' => client_flags.contains('S') || client_flags.contains('O'),
        other => client_flags.contains(other),
    })
}

/// The server's IP test: `addr` (with an optional leading `[`) starts with the IP, then an
/// optional `]`, then `:` and a port that does not start with `0` (unix sockets show port 0).
pub fn ip_matches(addr: &str, ip: &str) -> bool {
    let rest = addr.strip_prefix('[').unwrap_or(addr);
    let Some(rest) = rest.strip_prefix(ip) else {
        return false;
    };
    let rest = rest.strip_prefix(']').unwrap_or(rest);
    rest.strip_prefix(':')
        .is_some_and(|port| !port.starts_with('0'))
}

/// An unset name, lib-name or lib-ver never equals anything, not even "".
fn set_and_equal(attribute: &str, value: &TestValue) -> bool {
    !attribute.is_empty() && attribute == text_of(value)
}

const TYPE_TEST: ClientTest = ClientTest {
    read: |value, _, _| {
        ClientType::parse(&text(value))
            .map(TestValue::Type)
            .ok_or_else(|| format!("ERR Unknown client type '{}'", echo(value)))
    },
    holds: |value, client| *value == TestValue::Type(ClientType::of(client)),
};

const USER_TEST: ClientTest = ClientTest {
    read: |value, _, facts| {
        let user = text(value);
        if facts.user_exists(&user) {
            Ok(TestValue::Text(user))
        } else {
            Err(format!("ERR No such user '{}'", echo(value)))
        }
    },
    // The primary link has no ACL user: it never matches USER, so NOT-USER keeps it.
    holds: |value, client| !client.has_flag('M') && client.user == text_of(value),
};

const ADDR_TEST: ClientTest = ClientTest {
    read: read_text,
    holds: |value, client| client.addr == text_of(value),
};

const LADDR_TEST: ClientTest = ClientTest {
    read: read_text,
    holds: |value, client| client.laddr == text_of(value),
};

const IP_TEST: ClientTest = ClientTest {
    read: read_text,
    holds: |value, client| ip_matches(&client.addr, text_of(value)),
};

const NAME_TEST: ClientTest = ClientTest {
    read: read_text,
    holds: |value, client| set_and_equal(&client.name, value),
};

const LIB_NAME_TEST: ClientTest = ClientTest {
    read: read_text,
    holds: |value, client| set_and_equal(&client.lib_name, value),
};

const LIB_VER_TEST: ClientTest = ClientTest {
    read: read_text,
    holds: |value, client| set_and_equal(&client.lib_ver, value),
};

const FLAGS_TEST: ClientTest = ClientTest {
    read: |value, negated, _| letters(value, KNOWN_FLAG_LETTERS, "FLAGS", negated),
    holds: |value, client| has_all_flags(&client.flags, text_of(value)),
};

const CAPA_TEST: ClientTest = ClientTest {
    read: |value, negated, _| letters(value, "r", "CAPA", negated),
    holds: |value, client| text_of(value).chars().all(|c| client.capa.contains(c)),
};

const DB_TEST: ClientTest = ClientTest {
    read: |value, negated, facts| {
        let what = if negated { "NOT-DB" } else { "DB" };
        let n = parse_strict_i64(value)
            .filter(|n| i32::try_from(*n).is_ok())
            .ok_or_else(|| format!("ERR {what} is not an integer or out of range"))?;
        let databases = facts.databases();
        if n < 0 || n >= databases {
            return Err(format!(
                "ERR {what} number should be between 0 and {}",
                databases - 1
            ));
        }
        Ok(TestValue::Integer(n))
    },
    holds: |value, client| client.db == integer_of(value),
};

const IDLE_TEST: ClientTest = ClientTest {
    read: |value, _, _| positive(value, "idle").map(|n| TestValue::Integer(n as i64)),
    holds: |value, client| client.idle_s as i64 >= integer_of(value),
};

use Native::{Always, ModuleCommandsOnly, ModuleOnly, Probed};
use Takes::{Ids, Integer, Nothing, OneOf, Text};

/// In `COMMAND DOCS` order.
pub const KEYWORDS: [Keyword; 20] = [
    negatable(
        keyword("ID", Ids, Always, "client-id"),
        "NOT-ID",
        "not-client-id",
    ),
    negatable(
        testing(
            keyword("TYPE", OneOf(CLIENT_TYPES), Always, "client-type"),
            TYPE_TEST,
        ),
        "NOT-TYPE",
        "not-client-type",
    ),
    negatable(
        testing(keyword("USER", Text, Always, "username"), USER_TEST),
        "NOT-USER",
        "not-username",
    ),
    negatable(
        testing(
            summary(keyword("ADDR", Text, Always, "addr"), "ip:port"),
            ADDR_TEST,
        ),
        "NOT-ADDR",
        "not-addr",
    ),
    negatable(
        testing(
            summary(keyword("LADDR", Text, Always, "laddr"), "ip:port"),
            LADDR_TEST,
        ),
        "NOT-LADDR",
        "not-laddr",
    ),
    negatable(
        testing(keyword("IP", Text, Probed("127.0.0.1"), "ip"), IP_TEST),
        "NOT-IP",
        "not-ip",
    ),
    negatable(
        testing(keyword("NAME", Text, Probed("x"), "name"), NAME_TEST),
        "NOT-NAME",
        "not-name",
    ),
    negatable(
        testing(
            keyword("LIB-NAME", Text, Probed("x"), "lib-name"),
            LIB_NAME_TEST,
        ),
        "NOT-LIB-NAME",
        "not-lib-name",
    ),
    negatable(
        testing(
            keyword("LIB-VER", Text, Probed("x"), "lib-ver"),
            LIB_VER_TEST,
        ),
        "NOT-LIB-VER",
        "not-lib-ver",
    ),
    negatable(
        testing(keyword("FLAGS", Text, Probed("N"), "flags"), FLAGS_TEST),
        "NOT-FLAGS",
        "not-flags",
    ),
    negatable(
        testing(keyword("CAPA", Text, Probed("r"), "capa"), CAPA_TEST),
        "NOT-CAPA",
        "not-capa",
    ),
    negatable(
        testing(keyword("DB", Integer, Probed("0"), "db"), DB_TEST),
        "NOT-DB",
        "not-db",
    ),
    keyword("SKIPME", OneOf(&["yes", "no"]), Always, "skipme"),
    summary(
        keyword("MAXAGE", Integer, Probed("1"), "maxage"),
        "minimum age in seconds",
    ),
    summary(
        keyword("MAXAGE-MS", Integer, ModuleOnly, "maxage-ms"),
        "minimum age in milliseconds",
    ),
    testing(
        summary(
            keyword("IDLE", Integer, Probed("1"), "idle"),
            "minimum idle time in seconds",
        ),
        IDLE_TEST,
    ),
    summary(
        keyword("LIMIT", Integer, ModuleOnly, "limit"),
        "at most this many, oldest first",
    ),
    kill_only(summary(
        keyword("DRYRUN", Nothing, ModuleOnly, "dryrun"),
        "count, kill nothing",
    )),
    kill_only(summary(
        keyword("GRACEFUL", Nothing, ModuleCommandsOnly, "graceful"),
        "retire through enforcement (pacing, after a reply, grace)",
    )),
    kill_only(summary(
        keyword("PERCENT", Integer, ModuleCommandsOnly, "percent"),
        "only the oldest p % of the selection, rounded up",
    )),
];

/// Finds the row of a keyword written in either form (case-insensitive).
pub fn lookup(word: &[u8]) -> Option<&'static Keyword> {
    KEYWORDS.iter().find(|k| {
        word.eq_ignore_ascii_case(k.name.as_bytes())
            || k.negated
                .is_some_and(|(name, _)| word.eq_ignore_ascii_case(name.as_bytes()))
    })
}

/// Every spelling (`NAME`, `NOT-NAME`, ...) of every keyword, in table order.
pub fn spellings() -> impl Iterator<Item = (String, &'static Keyword)> {
    KEYWORDS.iter().flat_map(|keyword| {
        let negated = keyword.negated.map(|(name, _)| (name.to_string(), keyword));
        std::iter::once((keyword.name.to_string(), keyword)).chain(negated)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negated_forms_are_spelled_alike() {
        for keyword in &KEYWORDS {
            if let Some((name, docs_name)) = keyword.negated {
                assert_eq!(name, format!("NOT-{}", keyword.name));
                assert_eq!(docs_name, format!("not-{}", keyword.docs_name));
            }
        }
    }

    #[test]
    fn both_forms_are_found_case_insensitively() {
        assert_eq!(lookup(b"not-lib-name").unwrap().name, "LIB-NAME");
        assert_eq!(lookup(b"Lib-Name").unwrap().name, "LIB-NAME");
        assert!(lookup(b"NOT-MAXAGE").is_none());
        assert!(lookup(b"NOT-").is_none());
        assert!(lookup(b"BOGUS").is_none());
        assert_eq!(spellings().count(), 32);
    }

    /// The filter table of docs/commands.md and the wire fuzzer's grammar name every spelling.
    #[test]
    fn the_docs_and_the_fuzzer_know_every_keyword() {
        let root = env!("CARGO_MANIFEST_DIR");
        let doc = std::fs::read_to_string(format!("{root}/docs/commands.md")).unwrap();
        let fuzzer =
            std::fs::read_to_string(format!("{root}/scripts/maxage_tools/wire_fuzz.py")).unwrap();
        for (spelling, _) in spellings() {
            assert!(
                doc.contains(&format!("`{spelling}")),
                "docs/commands.md's filter table lacks {spelling}"
            );
            assert!(
                fuzzer.contains(&format!("b\"{spelling}\"")),
                "wire_fuzz.py's grammar lacks {spelling}"
            );
        }
    }
}
