//! The `maxage.*` settings: their defaults and bounds, validation, load arguments, and the
//! parsed snapshot the enforcement policy works from.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use lazy_static::lazy_static;
use redis_module::configuration::ConfigurationContext;
use redis_module::{ConfigurationValue, RedisError, RedisString};

use crate::glob::glob_matches;
use crate::rules::Rules;

pub const MAX_AGE_MS_DEFAULT: i64 = 0;
pub const MAX_AGE_MS_MIN: i64 = 0;
/// Ten years: far beyond any sane lifetime, far below overflow when added to a timestamp.
pub const MAX_AGE_MS_MAX: i64 = 315_360_000_000;
pub const JITTER_PCT_DEFAULT: i64 = 10;
pub const JITTER_PCT_MIN: i64 = 0;
pub const JITTER_PCT_MAX: i64 = 100;
pub const MAX_EVICTIONS_PER_SEC_DEFAULT: i64 = 1000;
pub const MAX_EVICTIONS_PER_SEC_MIN: i64 = 0;
pub const MAX_EVICTIONS_PER_SEC_MAX: i64 = 1_000_000;
pub const MIN_EVICTIONS_PER_SEC_DEFAULT: i64 = 50;
pub const MAX_OVERDUE_MS_DEFAULT: i64 = 60_000;
pub const MAX_OVERDUE_MS_MIN: i64 = 0;
pub const MAX_OVERDUE_MS_MAX: i64 = 86_400_000;
pub const GRACE_MS_DEFAULT: i64 = 5000;
pub const GRACE_MS_MIN: i64 = 0;
pub const GRACE_MS_MAX: i64 = 3_600_000;
pub const EXEMPT_TYPES_DEFAULT: &str = "master replica no-evict";
pub const EXEMPT_USERS_DEFAULT: &str = "";
pub const EXEMPT_NAMES_DEFAULT: &str = "";
pub const RULES_DEFAULT: &str = "";
pub const CLIENT_KILL_COMPAT_DEFAULT: bool = true;

// Each `enum_configuration!` brings its own imports, so each lives in its own module.
mod mode_setting {
    use redis_module::enum_configuration;
    enum_configuration! {
        #[allow(non_camel_case_types)]
        pub enum Mode {
            enforce = 0,
            observe = 1,
        }
    }
}
pub use mode_setting::Mode;

mod pacing_setting {
    use redis_module::enum_configuration;
    enum_configuration! {
        #[allow(non_camel_case_types)]
        pub enum Pacing {
            fixed = 0,
            adaptive = 1,
        }
    }
}
pub use pacing_setting::Pacing;

/// A string setting that refuses values its validator rejects (the old value stays).
pub struct CheckedString {
    value: Mutex<String>,
    validate: fn(&str) -> Result<(), String>,
}

impl CheckedString {
    fn new(default: &str, validate: fn(&str) -> Result<(), String>) -> Self {
        Self {
            value: Mutex::new(default.to_string()),
            validate,
        }
    }

    pub fn current(&self) -> String {
        self.value.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn store(&self, value: &str) -> Result<(), String> {
        (self.validate)(value)?;
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = value.to_string();
        Ok(())
    }
}

impl ConfigurationValue<RedisString> for CheckedString {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        RedisString::create(None, self.current().as_str())
    }

    fn set(&self, _ctx: &ConfigurationContext, value: RedisString) -> Result<(), RedisError> {
        let text = value
            .try_as_str()
            .map_err(|_| RedisError::Str("value is not valid UTF-8"))?;
        self.store(text).map_err(RedisError::String)
    }
}

lazy_static! {
    pub static ref MAX_AGE_MS: AtomicI64 = AtomicI64::new(MAX_AGE_MS_DEFAULT);
    pub static ref JITTER_PCT: AtomicI64 = AtomicI64::new(JITTER_PCT_DEFAULT);
    pub static ref MAX_EVICTIONS_PER_SEC: AtomicI64 = AtomicI64::new(MAX_EVICTIONS_PER_SEC_DEFAULT);
    pub static ref GRACE_MS: AtomicI64 = AtomicI64::new(GRACE_MS_DEFAULT);
    pub static ref MIN_EVICTIONS_PER_SEC: AtomicI64 = AtomicI64::new(MIN_EVICTIONS_PER_SEC_DEFAULT);
    pub static ref MAX_OVERDUE_MS: AtomicI64 = AtomicI64::new(MAX_OVERDUE_MS_DEFAULT);
    pub static ref PACING: Mutex<Pacing> = Mutex::new(Pacing::fixed);
    pub static ref EXEMPT_TYPES: CheckedString =
        CheckedString::new(EXEMPT_TYPES_DEFAULT, |v| ExemptTypes::parse(v).map(|_| ()));
    pub static ref EXEMPT_USERS: CheckedString =
        CheckedString::new(EXEMPT_USERS_DEFAULT, |_| Ok(()));
    pub static ref EXEMPT_NAMES: CheckedString =
        CheckedString::new(EXEMPT_NAMES_DEFAULT, |_| Ok(()));
    pub static ref RULES: CheckedString =
        CheckedString::new(RULES_DEFAULT, |v| Rules::parse(v).map(|_| ()));
    pub static ref MODE: Mutex<Mode> = Mutex::new(Mode::enforce);
    pub static ref CLIENT_KILL_COMPAT: AtomicBool = AtomicBool::new(CLIENT_KILL_COMPAT_DEFAULT);
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
                        "unknown client type '{word}' (expected master, replica, pubsub, normal, monitor or no-evict)"
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

/// Every setting, parsed, as the enforcement policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub max_age_ms: u64,
    pub jitter_pct: u64,
    pub max_evictions_per_sec: u64,
    /// Adaptive pacing: the rate falls towards `min_evictions_per_sec` as the server gets busy.
    pub adaptive_pacing: bool,
    pub min_evictions_per_sec: u64,
    /// A client overdue by this much is retired whatever the pacing (the slack).
    pub max_overdue_ms: u64,
    pub grace_ms: u64,
    pub exempt_types: ExemptTypes,
    pub exempt_users: Patterns,
    pub exempt_names: Patterns,
    pub rules: Rules,
    pub observe_only: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_age_ms: MAX_AGE_MS_DEFAULT as u64,
            jitter_pct: JITTER_PCT_DEFAULT as u64,
            max_evictions_per_sec: MAX_EVICTIONS_PER_SEC_DEFAULT as u64,
            adaptive_pacing: false,
            min_evictions_per_sec: MIN_EVICTIONS_PER_SEC_DEFAULT as u64,
            max_overdue_ms: MAX_OVERDUE_MS_DEFAULT as u64,
            grace_ms: GRACE_MS_DEFAULT as u64,
            exempt_types: ExemptTypes::parse(EXEMPT_TYPES_DEFAULT).unwrap_or_default(),
            exempt_users: Patterns::default(),
            exempt_names: Patterns::default(),
            rules: Rules::default(),
            observe_only: false,
        }
    }
}

impl Settings {
    /// The shortest max age any client can have, if enforcement is on at all.
    pub fn shortest_max_age_ms(&self) -> Option<u64> {
        self.rules.shortest_max_age_ms(self.max_age_ms)
    }

    pub fn enforcing(&self) -> bool {
        self.shortest_max_age_ms().is_some()
    }

    /// `maxage.mode` as CONFIG GET spells it.
    pub fn mode_name(&self) -> &'static str {
        if self.observe_only {
            "observe"
        } else {
            "enforce"
        }
    }

    /// `maxage.pacing` as CONFIG GET spells it.
    pub fn pacing_name(&self) -> &'static str {
        if self.adaptive_pacing {
            "adaptive"
        } else {
            "fixed"
        }
    }
}

pub fn current_mode() -> Mode {
    MODE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Reads every setting from the values the server's CONFIG machinery stores into.
pub fn snapshot() -> Settings {
    let load = |v: &AtomicI64| v.load(Ordering::Relaxed).max(0) as u64;
    Settings {
        max_age_ms: load(&MAX_AGE_MS),
        jitter_pct: load(&JITTER_PCT),
        max_evictions_per_sec: load(&MAX_EVICTIONS_PER_SEC),
        adaptive_pacing: matches!(
            PACING.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            Pacing::adaptive
        ),
        min_evictions_per_sec: load(&MIN_EVICTIONS_PER_SEC),
        max_overdue_ms: load(&MAX_OVERDUE_MS),
        grace_ms: load(&GRACE_MS),
        exempt_types: ExemptTypes::parse(&EXEMPT_TYPES.current()).unwrap_or_default(),
        exempt_users: Patterns::parse(&EXEMPT_USERS.current()),
        exempt_names: Patterns::parse(&EXEMPT_NAMES.current()),
        rules: Rules::parse(&RULES.current()).unwrap_or_default(),
        observe_only: matches!(current_mode(), Mode::observe),
    }
}

/// What one numeric setting accepts.
struct NumericSetting {
    name: &'static str,
    value: &'static AtomicI64,
    min: i64,
    max: i64,
}

fn numeric_settings() -> [NumericSetting; 6] {
    [
        NumericSetting {
            name: "min-evictions-per-sec",
            value: &MIN_EVICTIONS_PER_SEC,
            min: MAX_EVICTIONS_PER_SEC_MIN,
            max: MAX_EVICTIONS_PER_SEC_MAX,
        },
        NumericSetting {
            name: "max-overdue-ms",
            value: &MAX_OVERDUE_MS,
            min: MAX_OVERDUE_MS_MIN,
            max: MAX_OVERDUE_MS_MAX,
        },
        NumericSetting {
            name: "max-age-ms",
            value: &MAX_AGE_MS,
            min: MAX_AGE_MS_MIN,
            max: MAX_AGE_MS_MAX,
        },
        NumericSetting {
            name: "jitter-pct",
            value: &JITTER_PCT,
            min: JITTER_PCT_MIN,
            max: JITTER_PCT_MAX,
        },
        NumericSetting {
            name: "max-evictions-per-sec",
            value: &MAX_EVICTIONS_PER_SEC,
            min: MAX_EVICTIONS_PER_SEC_MIN,
            max: MAX_EVICTIONS_PER_SEC_MAX,
        },
        NumericSetting {
            name: "grace-ms",
            value: &GRACE_MS,
            min: GRACE_MS_MIN,
            max: GRACE_MS_MAX,
        },
    ]
}

/// One of two words, any case (as CONFIG SET takes enum values), or why not.
fn parse_choice<T: Clone>(name: &str, value: &str, options: &[(&str, T); 2]) -> Result<T, String> {
    options
        .iter()
        .find(|(word, _)| value.eq_ignore_ascii_case(word))
        .map(|(_, choice)| choice.clone())
        .ok_or_else(|| {
            format!(
                "argument {name}: '{value}' is not {} or {}",
                options[0].0, options[1].0
            )
        })
}

fn parse_yes_no(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// Validates `loadmodule ... name value [name value ...]` completely before applying any of it,
/// so a bad argument leaves every setting as it was. The error says which argument and why.
pub fn apply_load_args(args: &[String]) -> Result<(), String> {
    if !args.len().is_multiple_of(2) {
        return Err(format!(
            "load arguments must be name/value pairs; '{}' has no value",
            args[args.len() - 1]
        ));
    }
    let numeric = numeric_settings();
    let mut pending: Vec<Box<dyn FnOnce()>> = Vec::new();
    for pair in args.chunks(2) {
        let (raw_name, value) = (pair[0].as_str(), pair[1].clone());
        let name = raw_name.strip_prefix("maxage.").unwrap_or(raw_name);
        if let Some(setting) = numeric.iter().find(|s| s.name == name) {
            let number: i64 = value
                .parse()
                .map_err(|_| format!("argument {name}: '{value}' is not an integer"))?;
            if number < setting.min || number > setting.max {
                return Err(format!(
                    "argument {name}: {number} is out of range [{}, {}]",
                    setting.min, setting.max
                ));
            }
            let target = setting.value;
            pending.push(Box::new(move || target.store(number, Ordering::Relaxed)));
            continue;
        }
        let checked: Option<&'static CheckedString> = match name {
            "exempt-types" => Some(&EXEMPT_TYPES),
            "exempt-users" => Some(&EXEMPT_USERS),
            "exempt-names" => Some(&EXEMPT_NAMES),
            "rules" => Some(&RULES),
            _ => None,
        };
        if let Some(target) = checked {
            (target.validate)(&value).map_err(|e| format!("argument {name}: {e}"))?;
            pending.push(Box::new(move || {
                let _ = target.store(&value);
            }));
            continue;
        }
        match name {
            "mode" => {
                let mode = parse_choice(
                    name,
                    &value,
                    &[("enforce", Mode::enforce), ("observe", Mode::observe)],
                )?;
                pending.push(Box::new(move || {
                    *MODE.lock().unwrap_or_else(|p| p.into_inner()) = mode;
                }));
            }
            "pacing" => {
                let pacing = parse_choice(
                    name,
                    &value,
                    &[("fixed", Pacing::fixed), ("adaptive", Pacing::adaptive)],
                )?;
                pending.push(Box::new(move || {
                    *PACING.lock().unwrap_or_else(|p| p.into_inner()) = pacing;
                }));
            }
            "client-kill-compat" => {
                let enabled = parse_yes_no(&value).ok_or_else(|| {
                    format!("argument client-kill-compat: '{value}' is not yes or no")
                })?;
                pending.push(Box::new(move || {
                    CLIENT_KILL_COMPAT.store(enabled, Ordering::Relaxed)
                }));
            }
            _ => return Err(format!("unknown argument '{raw_name}'")),
        }
    }
    pending.into_iter().for_each(|apply| apply());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
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

    // One test touches the process-wide settings, so the cases run in order inside it.
    #[test]
    fn load_arguments_are_validated_before_anything_is_applied() {
        assert!(
            apply_load_args(&strings(&["max-age-ms"]))
                .unwrap_err()
                .contains("no value")
        );
        assert!(
            apply_load_args(&strings(&["bogus", "1"]))
                .unwrap_err()
                .contains("unknown argument 'bogus'")
        );
        assert!(
            apply_load_args(&strings(&["jitter-pct", "101"]))
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            apply_load_args(&strings(&["grace-ms", "soon"]))
                .unwrap_err()
                .contains("not an integer")
        );
        assert!(apply_load_args(&strings(&["mode", "maybe"])).is_err());
        assert!(apply_load_args(&strings(&["exempt-types", "robots"])).is_err());
        assert!(apply_load_args(&strings(&["client-kill-compat", "perhaps"])).is_err());
        // A good pair before a bad one must not be applied.
        assert!(apply_load_args(&strings(&["max-age-ms", "777", "jitter-pct", "-1"])).is_err());
        assert_eq!(MAX_AGE_MS.load(Ordering::Relaxed), MAX_AGE_MS_DEFAULT);

        apply_load_args(&strings(&[
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
        let settings = snapshot();
        assert_eq!(settings.max_age_ms, 300_000);
        assert_eq!(settings.jitter_pct, 0);
        assert!(settings.observe_only);
        assert!(settings.exempt_names.any_matches("monitoring-1"));
        apply_load_args(&strings(&[
            "max-age-ms",
            "0",
            "jitter-pct",
            "10",
            "mode",
            "enforce",
            "exempt-names",
            "",
        ]))
        .unwrap();
        assert_eq!(snapshot(), Settings::default());
    }
}
