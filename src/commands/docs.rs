//! `COMMAND DOCS` / `COMMAND INFO` metadata for the module's commands (arity, summary, since,
//! complexity, arguments) as plain data; `ffi::set_command_docs` hands it to the server.

use crate::policy::filter_keywords::{KEYWORDS, Takes};

#[derive(Clone, Copy)]
pub enum Kind {
    String,
    Integer,
    PureToken,
    OneOf,
}

/// One argument of a command's documentation.
pub struct Arg {
    pub name: &'static str,
    pub kind: Kind,
    pub token: Option<&'static str>,
    pub summary: Option<&'static str>,
    pub optional: bool,
    pub multiple: bool,
    pub subargs: Vec<Arg>,
}

fn arg(name: &'static str, kind: Kind, token: Option<&'static str>) -> Arg {
    Arg {
        name,
        kind,
        token,
        summary: None,
        optional: false,
        multiple: false,
        subargs: Vec::new(),
    }
}

impl Arg {
    fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
    fn multiple(mut self) -> Self {
        self.multiple = true;
        self
    }
    fn summary(mut self, summary: &'static str) -> Self {
        self.summary = Some(summary);
        self
    }
    fn with(mut self, subargs: Vec<Arg>) -> Self {
        self.subargs = subargs;
        self
    }
}

fn tokens(name: &'static str, token: &'static str, choices: &[&'static str]) -> Arg {
    arg(name, Kind::OneOf, Some(token)).with(
        choices
            .iter()
            .map(|choice| arg(choice, Kind::PureToken, Some(choice)))
            .collect(),
    )
}

/// The filters of `MAXAGE.LIST`, and with `kill_only` those of `MAXAGE.KILL` too, from the
/// keyword table.
fn filter_args(kill_only: bool) -> Vec<Arg> {
    let mut filters = Vec::new();
    for keyword in KEYWORDS.iter().filter(|k| kill_only || !k.kill_only) {
        let spellings = std::iter::once((keyword.name, keyword.docs_name, keyword.docs_summary))
            .chain(
                keyword
                    .negated
                    .map(|(name, docs_name)| (name, docs_name, None)),
            );
        for (name, docs_name, summary) in spellings {
            let arg = match keyword.takes {
                Takes::Ids => arg(docs_name, Kind::Integer, Some(name)).multiple(),
                Takes::Nothing => arg(docs_name, Kind::PureToken, Some(name)),
                Takes::Integer => arg(docs_name, Kind::Integer, Some(name)),
                Takes::Text => arg(docs_name, Kind::String, Some(name)),
                Takes::OneOf(words) => tokens(docs_name, name, words),
            };
            filters.push(match summary {
                Some(summary) => arg.summary(summary),
                None => arg,
            });
        }
    }
    filters
}

pub struct CommandDoc {
    pub name: &'static str,
    pub summary: &'static str,
    pub complexity: &'static str,
    pub arity: i32,
    pub args: Vec<Arg>,
    pub tips: &'static str,
}

/// Commands about every connection of a server: a cluster client sends them to every node.
const ALL_NODES: &str = "nondeterministic_output request_policy:all_nodes";

pub fn command_docs() -> Vec<CommandDoc> {
    vec![
        CommandDoc {
            name: "maxage.kill",
            summary: "Closes the client connections that match all the given CLIENT KILL filters (plus MAXAGE-MS, LIMIT, DRYRUN, GRACEFUL, PERCENT), oldest first.",
            complexity: "O(N) where N is the number of client connections",
            arity: -2,
            tips: ALL_NODES,
            args: vec![
                arg("filter", Kind::OneOf, None)
                    .multiple()
                    .with(filter_args(true)),
            ],
        },
        CommandDoc {
            name: "maxage.list",
            summary: "Lists the client connections that match the given filters, oldest first, with their age in milliseconds and enforcement deadline.",
            complexity: "O(N) where N is the number of client connections",
            arity: -1,
            tips: ALL_NODES,
            args: vec![
                arg("filter", Kind::OneOf, None)
                    .optional()
                    .multiple()
                    .with(filter_args(false)),
            ],
        },
        CommandDoc {
            name: "maxage.preview",
            summary: "Reports, per client class, what a rule set would do: clients, age histogram, exempt, due now and due within a window. Changes nothing.",
            complexity: "O(N) where N is the number of client connections",
            arity: -1,
            tips: ALL_NODES,
            args: vec![
                arg("rules", Kind::String, Some("RULES"))
                    .optional()
                    .summary("a proposed maxage.rules value (default: the current one)"),
                arg("max-age-ms", Kind::Integer, Some("MAX-AGE-MS"))
                    .optional()
                    .summary("a proposed default max age (default: the current one)"),
                arg("within", Kind::Integer, Some("WITHIN"))
                    .optional()
                    .summary("the window in milliseconds (default 60000)"),
            ],
        },
        CommandDoc {
            name: "maxage.self",
            summary: "Sets the maximum age of the calling connection (only ever shorter than the operator's), withdraws it (0), or, without an argument, reports the connection's age, deadline and what set it.",
            complexity: "O(1)",
            arity: -1,
            tips: "nondeterministic_output",
            args: vec![
                arg("milliseconds", Kind::Integer, None)
                    .optional()
                    .summary("the connection's maximum age; 0 withdraws the request"),
            ],
        },
        CommandDoc {
            name: "maxage.notice",
            summary: "Asks to be told (a RESP3 client-side-caching invalidation of the key in the reply) maxage.notice-lead-ms before the calling connection's deadline, so its client can retire it itself; OFF withdraws. Replies with the deadline.",
            complexity: "O(1)",
            arity: -1,
            tips: "nondeterministic_output",
            args: vec![arg("switch", Kind::OneOf, None).optional().with(vec![
                arg("on", Kind::PureToken, Some("ON")),
                arg("off", Kind::PureToken, Some("OFF")),
            ])],
        },
        CommandDoc {
            name: "maxage.clientkill",
            summary: "Internal: where the module's command filter sends a CLIENT KILL whose filters this server does not support (call CLIENT KILL instead).",
            complexity: "O(N) where N is the number of client connections",
            arity: -4,
            tips: ALL_NODES,
            args: vec![
                arg("kill", Kind::PureToken, Some("KILL")),
                arg("filter", Kind::OneOf, None)
                    .multiple()
                    .with(filter_args(true)),
            ],
        },
    ]
}
