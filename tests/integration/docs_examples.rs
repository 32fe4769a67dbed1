//! The `redis-cli` examples of README.md and docs/*.md, run against a live server with the
//! module, so that what the docs show is what the module answers.
//!
//! The format (also in docs/testing.md, "Examples in the docs"):
//!
//! - A fenced block tagged ```` ```redis-cli ```` is an example. Its info string may add
//!   `key=value` words that set the scene and do not show on the rendered page:
//!   `idle-clients=N` (N bare connections that send nothing, opened before the example's own
//!   connection and tracked by the module before the first command), `after-ms=N` (wait N ms
//!   before the first command, so those clients have an age), `server=redis|valkey` (run on one
//!   server only; by default it runs on both).
//! - A line starting with `> ` is a command, split into words as redis-cli splits a line
//!   (whitespace, `"..."` with backslash escapes, `'...'`). The lines after it, up to the next
//!   command, are its reply as redis-cli prints it on a terminal (`OK`, `(integer) 3`, `"text"`,
//!   `(nil)`, `(error) ERR ...`, `1) ...` with nested arrays indented; `INFO`, `CLIENT LIST` and
//!   `CLIENT INFO` printed raw, as redis-cli prints them). Every command shows a reply.
//! - Wildcards for what changes from run to run: `<word>` (angle brackets around lowercase
//!   letters, digits and `-`, e.g. `<id>`, `<age-ms>`, `<port>`) stands for any text of one
//!   character or more within a line, and a line of only `...` for any number of lines
//!   (none included).
//! - Comparison is per line, after trimming each line and turning each run of whitespace into
//!   one space, and leaving out empty lines; everything else is exact.
//!
//! Each example runs on a fresh server (per flavor) with the module loaded without arguments, on
//! one RESP2 connection, its commands in order. So examples do not depend on each other.
//!
//! What stays plain text (```` ``` ````, `sh`, `yaml`...), deliberately not run here: config file
//! lines (`loadmodule`, `maxage.*`), shell commands (`scripts/...`, `apt-get`,
//! `redis-cli --cluster call`, which needs a cluster: tests/integration/cluster.rs runs it),
//! the audit log line and the Prometheus excerpt (their tests are in operations.rs and
//! ecosystem.rs), and client-library code (run by self_request.rs). The last test below checks
//! that no redis-cli prompt (`$ redis-cli`, `127.0.0.1:6379>`) hides in a plain block.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::{BOTH, Flavor, Server, wait_until};

/// The files whose examples run: the README and every Markdown file in docs/.
fn documents() -> Vec<(String, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut paths = vec![format!("{root}/README.md")];
    let mut docs: Vec<String> = std::fs::read_dir(format!("{root}/docs"))
        .expect("docs/")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path().to_string_lossy().into_owned())
        .filter(|path| path.ends_with(".md"))
        .collect();
    docs.sort();
    paths.extend(docs);
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let name = path
                .strip_prefix(&format!("{root}/"))
                .unwrap_or(&path)
                .to_string();
            (name, text)
        })
        .collect()
}

#[derive(Debug)]
struct Example {
    /// `file:line` of the opening fence.
    place: String,
    idle_clients: usize,
    after_ms: u64,
    server: Option<Flavor>,
    steps: Vec<Step>,
}

#[derive(Debug)]
struct Step {
    line: usize,
    command: String,
    expected: Vec<String>,
}

/// Every ```redis-cli block of one document.
fn examples(file: &str, text: &str) -> Vec<Example> {
    let mut found = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let mut words = info.split_whitespace();
        let is_example = words.next() == Some("redis-cli");
        let mut body = Vec::new();
        for (n, line) in lines.by_ref() {
            if line.starts_with("```") {
                break;
            }
            body.push((n + 1, line));
        }
        if !is_example {
            continue;
        }
        let place = format!("{file}:{}", index + 1);
        let mut example = Example {
            place: place.clone(),
            idle_clients: 0,
            after_ms: 0,
            server: None,
            steps: Vec::new(),
        };
        for word in words {
            let (key, value) = word
                .split_once('=')
                .unwrap_or_else(|| panic!("{place}: `{word}` is not key=value"));
            match key {
                "idle-clients" => example.idle_clients = value.parse().expect("idle-clients=N"),
                "after-ms" => example.after_ms = value.parse().expect("after-ms=N"),
                "server" => {
                    example.server = Some(match value {
                        "redis" => Flavor::Redis,
                        "valkey" => Flavor::Valkey,
                        _ => panic!("{place}: server={value} is neither redis nor valkey"),
                    })
                }
                _ => panic!("{place}: unknown setting {key}"),
            }
        }
        for (n, line) in body {
            if let Some(command) = line.strip_prefix("> ") {
                example.steps.push(Step {
                    line: n,
                    command: command.to_string(),
                    expected: Vec::new(),
                });
            } else if let Some(step) = example.steps.last_mut() {
                step.expected.push(line.to_string());
            } else {
                assert!(
                    line.trim().is_empty(),
                    "{place}: a reply before any command"
                );
            }
        }
        assert!(!example.steps.is_empty(), "{place}: no command");
        for step in &example.steps {
            assert!(
                step.expected.iter().any(|line| !line.trim().is_empty()),
                "{file}:{}: `{}` shows no reply",
                step.line,
                step.command
            );
        }
        found.push(example);
    }
    found
}

/// A command line split into words the way redis-cli splits it (`sdssplitargs`).
fn split_words(line: &str) -> Vec<Vec<u8>> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return words;
        };
        let mut word = Vec::new();
        let push = |word: &mut Vec<u8>, c: char| {
            let mut buf = [0u8; 4];
            word.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        };
        if first == '"' {
            chars.next();
            loop {
                match chars.next().expect("unbalanced double quote") {
                    '"' => break,
                    '\\' => match chars.next().expect("escape at the end") {
                        'n' => word.push(b'\n'),
                        'r' => word.push(b'\r'),
                        't' => word.push(b'\t'),
                        'b' => word.push(8),
                        'a' => word.push(7),
                        'x' => {
                            let hex: String = chars.by_ref().take(2).collect();
                            word.push(u8::from_str_radix(&hex, 16).expect("\\xHH"));
                        }
                        other => push(&mut word, other),
                    },
                    other => push(&mut word, other),
                }
            }
        } else if first == '\'' {
            chars.next();
            loop {
                match chars.next().expect("unbalanced single quote") {
                    '\'' => break,
                    '\\' if chars.peek() == Some(&'\'') => {
                        chars.next();
                        word.push(b'\'');
                    }
                    other => push(&mut word, other),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                push(&mut word, c);
                chars.next();
            }
        }
        words.push(word);
    }
}

/// A RESP2 reply.
#[derive(Debug)]
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

fn read_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    let n = reader.read_line(&mut line).expect("read a reply");
    assert!(n > 0, "the server closed the connection");
    line.trim_end_matches(['\r', '\n']).to_string()
}

fn read_reply(reader: &mut impl BufRead) -> Reply {
    let line = read_line(reader);
    let (kind, rest) = line.split_at(1);
    match kind {
        "+" => Reply::Status(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Int(rest.parse().expect("integer reply")),
        "$" => {
            let len: i64 = rest.parse().expect("bulk length");
            if len < 0 {
                return Reply::Bulk(None);
            }
            let mut data = vec![0u8; len as usize + 2];
            reader.read_exact(&mut data).expect("bulk data");
            data.truncate(len as usize);
            Reply::Bulk(Some(data))
        }
        "*" => {
            let len: i64 = rest.parse().expect("array length");
            if len < 0 {
                return Reply::Array(None);
            }
            Reply::Array(Some((0..len).map(|_| read_reply(reader)).collect()))
        }
        _ => panic!("not a RESP2 reply: {line:?}"),
    }
}

/// One connection that sends commands as redis-cli does and reads RESP2 replies.
struct Cli {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Cli {
    fn connect(server: &Server) -> Cli {
        let writer = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
        writer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let reader = BufReader::new(writer.try_clone().expect("clone"));
        Cli { writer, reader }
    }

    fn call(&mut self, words: &[Vec<u8>]) -> Reply {
        let mut request = format!("*{}\r\n", words.len()).into_bytes();
        for word in words {
            request.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
            request.extend_from_slice(word);
            request.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&request).expect("send");
        read_reply(&mut self.reader)
    }

    fn tracked_clients(&mut self) -> Option<usize> {
        let Reply::Bulk(Some(info)) = self.call(&[b"INFO".to_vec(), b"maxage".to_vec()]) else {
            return None;
        };
        String::from_utf8_lossy(&info)
            .lines()
            .find_map(|line| line.strip_prefix("maxage_tracked_clients:"))
            .and_then(|n| n.trim().parse().ok())
    }
}

/// A bulk string as redis-cli quotes it (`sdscatrepr`).
fn quoted(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            7 => out.push_str("\\a"),
            8 => out.push_str("\\b"),
            b' '..=b'~' => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('"');
    out
}

/// A reply as redis-cli prints it on a terminal (`cliFormatReplyTTY`): `prefix` indents the
/// lines of a nested array after its first.
fn format_tty(reply: &Reply, prefix: &str, out: &mut String) {
    match reply {
        Reply::Status(text) => out.push_str(&format!("{text}\n")),
        Reply::Error(text) => out.push_str(&format!("(error) {text}\n")),
        Reply::Int(n) => out.push_str(&format!("(integer) {n}\n")),
        Reply::Bulk(None) | Reply::Array(None) => out.push_str("(nil)\n"),
        Reply::Bulk(Some(bytes)) => out.push_str(&format!("{}\n", quoted(bytes))),
        Reply::Array(Some(items)) if items.is_empty() => out.push_str("(empty array)\n"),
        Reply::Array(Some(items)) => {
            let width = items.len().to_string().len();
            let inner = format!("{prefix}{}", " ".repeat(width + 2));
            for (i, item) in items.iter().enumerate() {
                let first = if i == 0 { "" } else { prefix };
                out.push_str(&format!("{first}{:>width$}) ", i + 1));
                format_tty(item, &inner, out);
            }
        }
    }
}

/// redis-cli prints the replies of these commands raw, not quoted.
fn printed_raw(words: &[Vec<u8>]) -> bool {
    let word = |i: usize| {
        words
            .get(i)
            .map(|w| String::from_utf8_lossy(w).to_ascii_lowercase())
    };
    match word(0).as_deref() {
        Some("info") => true,
        Some("client") => matches!(word(1).as_deref(), Some("list" | "info")),
        _ => false,
    }
}

fn format_reply(words: &[Vec<u8>], reply: &Reply) -> String {
    match reply {
        Reply::Bulk(Some(bytes)) if printed_raw(words) => {
            String::from_utf8_lossy(bytes).into_owned()
        }
        _ => {
            let mut out = String::new();
            format_tty(reply, "", &mut out);
            out
        }
    }
}

/// Trimmed, whitespace runs as one space, empty lines left out.
fn normalised<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    lines
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|line| !line.is_empty())
        .collect()
}

/// Pieces of an expected line: literal text and `<word>` wildcards.
enum Piece<'a> {
    Text(&'a str),
    Any,
}

fn pieces(line: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(open) = rest.find('<') {
        let close = rest[open..].find('>').map(|c| open + c);
        let is_wildcard = close.is_some_and(|close| {
            let name = &rest[open + 1..close];
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
        match close {
            Some(close) if is_wildcard => {
                out.push(Piece::Text(&rest[..open]));
                out.push(Piece::Any);
                rest = &rest[close + 1..];
            }
            _ => {
                out.push(Piece::Text(&rest[..open + 1]));
                rest = &rest[open + 1..];
            }
        }
    }
    out.push(Piece::Text(rest));
    out
}

fn pieces_match(pieces: &[Piece], text: &str) -> bool {
    match pieces.split_first() {
        None => text.is_empty(),
        Some((Piece::Text(literal), rest)) => text
            .strip_prefix(literal)
            .is_some_and(|text| pieces_match(rest, text)),
        Some((Piece::Any, rest)) => text
            .char_indices()
            .skip(1)
            .map(|(i, _)| i)
            .chain([text.len()])
            .filter(|&i| i > 0)
            .any(|i| pieces_match(rest, &text[i..])),
    }
}

fn lines_match(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((line, rest)) if line == "..." => {
            (0..=actual.len()).any(|skip| lines_match(rest, &actual[skip..]))
        }
        Some((line, rest)) => actual.split_first().is_some_and(|(first, others)| {
            pieces_match(&pieces(line), first) && lines_match(rest, others)
        }),
    }
}

/// Runs one example on one server; returns what went wrong, if anything.
fn run_example(example: &Example, flavor: Flavor, file: &str) -> Vec<String> {
    let server = Server::start(flavor);
    let idle: Vec<TcpStream> = (0..example.idle_clients)
        .map(|_| server.idle_socket())
        .collect();
    let mut cli = Cli::connect(&server);
    assert!(
        wait_until(Duration::from_secs(5), || cli.tracked_clients()
            == Some(idle.len() + 1)),
        "{}: the module never tracked the example's clients",
        example.place
    );
    std::thread::sleep(Duration::from_millis(example.after_ms));
    let mut failures = Vec::new();
    for step in &example.steps {
        let words = split_words(&step.command);
        let printed = format_reply(&words, &cli.call(&words));
        let expected = normalised(step.expected.iter().map(String::as_str));
        let actual = normalised(printed.lines());
        if !lines_match(&expected, &actual) {
            failures.push(format!(
                "{file}:{} on {flavor:?}: > {}\nexpected:\n{}\ngot:\n{}",
                step.line,
                step.command,
                expected.join("\n"),
                actual.join("\n")
            ));
        }
    }
    drop(idle);
    failures
}

#[test]
fn the_redis_cli_examples_in_the_docs_hold() {
    let mut failures = Vec::new();
    let mut run = 0;
    for (file, text) in documents() {
        for example in examples(&file, &text) {
            for flavor in BOTH {
                if example.server.is_some_and(|only| only != flavor) {
                    continue;
                }
                failures.extend(run_example(&example, flavor, &file));
                run += 1;
            }
        }
    }
    assert!(
        run >= 10,
        "only {run} examples ran: is the format still found?"
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// A redis-cli session shown in a plain block would never be checked: the docs show one only in
/// the tested format.
#[test]
fn every_redis_cli_session_in_the_docs_is_a_tested_example() {
    for (file, text) in documents() {
        // Inside a block: whether it is a plain one.
        let mut block: Option<bool> = None;
        for (n, line) in text.lines().enumerate() {
            if let Some(info) = line.strip_prefix("```") {
                block = match block {
                    None => Some(!info.starts_with("redis-cli")),
                    Some(_) => None,
                };
                continue;
            }
            if block == Some(true) {
                let trimmed = line.trim_start();
                assert!(
                    !trimmed.starts_with("$ redis-cli") && !trimmed.starts_with("127.0.0.1:"),
                    "{file}:{}: a redis-cli session outside a ```redis-cli example: {line}",
                    n + 1
                );
            }
        }
    }
}

/// The matcher itself: wildcards, `...` and normalisation.
#[test]
fn the_example_matcher_follows_its_format() {
    let lines = |text: &str| normalised(text.lines());
    assert!(lines_match(&lines("(integer) <n>"), &lines("(integer) 20")));
    assert!(!lines_match(&lines("(integer) <n>"), &lines("(integer) ")));
    assert!(!lines_match(&lines("(integer) 2"), &lines("(integer) 20")));
    assert!(lines_match(
        &lines("1)  1) \"id\"\n...\n   20) (integer) <age>"),
        &lines("1)  1) \"id\"\n    2) (integer) 7\n   20) (integer) 5321")
    ));
    assert!(lines_match(&lines("a\n...\nb"), &lines("a\nb")));
    assert!(!lines_match(&lines("a\n...\nb"), &lines("a\nc")));
    assert!(lines_match(
        &lines("\"127.0.0.1:<port>\""),
        &lines("\"127.0.0.1:50344\"")
    ));
    assert!(lines_match(&lines("\"<filter>x\""), &lines("\"abx\"")));
    assert!(lines_match(&lines("\"a <B> c\""), &lines("\"a <B> c\"")));
    assert_eq!(
        split_words(r#"CONFIG SET maxage.rules "name:web-*=0 user:x=1" 'a b' c\n"#),
        vec![
            b"CONFIG".to_vec(),
            b"SET".to_vec(),
            b"maxage.rules".to_vec(),
            b"name:web-*=0 user:x=1".to_vec(),
            b"a b".to_vec(),
            b"c\\n".to_vec()
        ]
    );
    let nested = Reply::Array(Some(vec![
        Reply::Array(Some(vec![Reply::Bulk(Some(b"id".to_vec())), Reply::Int(7)])),
        Reply::Bulk(None),
    ]));
    assert_eq!(
        format_reply(&[b"X".to_vec()], &nested),
        "1) 1) \"id\"\n   2) (integer) 7\n2) (nil)\n"
    );
}
