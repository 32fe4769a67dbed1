//! `MAXAGE.PREVIEW`: what a rule set would do before it is applied. For the connected clients it
//! reports, per class, how many there are, their ages as a histogram, how many are exempt, and
//! how many the rules would retire now and within a window (a minute by default).

use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

use crate::policy::client_list::ListedClient;
use crate::policy::config::Settings;
use crate::policy::decisions::exemption;
use crate::policy::integers::parse_strict_i64;
use crate::policy::registry::TrackedClient;
use crate::policy::rules::{MAX_RULES_TEXT_BYTES, Rules};
use crate::policy::schedule::deadline_ms;
use crate::server::ffi::{self, Reply, monotonic_ms};
use crate::server::server_view::list_clients;
use crate::server::state::STATE;

/// Upper bounds of the age histogram's buckets, in milliseconds (the last bucket is open).
pub const AGE_BUCKETS_MS: [(u64, &str); 5] = [
    (1_000, "lt-1s"),
    (10_000, "lt-10s"),
    (60_000, "lt-1m"),
    (600_000, "lt-10m"),
    (3_600_000, "lt-1h"),
];
pub const LAST_BUCKET: &str = "ge-1h";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassPreview {
    pub class: String,
    /// 0: never retired.
    pub max_age_ms: u64,
    pub clients: u64,
    pub exempt: u64,
    pub due_now: u64,
    pub due_within: u64,
    /// Counts per `AGE_BUCKETS_MS` bucket, then the open last one.
    pub age_histogram: [u64; 6],
}

pub fn bucket_of(age_ms: u64) -> usize {
    AGE_BUCKETS_MS
        .iter()
        .position(|(bound, _)| age_ms < *bound)
        .unwrap_or(AGE_BUCKETS_MS.len())
}

/// Evaluates `settings` (with `rules` in place of its own) over the given clients. Classes come
/// in rule order, then "default".
pub fn preview(
    clients: &[(ListedClient, TrackedClient)],
    settings: &Settings,
    rules: &Rules,
    seed: u64,
    now_ms: u64,
    within_ms: u64,
) -> Vec<ClassPreview> {
    let mut classes: Vec<ClassPreview> = rules
        .iter()
        .map(|rule| ClassPreview {
            class: rule.label.clone(),
            max_age_ms: rule.max_age_ms,
            ..ClassPreview::default()
        })
        .collect();
    classes.push(ClassPreview {
        class: crate::policy::rules::DEFAULT_CLASS.to_string(),
        max_age_ms: settings.max_age_ms,
        ..ClassPreview::default()
    });
    for (listed, tracked) in clients {
        let (label, max_age_ms) = rules.class_of(listed, settings.max_age_ms);
        let Some(class) = classes.iter_mut().find(|c| c.class == label) else {
            continue;
        };
        class.clients += 1;
        class.age_histogram[bucket_of(tracked.age_ms(now_ms))] += 1;
        if exemption(settings, listed).is_some() {
            class.exempt += 1;
            continue;
        }
        if max_age_ms == 0 {
            continue;
        }
        let deadline = deadline_ms(
            tracked.connected_at_ms,
            max_age_ms,
            settings.jitter_pct,
            tracked.client_id,
            seed,
        );
        if deadline <= now_ms {
            class.due_now += 1;
        }
        if deadline <= now_ms.saturating_add(within_ms) {
            class.due_within += 1;
        }
    }
    classes
}

/// MAXAGE.PREVIEW [RULES <rules>] [MAX-AGE-MS <ms>] [WITHIN <ms>]
pub fn preview_command(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    crate::commands::acl::require(ctx, crate::commands::acl::Needs::ClientList, &[])?;
    let mut rules_text: Option<String> = None;
    let mut max_age_ms: Option<u64> = None;
    let mut within_ms = 60_000u64;
    let mut i = 1;
    while i < args.len() {
        let keyword = args[i].to_string_lossy().to_ascii_uppercase();
        let Some(value) = args.get(i + 1) else {
            return Err(RedisError::Str("ERR syntax error"));
        };
        let number = || {
            parse_strict_i64(value.as_slice())
                .filter(|n| (0..=crate::policy::config::MAX_AGE_MS_MAX).contains(n))
                .map(|n| n as u64)
                .ok_or_else(|| {
                    RedisError::String(format!(
                        "ERR {} is not an integer from 0 to {}",
                        keyword.to_lowercase(),
                        crate::policy::config::MAX_AGE_MS_MAX
                    ))
                })
        };
        match keyword.as_str() {
            "RULES" if value.as_slice().len() > MAX_RULES_TEXT_BYTES => {
                return Err(RedisError::String(format!(
                    "ERR rules are {} bytes, more than {MAX_RULES_TEXT_BYTES}",
                    value.as_slice().len()
                )));
            }
            "RULES" => rules_text = Some(value.to_string_lossy()),
            "MAX-AGE-MS" => max_age_ms = Some(number()?),
            "WITHIN" => within_ms = number()?,
            _ => return Err(RedisError::Str("ERR syntax error")),
        }
        i += 2;
    }
    let listed = list_clients(ctx, None);
    let now_ms = monotonic_ms();
    let classes = STATE
        .with(|policy| {
            let mut settings = policy.settings().clone();
            if let Some(max_age_ms) = max_age_ms {
                settings.max_age_ms = max_age_ms;
            }
            let rules = match &rules_text {
                Some(text) => {
                    Rules::parse(text).map_err(|why| RedisError::String(format!("ERR {why}")))?
                }
                None => settings.rules.clone(),
            };
            let clients: Vec<(ListedClient, TrackedClient)> = listed
                .into_iter()
                .filter_map(|client| {
                    policy
                        .registry()
                        .get(client.id)
                        .map(|tracked| (client, tracked))
                })
                .collect();
            Ok(preview(
                &clients,
                &settings,
                &rules,
                policy.seed(),
                now_ms,
                within_ms,
            ))
        })
        .unwrap_or(Err(RedisError::Str("ERR busy, try again")))?;
    let total_within: u64 = classes.iter().map(|c| c.due_within).sum();
    let entries = classes.into_iter().map(class_reply).collect();
    ffi::reply(
        ctx,
        &Reply::Map(vec![
            ("within-ms", Reply::Int(within_ms as i64)),
            ("would-retire-within", Reply::Int(total_within as i64)),
            ("classes", Reply::Array(entries)),
        ]),
    );
    Ok(RedisValue::NoReply)
}

fn class_reply(class: ClassPreview) -> Reply {
    let mut histogram: Vec<(&'static str, Reply)> = AGE_BUCKETS_MS
        .iter()
        .zip(class.age_histogram)
        .map(|((_, name), count)| (*name, Reply::Int(count as i64)))
        .collect();
    histogram.push((LAST_BUCKET, Reply::Int(class.age_histogram[5] as i64)));
    Reply::Map(vec![
        ("class", Reply::Str(class.class)),
        ("max-age-ms", Reply::Int(class.max_age_ms as i64)),
        ("clients", Reply::Int(class.clients as i64)),
        ("exempt", Reply::Int(class.exempt as i64)),
        ("due-now", Reply::Int(class.due_now as i64)),
        ("due-within", Reply::Int(class.due_within as i64)),
        ("age-histogram", Reply::Map(histogram)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::client_list::parse_client_line;

    fn client(id: u64, fields: &str, connected_at_ms: u64) -> (ListedClient, TrackedClient) {
        (
            parse_client_line(&format!(
                "id={id} addr=127.0.0.1:1 flags=N user=default {fields}"
            ))
            .unwrap(),
            TrackedClient {
                client_id: id,
                connected_at_ms,
                approximate: false,
            },
        )
    }

    #[test]
    fn counts_per_class_with_histogram_and_due_windows() {
        let settings = Settings {
            max_age_ms: 600_000,
            jitter_pct: 0,
            ..Settings::table_defaults()
        };
        let rules = Rules::parse("name:web-*=120000 name:monitoring-*=0").unwrap();
        let now = 10_000_000;
        let clients = vec![
            client(1, "name=web-1", now - 130_000), // web, overdue
            client(2, "name=web-2", now - 90_000),  // web, due within a minute
            client(3, "name=web-3", now - 500),     // web, young
            client(4, "name=monitoring-1", now - 5_000_000),
            client(5, "name=job", now - 580_000), // default, due within a minute
            client(6, "name=admin flags=e", now - 900_000), // no-evict: exempt
        ];
        let classes = preview(&clients, &settings, &rules, 1, now, 60_000);
        let web = &classes[0];
        assert_eq!((web.clients, web.due_now, web.due_within), (3, 1, 2));
        assert_eq!(web.age_histogram, [1, 0, 0, 2, 0, 0]);
        let monitoring = &classes[1];
        assert_eq!((monitoring.clients, monitoring.due_within), (1, 0));
        assert_eq!(monitoring.age_histogram[5], 1);
        let default = &classes[2];
        assert_eq!(default.class, "default");
        assert_eq!(
            (default.clients, default.exempt, default.due_within),
            (2, 1, 1)
        );
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(999), 0);
        assert_eq!(bucket_of(1000), 1);
        assert_eq!(bucket_of(59_999), 2);
        assert_eq!(bucket_of(3_600_000), 5);
    }
}
