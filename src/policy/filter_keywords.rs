//! Every filter keyword of `MAXAGE.KILL`, `MAXAGE.LIST` and the `CLIENT KILL` compatibility
//! path, in one table: its name, whether it has a `NOT-` form, what value it takes, which
//! commands take it, whether servers have it natively (and how to probe for it), and its
//! `COMMAND DOCS` line. The parser (filter.rs) takes arity and acceptance from here, the
//! compatibility probe (compat.rs), `COMMAND DOCS` (docs.rs) and the load log read it, and unit
//! tests tie the filter table of docs/commands.md and the wire fuzzer's grammar to it. A new keyword is a
//! row here plus what it means (its field in `ClientFilter` and its test in `matches`).

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
    }
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
        keyword("TYPE", OneOf(CLIENT_TYPES), Always, "client-type"),
        "NOT-TYPE",
        "not-client-type",
    ),
    negatable(
        keyword("USER", Text, Always, "username"),
        "NOT-USER",
        "not-username",
    ),
    negatable(
        summary(keyword("ADDR", Text, Always, "addr"), "ip:port"),
        "NOT-ADDR",
        "not-addr",
    ),
    negatable(
        summary(keyword("LADDR", Text, Always, "laddr"), "ip:port"),
        "NOT-LADDR",
        "not-laddr",
    ),
    negatable(
        keyword("IP", Text, Probed("127.0.0.1"), "ip"),
        "NOT-IP",
        "not-ip",
    ),
    negatable(
        keyword("NAME", Text, Probed("x"), "name"),
        "NOT-NAME",
        "not-name",
    ),
    negatable(
        keyword("LIB-NAME", Text, Probed("x"), "lib-name"),
        "NOT-LIB-NAME",
        "not-lib-name",
    ),
    negatable(
        keyword("LIB-VER", Text, Probed("x"), "lib-ver"),
        "NOT-LIB-VER",
        "not-lib-ver",
    ),
    negatable(
        keyword("FLAGS", Text, Probed("N"), "flags"),
        "NOT-FLAGS",
        "not-flags",
    ),
    negatable(
        keyword("CAPA", Text, Probed("r"), "capa"),
        "NOT-CAPA",
        "not-capa",
    ),
    negatable(
        keyword("DB", Integer, Probed("0"), "db"),
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
    summary(
        keyword("IDLE", Integer, Probed("1"), "idle"),
        "minimum idle time in seconds",
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
