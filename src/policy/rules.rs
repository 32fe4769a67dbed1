//! Per-class maximum ages (`maxage.rules`): an ordered list of `selector=max-age-ms`, first match
//! wins, `maxage.max-age-ms` for clients no rule matches.
//!
//! ```text
//! name:monitoring-*=0 user:batch=3600000 lib:redis-py=300000 type:pubsub=86400000
//! ```
//!
//! Selectors: `user:<glob>`, `name:<glob>`, `lib:<glob>` (the client's lib-name), and
//! `type:<normal|master|replica|pubsub>`. A max age of 0 means "never retire".

use crate::policy::client_list::ListedClient;
use crate::policy::client_type::ClientType;
use crate::policy::glob::glob_matches;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Selector {
    User(String),
    Name(String),
    Lib(String),
    Type(ClientType),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The selector as written, which is how LIST and INFO name the class.
    pub label: String,
    selector: Selector,
    /// 0: never retire.
    pub max_age_ms: u64,
}

impl Rule {
    fn matches(&self, client: &ListedClient) -> bool {
        match &self.selector {
            Selector::User(pattern) => glob_matches(pattern.as_bytes(), client.user.as_bytes()),
            Selector::Name(pattern) => {
                !client.name.is_empty() && glob_matches(pattern.as_bytes(), client.name.as_bytes())
            }
            Selector::Lib(pattern) => {
                !client.lib_name.is_empty()
                    && glob_matches(pattern.as_bytes(), client.lib_name.as_bytes())
            }
            Selector::Type(client_type) => ClientType::of(client) == *client_type,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules(Vec<Rule>);

/// The longest max age anything may set, a rule or `maxage.max-age-ms` (ten years): deadlines
/// computed from it never come near overflow.
pub const MAX_RULE_AGE_MS: u64 = 315_360_000_000;

/// The longest rule set (`maxage.rules` or `MAXAGE.PREVIEW RULES`): every due client is matched
/// against every pattern, so the text bounds that work (with `MAX_CLIENT_TEXT_BYTES` of name).
pub const MAX_RULES_TEXT_BYTES: usize = 4096;

/// The label of the class of clients no rule matches.
pub const DEFAULT_CLASS: &str = "default";

impl Rules {
    /// Parses a whole rule set; any malformed rule refuses all of it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_RULES_TEXT_BYTES {
            return Err(format!(
                "rules are {} bytes, more than {MAX_RULES_TEXT_BYTES}",
                text.len()
            ));
        }
        let mut rules = Vec::new();
        for word in text.split_whitespace() {
            let (selector_text, age_text) = word
                .rsplit_once('=')
                .ok_or_else(|| format!("rule '{word}' has no '=<max-age-ms>'"))?;
            let max_age_ms: u64 = age_text
                .parse()
                .ok()
                .filter(|ms| *ms <= MAX_RULE_AGE_MS)
                .ok_or_else(|| {
                    format!(
                        "rule '{word}': '{age_text}' is not a number of milliseconds from 0 to {MAX_RULE_AGE_MS}"
                    )
                })?;
            let (kind, pattern) = selector_text.split_once(':').ok_or_else(|| {
                format!("rule '{word}' has no '<kind>:' (user, name, lib or type)")
            })?;
            if pattern.is_empty() {
                return Err(format!("rule '{word}' has an empty pattern"));
            }
            let selector = match kind.to_ascii_lowercase().as_str() {
                "user" => Selector::User(pattern.to_string()),
                "name" => Selector::Name(pattern.to_string()),
                "lib" => Selector::Lib(pattern.to_string()),
                "type" => Selector::Type(
                    ClientType::parse(pattern)
                        .ok_or_else(|| format!("rule '{word}': unknown client type '{pattern}'"))?,
                ),
                _ => {
                    return Err(format!(
                        "rule '{word}': unknown kind '{kind}' (user, name, lib or type)"
                    ));
                }
            };
            rules.push(Rule {
                label: selector_text.to_string(),
                selector,
                max_age_ms,
            });
        }
        Ok(Self(rules))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.0.iter()
    }

    /// The rule for this client, if one matches (first match wins).
    pub fn rule_for(&self, client: &ListedClient) -> Option<&Rule> {
        self.0.iter().find(|rule| rule.matches(client))
    }

    /// The class label and max age (0 = never) for this client.
    pub fn class_of<'a>(
        &'a self,
        client: &ListedClient,
        default_max_age_ms: u64,
    ) -> (&'a str, u64) {
        self.rule_for(client)
            .map_or((DEFAULT_CLASS, default_max_age_ms), |rule| {
                (rule.label.as_str(), rule.max_age_ms)
            })
    }

    /// The shortest max age any client can have: new clients are scheduled for it (their class
    /// is not known at connect time, since AUTH and CLIENT SETNAME come later) and moved to
    /// their own class's deadline when it comes.
    pub fn shortest_max_age_ms(&self, default_max_age_ms: u64) -> Option<u64> {
        self.0
            .iter()
            .map(|rule| rule.max_age_ms)
            .chain(std::iter::once(default_max_age_ms))
            .filter(|age| *age > 0)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::client_list::parse_client_line;

    fn client(fields: &str) -> ListedClient {
        parse_client_line(&format!("id=1 addr=127.0.0.1:1 flags=N {fields}")).unwrap()
    }

    #[test]
    fn a_rule_set_is_bounded() {
        let one = "name:web-*=1000 ";
        let fits = one.repeat(MAX_RULES_TEXT_BYTES / one.len());
        assert!(Rules::parse(&fits).is_ok());
        let error = Rules::parse(&format!("{fits}{one}")).unwrap_err();
        assert!(error.contains("more than 4096"), "{error}");
    }

    #[test]
    fn first_match_wins_and_default_applies_otherwise() {
        let rules = Rules::parse(
            "name:monitoring-*=0 user:batch=3600000 lib:redis-py=300000 type:pubsub=5000",
        )
        .unwrap();
        assert_eq!(
            rules.class_of(&client("name=monitoring-1 user=batch"), 60_000),
            ("name:monitoring-*", 0)
        );
        assert_eq!(
            rules.class_of(&client("name=job user=batch"), 60_000),
            ("user:batch", 3_600_000)
        );
        assert_eq!(
            rules.class_of(&client("user=web lib-name=redis-py"), 60_000),
            ("lib:redis-py", 300_000)
        );
        assert_eq!(
            rules.class_of(&client("user=web").clone(), 60_000),
            ("default", 60_000)
        );
        let mut subscriber = client("user=web");
        subscriber.flags = "P".to_string();
        assert_eq!(rules.class_of(&subscriber, 60_000), ("type:pubsub", 5000));
        assert_eq!(rules.shortest_max_age_ms(60_000), Some(5000));
        assert_eq!(rules.shortest_max_age_ms(0), Some(5000));
        assert_eq!(Rules::default().shortest_max_age_ms(0), None);
    }

    #[test]
    fn unnamed_clients_do_not_match_name_globs() {
        let rules = Rules::parse("name:*=1000").unwrap();
        assert_eq!(rules.class_of(&client("user=web"), 5).1, 5);
    }

    #[test]
    fn malformed_rule_sets_are_refused_whole() {
        for bad in [
            "user:batch",
            "user:batch=soon",
            "batch=100",
            "user:=100",
            "color:red=100",
            "type:robot=100",
            "name:ok=1 user:x=-5",
            "type:normal=18446744073709552",
            "type:normal=315360000001",
        ] {
            assert!(Rules::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Rules::parse("").unwrap(), Rules::default());
        assert!(Rules::parse("  name:a=1   TYPE:normal=2 ").is_ok());
        assert!(Rules::parse("type:normal=315360000000").is_ok());
    }
}
