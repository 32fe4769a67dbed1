//! The `maxage.*` settings, from one table: name, kind, default, bounds and validator. The
//! server registration (`ffi::register_settings`), the load arguments, `Settings` (the parsed
//! snapshot the enforcement policy works from), INFO and `conf/maxage.conf` all follow it.
//!
//! Values are stored here and set only by the server's CONFIG machinery (CONFIG SET, config
//! file lines, and the registered defaults). Load arguments become those registered defaults,
//! so a value in the config file, which is what `CONFIG REWRITE` writes, wins over them after a
//! restart, and `CONFIG REWRITE` leaves out exactly the settings still at the loaded value.

use std::sync::Mutex;

use lazy_static::lazy_static;

use crate::policy::glob::glob_matches;
use crate::policy::rules::Rules;

/// Ten years: far beyond any sane lifetime, far below overflow when added to a timestamp.
pub const MAX_AGE_MS_MAX: i64 = crate::policy::rules::MAX_RULE_AGE_MS as i64;

/// What a setting holds and accepts.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Number {
        default: i64,
        min: i64,
        max: i64,
    },
    Text {
        default: &'static str,
        validate: fn(&str) -> Result<(), String>,
    },
    Flag {
        default: bool,
    },
    /// One of `options`; the value is the option's position.
    Choice {
        default: i32,
        options: &'static [&'static str],
    },
}

#[derive(Clone, Copy, Debug)]
pub struct SettingDef {
    /// Without the `maxage.` prefix the server adds.
    pub name: &'static str,
    pub kind: Kind,
    /// Where the value goes in `Settings`, the parsed snapshot the policy works from.
    pub apply: fn(&mut Settings, &Value),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Number(i64),
    Text(String),
    Flag(bool),
    Choice(i32),
}

pub const MODE_OPTIONS: &[&str] = &["enforce", "observe"];
pub const PACING_OPTIONS: &[&str] = &["fixed", "adaptive"];

fn any_patterns(_: &str) -> Result<(), String> {
    Ok(())
}

pub const SETTINGS: [SettingDef; 14] = [
    SettingDef {
        name: "max-age-ms",
        kind: Kind::Number {
            default: 0,
            min: 0,
            max: MAX_AGE_MS_MAX,
        },
        apply: |s, v| s.max_age_ms = number(v),
    },
    SettingDef {
        name: "jitter-pct",
        kind: Kind::Number {
            default: 10,
            min: 0,
            max: 100,
        },
        apply: |s, v| s.jitter_pct = number(v),
    },
    SettingDef {
        name: "max-evictions-per-sec",
        kind: Kind::Number {
            default: 1000,
            min: 0,
            max: 1_000_000,
        },
        apply: |s, v| s.max_evictions_per_sec = number(v),
    },
    SettingDef {
        name: "min-evictions-per-sec",
        kind: Kind::Number {
            default: 50,
            min: 1,
            max: 1_000_000,
        },
        apply: |s, v| s.min_evictions_per_sec = number(v),
    },
    SettingDef {
        name: "max-overdue-ms",
        kind: Kind::Number {
            default: 60_000,
            min: 0,
            max: 86_400_000,
        },
        apply: |s, v| s.max_overdue_ms = number(v),
    },
    SettingDef {
        name: "grace-ms",
        kind: Kind::Number {
            default: 5000,
            min: 0,
            max: 3_600_000,
        },
        apply: |s, v| s.grace_ms = number(v),
    },
    SettingDef {
        name: "exempt-types",
        kind: Kind::Text {
            default: "master replica no-evict",
            validate: |v| ExemptTypes::parse(v).map(|_| ()),
        },
        apply: |s, v| s.exempt_types = ExemptTypes::parse(text(v)).unwrap_or_default(),
    },
    SettingDef {
        name: "exempt-users",
        kind: Kind::Text {
            default: "",
            validate: any_patterns,
        },
        apply: |s, v| s.exempt_users = Patterns::parse(text(v)),
    },
    SettingDef {
        name: "exempt-names",
        kind: Kind::Text {
            // Sentinel reconnects to a server at most once a second and will not promote a
            // replica whose link is down: with short max ages, retired sentinel links made
            // half of the failovers tested fail (`-NOGOODSLAVE`).
            default: "sentinel-*",
            validate: any_patterns,
        },
        apply: |s, v| s.exempt_names = Patterns::parse(text(v)),
    },
    SettingDef {
        name: "rules",
        kind: Kind::Text {
            default: "",
            validate: |v| Rules::parse(v).map(|_| ()),
        },
        apply: |s, v| s.rules = Rules::parse(text(v)).unwrap_or_default(),
    },
    SettingDef {
        name: "client-kill-compat",
        kind: Kind::Flag { default: true },
        apply: |s, v| s.client_kill_compat = *v == Value::Flag(true),
    },
    SettingDef {
        name: "mode",
        kind: Kind::Choice {
            default: 0,
            options: MODE_OPTIONS,
        },
        apply: |s, v| s.observe_only = chosen(v, MODE_OPTIONS) == "observe",
    },
    SettingDef {
        name: "pacing",
        kind: Kind::Choice {
            default: 0,
            options: PACING_OPTIONS,
        },
        apply: |s, v| s.adaptive_pacing = chosen(v, PACING_OPTIONS) == "adaptive",
    },
    SettingDef {
        name: "notice-lead-ms",
        kind: Kind::Number {
            default: 1000,
            min: 0,
            max: MAX_AGE_MS_MAX,
        },
        apply: |s, v| s.notice_lead_ms = number(v),
    },
];

impl Kind {
    pub fn default_value(&self) -> Value {
        match *self {
            Kind::Number { default, .. } => Value::Number(default),
            Kind::Text { default, .. } => Value::Text(default.to_string()),
            Kind::Flag { default } => Value::Flag(default),
            Kind::Choice { default, .. } => Value::Choice(default),
        }
    }

    /// Checks a value the server hands over (it has already checked numbers against the
    /// bounds and choices against the options; load arguments come through here too).
    pub fn check(&self, value: &Value) -> Result<(), String> {
        match (self, value) {
            (Kind::Number { min, max, .. }, Value::Number(n)) => {
                if n < min || n > max {
                    Err(format!("{n} is out of range [{min}, {max}]"))
                } else {
                    Ok(())
                }
            }
            (Kind::Text { validate, .. }, Value::Text(text)) => {
                if text.chars().any(|c| c.is_control() && c != '\t') {
                    return Err("the value contains a control character".to_string());
                }
                validate(text)
            }
            (Kind::Flag { .. }, Value::Flag(_)) => Ok(()),
            (Kind::Choice { options, .. }, Value::Choice(i)) => usize::try_from(*i)
                .ok()
                .filter(|i| *i < options.len())
                .map(|_| ())
                .ok_or_else(|| "unknown option".to_string()),
            _ => Err("wrong kind of value".to_string()),
        }
    }

    /// Parses a load argument's value (bytes as the operator typed them).
    pub fn parse(&self, raw: &[u8]) -> Result<Value, String> {
        let text = std::str::from_utf8(raw).map_err(|_| "not valid UTF-8".to_string())?;
        let value = match self {
            Kind::Number { .. } => Value::Number(
                crate::policy::integers::parse_strict_i64(raw)
                    .ok_or_else(|| format!("'{}' is not an integer", quoted(text)))?,
            ),
            Kind::Text { .. } => Value::Text(text.to_string()),
            Kind::Flag { .. } => match text.to_ascii_lowercase().as_str() {
                "yes" => Value::Flag(true),
                "no" => Value::Flag(false),
                _ => return Err(format!("'{}' is not yes or no", quoted(text))),
            },
            Kind::Choice { options, .. } => {
                let position = options
                    .iter()
                    .position(|option| option.eq_ignore_ascii_case(text))
                    .ok_or_else(|| {
                        format!("'{}' is not one of {}", quoted(text), options.join(", "))
                    })?;
                Value::Choice(position as i32)
            }
        };
        self.check(&value)?;
        Ok(value)
    }
}

/// A value quoted in an error or log line: control characters (NUL, CR, LF, ...) become `?`,
/// so the text can neither end early nor forge a line, and long values are cut.
pub fn quoted(text: &str) -> String {
    const LONGEST: usize = 64;
    let mut shown: String = text
        .chars()
        .take(LONGEST)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > LONGEST {
        shown.push_str("...");
    }
    shown
}

lazy_static! {
    /// The current value of every setting, in table order. Only the main thread sets them.
    static ref VALUES: Mutex<Vec<Value>> =
        Mutex::new(SETTINGS.iter().map(|def| def.kind.default_value()).collect());
}

fn values() -> std::sync::MutexGuard<'static, Vec<Value>> {
    VALUES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The current value of setting `index` (the server's CONFIG GET).
pub fn get(index: usize) -> Option<Value> {
    values().get(index).cloned()
}

/// Stores a value for setting `index` after checking it; the old value stays on error.
pub fn set(index: usize, value: Value) -> Result<(), String> {
    let def = SETTINGS.get(index).ok_or("no such setting")?;
    def.kind.check(&value)?;
    if let Some(slot) = values().get_mut(index) {
        *slot = value;
    }
    Ok(())
}

fn number(value: &Value) -> u64 {
    match value {
        Value::Number(n) => (*n).max(0) as u64,
        _ => 0,
    }
}

fn text(value: &Value) -> &str {
    match value {
        Value::Text(text) => text,
        _ => "",
    }
}

fn chosen(value: &Value, options: &[&'static str]) -> &'static str {
    match value {
        Value::Choice(i) => options.get(*i as usize).copied().unwrap_or_default(),
        _ => "",
    }
}

/// The position of a setting in `SETTINGS` (the server's handle for it).
pub fn position(name: &str) -> Option<usize> {
    SETTINGS.iter().position(|def| def.name == name)
}

/// `maxage.client-kill-compat`, read alone (the whole snapshot parses the rules).
pub fn client_kill_compat() -> bool {
    position("client-kill-compat")
        .and_then(|index| values().get(index).cloned())
        .is_some_and(|value| value == Value::Flag(true))
}

/// Every setting as INFO shows it, in table order: `max_age_ms`, `mode`, ... (the server adds
/// the `maxage_` prefix), each value as `CONFIG GET` would print it.
pub fn info_fields() -> Vec<(String, String)> {
    let values = values();
    SETTINGS
        .iter()
        .zip(values.iter())
        .map(|(def, value)| {
            let shown = match (value, def.kind) {
                (Value::Number(n), _) => n.to_string(),
                (Value::Text(text), _) => text.clone(),
                (Value::Flag(on), _) => if *on { "yes" } else { "no" }.to_string(),
                (Value::Choice(i), Kind::Choice { options, .. }) => options
                    .get(*i as usize)
                    .copied()
                    .unwrap_or_default()
                    .to_string(),
                (Value::Choice(i), _) => i.to_string(),
            };
            (def.name.replace('-', "_"), shown)
        })
        .collect()
}

/// Parses `loadmodule ... name value [name value ...]` completely, so that a bad argument
/// refuses the load and changes nothing. The result is each setting's default for this load:
/// the load argument where one is given, the table's default otherwise.
pub fn defaults_from_load_args(args: &[&[u8]]) -> Result<Vec<Value>, String> {
    if !args.len().is_multiple_of(2) {
        let last = String::from_utf8_lossy(args[args.len() - 1]);
        return Err(format!(
            "load arguments must be name/value pairs; '{}' has no value",
            quoted(&last)
        ));
    }
    let mut defaults: Vec<Value> = SETTINGS.iter().map(|d| d.kind.default_value()).collect();
    for pair in args.chunks(2) {
        let raw_name = String::from_utf8_lossy(pair[0]);
        let name = raw_name.strip_prefix("maxage.").unwrap_or(&raw_name);
        let Some(index) = SETTINGS
            .iter()
            .position(|def| def.name.eq_ignore_ascii_case(name))
        else {
            return Err(format!("unknown argument '{}'", quoted(&raw_name)));
        };
        let def = &SETTINGS[index];
        defaults[index] = def
            .kind
            .parse(pair[1])
            .map_err(|why| format!("argument {}: {why}", def.name))?;
    }
    Ok(defaults)
}

/// Which kinds of client `maxage.exempt-types` spares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExemptTypes {
    pub master: bool,
    pub replica: bool,
    pub pubsub: bool,
    pub normal: bool,
    pub monitor: bool,
    /// Clients marked `CLIENT NO-EVICT on`: the server's own flag for control-path connections.
    pub no_evict: bool,
}

impl ExemptTypes {
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut types = Self::default();
        for word in value.split_whitespace() {
            match word.to_ascii_lowercase().as_str() {
                "master" | "primary" => types.master = true,
                "replica" | "slave" => types.replica = true,
                "pubsub" => types.pubsub = true,
                "normal" => types.normal = true,
                "monitor" => types.monitor = true,
                "no-evict" => types.no_evict = true,
                _ => {
                    return Err(format!(
                        "unknown client type '{}' (expected master, replica, pubsub, normal, monitor or no-evict)",
                        quoted(word)
                    ));
                }
            }
        }
        Ok(types)
    }
}

/// Whitespace-separated glob patterns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Patterns(Vec<String>);

impl Patterns {
    pub fn parse(value: &str) -> Self {
        Self(value.split_whitespace().map(str::to_string).collect())
    }

    pub fn any_matches(&self, text: &str) -> bool {
        self.0
            .iter()
            .any(|p| glob_matches(p.as_bytes(), text.as_bytes()))
    }
}

/// Every setting, parsed, as the enforcement policy sees it (`Default` is all zero and empty:
/// `table_defaults` is the table's defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub max_age_ms: u64,
    pub jitter_pct: u64,
    pub max_evictions_per_sec: u64,
    /// Adaptive pacing: the rate falls towards `min_evictions_per_sec` as the server gets busy.
    pub adaptive_pacing: bool,
    pub min_evictions_per_sec: u64,
    /// A client held back by pacing this long is retired whatever the pacing (the slack).
    pub max_overdue_ms: u64,
    pub grace_ms: u64,
    pub exempt_types: ExemptTypes,
    pub exempt_users: Patterns,
    pub exempt_names: Patterns,
    pub rules: Rules,
    pub observe_only: bool,
    /// How long before its deadline a connection that opted in (`MAXAGE.NOTICE`) is told to
    /// leave; 0 turns notices off.
    pub notice_lead_ms: u64,
    /// `CLIENT KILL` filters the server lacks are answered by the module.
    pub client_kill_compat: bool,
}

impl Settings {
    fn from_values(values: &[Value]) -> Self {
        let mut settings = Settings::default();
        for (def, value) in SETTINGS.iter().zip(values) {
            (def.apply)(&mut settings, value);
        }
        settings
    }

    /// Every setting at the table's default (tests build their settings from it).
    #[cfg(test)]
    pub fn table_defaults() -> Self {
        let defaults: Vec<Value> = SETTINGS.iter().map(|d| d.kind.default_value()).collect();
        Self::from_values(&defaults)
    }

    /// The shortest max age any client can have, if enforcement is on at all.
    pub fn shortest_max_age_ms(&self) -> Option<u64> {
        self.rules.shortest_max_age_ms(self.max_age_ms)
    }

    pub fn enforcing(&self) -> bool {
        self.shortest_max_age_ms().is_some()
    }

    /// `maxage.mode` as CONFIG GET spells it.
    pub fn mode_name(&self) -> &'static str {
        MODE_OPTIONS[usize::from(self.observe_only)]
    }
}

/// Reads every setting as currently set.
pub fn snapshot() -> Settings {
    Settings::from_values(&values())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Vec<u8>> {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    fn defaults(words: &[Vec<u8>]) -> Result<Vec<Value>, String> {
        let slices: Vec<&[u8]> = words.iter().map(Vec::as_slice).collect();
        defaults_from_load_args(&slices)
    }

    #[test]
    fn exempt_types_parse() {
        let types = ExemptTypes::parse("master  Replica no-evict").unwrap();
        assert!(types.master && types.replica && types.no_evict);
        assert!(!types.pubsub && !types.normal && !types.monitor);
        assert_eq!(ExemptTypes::parse("").unwrap(), ExemptTypes::default());
        assert!(
            ExemptTypes::parse("master bogus")
                .unwrap_err()
                .contains("bogus")
        );
    }

    #[test]
    fn patterns_match_any() {
        let patterns = Patterns::parse("monitoring-* admin");
        assert!(patterns.any_matches("monitoring-7"));
        assert!(patterns.any_matches("admin"));
        assert!(!patterns.any_matches("web"));
        assert!(!Patterns::parse("").any_matches(""));
    }

    #[test]
    fn load_arguments_are_validated_whole_and_become_defaults() {
        assert!(
            defaults(&args(&["max-age-ms"]))
                .unwrap_err()
                .contains("no value")
        );
        assert!(
            defaults(&args(&["bogus", "1"]))
                .unwrap_err()
                .contains("unknown argument 'bogus'")
        );
        assert!(
            defaults(&args(&["jitter-pct", "101"]))
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            defaults(&args(&["grace-ms", "soon"]))
                .unwrap_err()
                .contains("not an integer")
        );
        assert!(defaults(&args(&["mode", "maybe"])).is_err());
        assert!(defaults(&args(&["exempt-types", "robots"])).is_err());
        assert!(defaults(&args(&["client-kill-compat", "perhaps"])).is_err());
        assert!(defaults(&args(&["max-age-ms", "777", "jitter-pct", "-1"])).is_err());
        assert!(defaults(&args(&["max-age-ms", "18446744073709552000"])).is_err());
        let parsed = defaults(&args(&[
            "max-age-ms",
            "300000",
            "maxage.jitter-pct",
            "0",
            "mode",
            "observe",
            "exempt-names",
            "monitoring-*",
        ]))
        .unwrap();
        let settings = Settings::from_values(&parsed);
        assert_eq!(settings.max_age_ms, 300_000);
        assert_eq!(settings.jitter_pct, 0);
        assert!(settings.observe_only);
        assert!(settings.exempt_names.any_matches("monitoring-1"));
        assert_eq!(
            Settings::from_values(&defaults(&[]).unwrap()),
            Settings::table_defaults()
        );
    }

    #[test]
    fn arbitrary_bytes_are_refused_with_a_safe_message() {
        for bad in [
            &b"x\0"[..],
            b"a\r\nb",
            b"\xff\xfe",
            "\u{100}".as_bytes(),
            b"type:normal=18446744073709552",
        ] {
            for name in [
                "exempt-types",
                "exempt-users",
                "rules",
                "mode",
                "max-age-ms",
            ] {
                let words = vec![name.as_bytes().to_vec(), bad.to_vec()];
                if let Err(why) = defaults(&words) {
                    assert!(!why.contains(['\0', '\r', '\n']), "{why:?}");
                }
            }
        }
        assert!(defaults(&[b"exempt-users".to_vec(), b"x\0".to_vec()]).is_err());
        assert!(defaults(&[b"\0".to_vec(), b"1".to_vec()]).is_err());
        let long = "é".repeat(10_000);
        assert!(quoted(&long).chars().count() < 80);
    }

    /// The wire fuzzer sets every setting (its `CONFIG_*` tables name each one).
    #[test]
    fn the_fuzzer_knows_every_setting() {
        let fuzzer = include_str!("../../scripts/maxage_tools/wire_fuzz.py");
        for def in &SETTINGS {
            assert!(
                fuzzer.contains(&format!("b\"{}\"", def.name)),
                "wire_fuzz.py does not set {}",
                def.name
            );
        }
    }

    /// `conf/maxage.conf`, the settings table of docs/enforcement.md and the README's settings
    /// at a glance list exactly the table's settings, and the example states each default.
    #[test]
    fn the_example_config_and_the_docs_follow_the_table() {
        let example = include_str!("../../conf/maxage.conf");
        let docs = [
            (
                "docs/enforcement.md",
                include_str!("../../docs/enforcement.md"),
            ),
            ("README.md", include_str!("../../README.md")),
        ];
        let in_example: Vec<(&str, &str)> = example
            .lines()
            .filter_map(|line| line.strip_prefix("maxage."))
            .filter_map(|line| line.split_once(' '))
            .collect();
        assert_eq!(in_example.len(), SETTINGS.len(), "{in_example:?}");
        for def in &SETTINGS {
            let (_, value) = in_example
                .iter()
                .find(|(name, _)| *name == def.name)
                .unwrap_or_else(|| panic!("conf/maxage.conf lacks {}", def.name));
            let value = value.trim_matches('"');
            let default = match def.kind.default_value() {
                Value::Number(n) => n.to_string(),
                Value::Text(text) => text,
                Value::Flag(on) => if on { "yes" } else { "no" }.to_string(),
                Value::Choice(i) => match def.kind {
                    Kind::Choice { options, .. } => options[i as usize].to_string(),
                    _ => unreachable!(),
                },
            };
            assert_eq!(
                value, default,
                "default of {} in conf/maxage.conf",
                def.name
            );
            for (file, doc) in docs {
                assert!(
                    doc.contains(&format!("| `maxage.{}` |", def.name)),
                    "the settings table of {file} lacks maxage.{}",
                    def.name
                );
            }
        }
        for (file, doc) in docs {
            let documented = doc
                .lines()
                .filter(|line| line.starts_with("| `maxage."))
                .count();
            assert_eq!(
                documented,
                SETTINGS.len(),
                "{file}: rows for unknown settings"
            );
        }
    }

    // The only test that stores into the process-wide values.
    #[test]
    fn set_checks_before_storing() {
        let rules = position("rules").unwrap();
        assert!(set(rules, Value::Text("type:normal=1000".to_string())).is_ok());
        assert!(set(rules, Value::Text("type:normal=x".to_string())).is_err());
        assert!(set(rules, Value::Text("user:a\0=1".to_string())).is_err());
        assert_eq!(snapshot().rules.shortest_max_age_ms(0), Some(1000));
        assert!(set(position("jitter-pct").unwrap(), Value::Number(101)).is_err());
        assert!(set(position("mode").unwrap(), Value::Choice(2)).is_err());
        assert!(set(rules, Value::Text(String::new())).is_ok());
        assert_eq!(snapshot(), Settings::table_defaults());
    }
}
