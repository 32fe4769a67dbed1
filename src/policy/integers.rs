//! Integers as the server reads them from clients.

/// The server's `string2ll`: optional `-`, digits, no `+`, no leading zeros, no `-0`, fits i64.
pub fn parse_strict_i64(bytes: &[u8]) -> Option<i64> {
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    let negative = digits.len() != bytes.len();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if digits[0] == b'0' && (digits.len() > 1 || negative) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}
