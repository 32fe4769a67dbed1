//! Coverage-guided fuzzing of everything that reads client-supplied bytes without a server:
//! the filter parser and matcher, the CLIENT LIST parser, and glob patterns. Any panic is a bug
//! (inside the server it would become an error reply, but it must not happen at all).
#![no_main]

use libfuzzer_sys::fuzz_target;
use redis_maxage::client_list::{parse_client_line, parse_client_list};
use redis_maxage::filter::{Candidate, Command, parse};
use redis_maxage::filter_keywords::ServerFacts;
use redis_maxage::glob::glob_matches;

struct Facts;

impl ServerFacts for Facts {
    fn user_exists(&mut self, name: &str) -> bool {
        name.len() % 2 == 0
    }
    fn databases(&mut self) -> i64 {
        16
    }
}

const CLIENTS: [&str; 4] = [
    "id=5 addr=127.0.0.1:50100 laddr=127.0.0.1:7000 fd=8 name=web-1 age=12 idle=3 flags=N capa= db=2 user=alice lib-name=redis-py lib-ver=5.0.1",
    "id=6 addr=[::1]:40000 laddr=[::1]:7000 fd=9 name= age=1 idle=1 flags=P db=0 user=default",
    "id=7 addr=/tmp/r.sock:0 laddr=/tmp/r.sock:0 fd=10 name= age=1 idle=0 flags=OU db=0 user=default",
    "id=9 addr=127.0.0.1:7001 laddr=127.0.0.1:50103 fd=12 name= age=9 idle=0 flags=M db=0 user=(superuser)",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Arguments are separated by NUL bytes so that any byte, spaces included, can be in one.
    let args: Vec<&[u8]> = rest.split(|b| *b == 0).collect();
    let command = if mode & 1 == 0 { Command::Kill } else { Command::List };
    if let Ok(filter) = parse(&args, command, &mut Facts) {
        for line in CLIENTS {
            let listed = parse_client_line(line).expect("fixed client line");
            let candidate = Candidate {
                listed: &listed,
                age_ms: u64::from(mode) * 97,
                caller_id: 5,
            };
            let _ = filter.matches(&candidate);
        }
    }
    let text = String::from_utf8_lossy(rest);
    let _ = parse_client_list(&text);
    if let Some((pattern, subject)) = args.split_first() {
        let _ = glob_matches(pattern, subject.first().copied().unwrap_or_default());
    }
});
