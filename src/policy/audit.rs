//! The audit log of retirements: one `notice` line per retirement, with a per-second cap after
//! which retirements are counted and summarised in one line instead of flooding the log.

/// Lines logged individually per second before the summary takes over ("a few dozen").
pub const MAX_LINES_PER_SECOND: u64 = 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Enforcement: the client reached its maximum age.
    MaxAge,
    /// Enforcement: the client was mid-request at its deadline and its grace ran out.
    MaxAgeGraceExpired,
    /// `MAXAGE.KILL` (or the compatible `CLIENT KILL`).
    ManualKill,
    /// Enforcement: the client reached the max age it asked for with `MAXAGE.SELF`.
    ClientRequested,
    /// `MAXAGE.KILL ... GRACEFUL`: chosen by an operator, retired through enforcement.
    Drain,
}

/// Who a retirement is for: the operator (settings, rules, `MAXAGE.KILL`) or the client itself
/// (`MAXAGE.SELF`). Each has its own closing slots and audit cap, so that what an application
/// asks for itself can neither delay nor hide what the operator does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Operator,
    Client,
}

impl Reason {
    pub fn origin(self) -> Origin {
        match self {
            Reason::ClientRequested => Origin::Client,
            _ => Origin::Operator,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MaxAge => "max-age",
            Reason::MaxAgeGraceExpired => "max-age-after-grace",
            Reason::ManualKill => "manual",
            Reason::ClientRequested => "client-requested",
            Reason::Drain => "graceful-kill",
        }
    }
}

/// What the log line says about a client.
pub struct RetiredClient<'a> {
    pub client_id: u64,
    pub addr: &'a str,
    pub user: &'a str,
    pub name: &'a str,
    pub age_ms: u64,
    /// It had been told to leave (`MAXAGE.NOTICE`) and had not: the module's close is the
    /// backstop.
    pub noticed: bool,
}

/// Quotes a client-supplied string so that it cannot forge or break a log line.
pub fn escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len() + 2);
    escaped.push('"');
    for byte in value.bytes() {
        match byte {
            b'"' => escaped.push_str("\\\""),
            b'\\' => escaped.push_str("\\\\"),
            0x20..=0x7e => escaped.push(byte as char),
            _ => escaped.push_str(&format!("\\x{byte:02x}")),
        }
    }
    escaped.push('"');
    escaped
}

pub fn retirement_line(client: &RetiredClient, reason: Reason, observe_only: bool) -> String {
    let verb = if observe_only {
        "would retire (observe mode)"
    } else {
        "retired"
    };
    format!(
        "maxage: {verb} client id={} addr={} user={} name={} age_ms={} reason={}{}",
        client.client_id,
        escape(client.addr),
        escape(client.user),
        escape(client.name),
        client.age_ms,
        reason.as_str(),
        if client.noticed { "-after-notice" } else { "" }
    )
}

/// Decides, per retirement, whether it gets its own line; counts the rest per one-second window,
/// with one cap for the operator's retirements and another for clients' own requests.
#[derive(Debug, Default)]
pub struct AuditLimiter {
    operator: AuditWindow,
    client: AuditWindow,
}

impl AuditLimiter {
    fn window(&mut self, origin: Origin) -> &mut AuditWindow {
        match origin {
            Origin::Operator => &mut self.operator,
            Origin::Client => &mut self.client,
        }
    }

    /// Returns `(summaries of finished windows that suppressed anything, whether to log this one)`.
    pub fn admit(&mut self, now_ms: u64, origin: Origin) -> (Vec<String>, bool) {
        let summaries = self.flush(now_ms);
        (summaries, self.window(origin).admit())
    }

    /// The summaries of finished windows, if they suppressed anything (call from the timer too).
    pub fn flush(&mut self, now_ms: u64) -> Vec<String> {
        [
            self.operator.roll(now_ms, ""),
            self.client.roll(now_ms, "client-requested "),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// When a pending summary is due, so the caller can wake up for it.
    pub fn summary_due_at_ms(&self) -> Option<u64> {
        [&self.operator, &self.client]
            .into_iter()
            .filter_map(AuditWindow::summary_due_at_ms)
            .min()
    }
}

#[derive(Debug, Default)]
struct AuditWindow {
    window_start_ms: u64,
    logged_in_window: u64,
    suppressed_in_window: u64,
}

impl AuditWindow {
    fn admit(&mut self) -> bool {
        if self.logged_in_window < MAX_LINES_PER_SECOND {
            self.logged_in_window += 1;
            true
        } else {
            self.suppressed_in_window += 1;
            false
        }
    }

    fn summary_due_at_ms(&self) -> Option<u64> {
        (self.suppressed_in_window > 0).then_some(self.window_start_ms + 1000)
    }

    fn roll(&mut self, now_ms: u64, kind: &str) -> Option<String> {
        if now_ms < self.window_start_ms + 1000 {
            return None;
        }
        let summary = (self.suppressed_in_window > 0).then(|| {
            format!(
                "maxage: {} more {kind}retirements in the last second were not logged one by one ({} were)",
                self.suppressed_in_window, self.logged_in_window
            )
        });
        self.window_start_ms = now_ms;
        self.logged_in_window = 0;
        self.suppressed_in_window = 0;
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_forge_log_lines() {
        assert_eq!(escape("web-1"), "\"web-1\"");
        assert_eq!(escape("a\nb\"c\\"), "\"a\\x0ab\\\"c\\\\\"");
        assert_eq!(escape("é"), "\"\\xc3\\xa9\"");
    }

    #[test]
    fn line_has_every_field() {
        let line = retirement_line(
            &RetiredClient {
                client_id: 7,
                addr: "127.0.0.1:5000",
                user: "default",
                name: "x y",
                age_ms: 1234,
                noticed: false,
            },
            Reason::MaxAge,
            false,
        );
        assert_eq!(
            line,
            "maxage: retired client id=7 addr=\"127.0.0.1:5000\" user=\"default\" name=\"x y\" age_ms=1234 reason=max-age"
        );
        assert!(
            retirement_line(
                &RetiredClient {
                    client_id: 1,
                    addr: "",
                    user: "",
                    name: "",
                    age_ms: 0,
                    noticed: false,
                },
                Reason::ManualKill,
                true
            )
            .contains("would retire")
        );
    }

    #[test]
    fn floods_become_one_summary_per_second() {
        let mut limiter = AuditLimiter::default();
        let admitted = (0..1000)
            .filter(|_| limiter.admit(5000, Origin::Operator).1)
            .count() as u64;
        assert_eq!(admitted, MAX_LINES_PER_SECOND);
        assert_eq!(limiter.summary_due_at_ms(), Some(6000));
        assert!(limiter.flush(5999).is_empty());
        let summary = limiter.flush(6000);
        assert!(summary[0].contains("960 more retirements"), "{summary:?}");
        assert_eq!(limiter.summary_due_at_ms(), None);
        assert!(limiter.flush(9000).is_empty());
        let (summary, logged) = limiter.admit(9001, Origin::Operator);
        assert!(summary.is_empty() && logged);
    }

    #[test]
    fn clients_own_requests_cannot_use_up_the_operators_lines() {
        let mut limiter = AuditLimiter::default();
        for _ in 0..1000 {
            limiter.admit(5000, Origin::Client);
        }
        assert!(limiter.admit(5000, Origin::Operator).1);
        let summary = limiter.flush(6000);
        assert_eq!(summary.len(), 1);
        assert!(
            summary[0].contains("960 more client-requested retirements"),
            "{summary:?}"
        );
    }
}
