//! rtpengine's "ng" control protocol framing: `<cookie> <bencoded dictionary>` over UDP.
//!
//! A small bencode codec of our own: dictionaries keep arrival order (rtpengine and
//! Kamailio do not sort keys), nesting depth and string lengths are bounded before any
//! allocation, and trailing bytes after the top-level value are an error.

use std::fmt;

/// Deepest nesting accepted; real ng messages use two or three levels.
pub const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bencode {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<Bencode>),
    /// Key/value pairs in the order they arrived.
    Dict(Vec<(Vec<u8>, Bencode)>),
}

/// Longest cookie accepted (rtpengine's and Kamailio's are a few dozen bytes). A longer
/// one is not ng: dropped, and never cached.
pub const MAX_COOKIE: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NgError {
    #[error("no cookie")]
    NoCookie,
    #[error("cookie longer than 256 bytes")]
    CookieTooLong,
    #[error("truncated bencode")]
    Truncated,
    #[error("malformed bencode")]
    Malformed,
    #[error("bencode nested too deeply")]
    TooDeep,
    #[error("trailing bytes after bencode value")]
    Trailing,
}

impl Bencode {
    pub fn get(&self, key: &str) -> Option<&Bencode> {
        match self {
            Bencode::Dict(d) => d.iter().find(|(k, _)| k == key.as_bytes()).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Bencode::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    pub fn str(s: &str) -> Bencode {
        Bencode::Bytes(s.as_bytes().to_vec())
    }

    pub fn dict(pairs: Vec<(&str, Bencode)>) -> Bencode {
        Bencode::Dict(pairs.into_iter().map(|(k, v)| (k.as_bytes().to_vec(), v)).collect())
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Bencode::Int(i) => out.extend_from_slice(format!("i{i}e").as_bytes()),
            Bencode::Bytes(b) => {
                out.extend_from_slice(format!("{}:", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
            Bencode::List(l) => {
                out.push(b'l');
                for v in l {
                    v.encode(out);
                }
                out.push(b'e');
            }
            Bencode::Dict(d) => {
                out.push(b'd');
                for (k, v) in d {
                    out.extend_from_slice(format!("{}:", k.len()).as_bytes());
                    out.extend_from_slice(k);
                    v.encode(out);
                }
                out.push(b'e');
            }
        }
    }

    /// Decodes one value at the start of `input` and says how many bytes it took; for
    /// streams (ng over TCP), where `Truncated` means "wait for more".
    pub fn decode_prefix(input: &[u8]) -> Result<(Bencode, usize), NgError> {
        let (v, rest) = decode_value(input, 0)?;
        Ok((v, input.len() - rest.len()))
    }

    /// Decodes exactly one value; anything after it is an error.
    pub fn decode(input: &[u8]) -> Result<Bencode, NgError> {
        let (v, rest) = decode_value(input, 0)?;
        if rest.is_empty() {
            Ok(v)
        } else {
            Err(NgError::Trailing)
        }
    }
}

fn decode_value(i: &[u8], depth: usize) -> Result<(Bencode, &[u8]), NgError> {
    if depth > MAX_DEPTH {
        return Err(NgError::TooDeep);
    }
    match i.first() {
        None => Err(NgError::Truncated),
        Some(b'i') => {
            let end = i.iter().position(|&b| b == b'e').ok_or(NgError::Truncated)?;
            let s = std::str::from_utf8(&i[1..end]).map_err(|_| NgError::Malformed)?;
            let n = s.parse::<i64>().map_err(|_| NgError::Malformed)?;
            Ok((Bencode::Int(n), &i[end + 1..]))
        }
        Some(b'l') => {
            let mut rest = &i[1..];
            let mut items = Vec::new();
            loop {
                match rest.first() {
                    None => return Err(NgError::Truncated),
                    Some(b'e') => return Ok((Bencode::List(items), &rest[1..])),
                    _ => {
                        let (v, r) = decode_value(rest, depth + 1)?;
                        items.push(v);
                        rest = r;
                    }
                }
            }
        }
        Some(b'd') => {
            let mut rest = &i[1..];
            let mut items = Vec::new();
            loop {
                match rest.first() {
                    None => return Err(NgError::Truncated),
                    Some(b'e') => return Ok((Bencode::Dict(items), &rest[1..])),
                    _ => {
                        let (k, r) = decode_bytes(rest)?;
                        let (v, r) = decode_value(r, depth + 1)?;
                        items.push((k, v));
                        rest = r;
                    }
                }
            }
        }
        Some(b'0'..=b'9') => {
            let (b, r) = decode_bytes(i)?;
            Ok((Bencode::Bytes(b), r))
        }
        Some(_) => Err(NgError::Malformed),
    }
}

fn decode_bytes(i: &[u8]) -> Result<(Vec<u8>, &[u8]), NgError> {
    let colon = i.iter().take(20).position(|&b| b == b':').ok_or(if i.len() < 20 {
        NgError::Truncated
    } else {
        NgError::Malformed
    })?;
    let len: usize = std::str::from_utf8(&i[..colon]).ok().and_then(|s| s.parse().ok()).ok_or(NgError::Malformed)?;
    let start = colon + 1;
    // The length is checked against what is there before anything is allocated.
    let end = start.checked_add(len).ok_or(NgError::Malformed)?;
    if end > i.len() {
        return Err(NgError::Truncated);
    }
    Ok((i[start..end].to_vec(), &i[end..]))
}

/// Converts a JSON message (ng also accepts JSON dictionaries) to the same tree.
pub fn from_json(v: &serde_json::Value) -> Bencode {
    use serde_json::Value;
    match v {
        Value::Null => Bencode::Bytes(Vec::new()),
        Value::Bool(b) => Bencode::Int(i64::from(*b)),
        Value::Number(n) => Bencode::Int(n.as_i64().unwrap_or(0)),
        Value::String(s) => Bencode::Bytes(s.as_bytes().to_vec()),
        Value::Array(a) => Bencode::List(a.iter().map(from_json).collect()),
        Value::Object(o) => Bencode::Dict(o.iter().map(|(k, v)| (k.as_bytes().to_vec(), from_json(v))).collect()),
    }
}

/// The reply to a JSON request, as JSON.
pub fn to_json(b: &Bencode) -> serde_json::Value {
    use serde_json::Value;
    match b {
        Bencode::Int(i) => Value::from(*i),
        Bencode::Bytes(s) => Value::String(String::from_utf8_lossy(s).into_owned()),
        Bencode::List(l) => Value::Array(l.iter().map(to_json).collect()),
        Bencode::Dict(d) => {
            Value::Object(d.iter().map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), to_json(v))).collect())
        }
    }
}

/// Splits `<cookie> <payload>`.
pub fn split_cookie(msg: &[u8]) -> Result<(&[u8], &[u8]), NgError> {
    let sp = match msg.iter().take(MAX_COOKIE + 1).position(|&b| b == b' ') {
        Some(sp) => sp,
        None if msg.len() > MAX_COOKIE => return Err(NgError::CookieTooLong),
        None => return Err(NgError::NoCookie),
    };
    if sp == 0 {
        return Err(NgError::NoCookie);
    }
    Ok((&msg[..sp], &msg[sp + 1..]))
}

impl fmt::Display for Bencode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        self.encode(&mut out);
        f.write_str(&String::from_utf8_lossy(&out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtpengine_replies_round_trip_byte_for_byte() {
        for wire in [
            &b"d6:result4:ponge"[..],
            b"d6:result5:error12:error-reason22:No SDP body in messagee",
            b"d7:warning38:Call-ID not found or tags didn't match6:result2:oke",
        ] {
            let v = Bencode::decode(wire).expect("decodes");
            let mut out = Vec::new();
            v.encode(&mut out);
            assert_eq!(out, wire);
        }
    }

    #[test]
    fn json_messages_map_to_the_same_tree() {
        let j: serde_json::Value =
            serde_json::from_str(r#"{"command":"offer","flags":["trust-address"],"n":3}"#).expect("json");
        let b = from_json(&j);
        assert_eq!(b.get("command").and_then(Bencode::as_str), Some("offer"));
        assert_eq!(b.get("flags"), Some(&Bencode::List(vec![Bencode::str("trust-address")])));
        assert_eq!(to_json(&b), j);
    }

    #[test]
    fn stream_decoding_reports_what_it_consumed() {
        assert_eq!(Bencode::decode_prefix(b"d1:ai1eed1:b"), Ok((Bencode::dict(vec![("a", Bencode::Int(1))]), 8)));
        assert_eq!(Bencode::decode_prefix(b"d1:ai1"), Err(NgError::Truncated));
    }

    #[test]
    fn unsorted_keys_keep_their_order() {
        let v = Bencode::decode(b"d7:command5:offer7:call-id2:c13:sdp3:v=0e").expect("decodes");
        assert_eq!(v.get("command").and_then(Bencode::as_str), Some("offer"));
        assert_eq!(v.get("sdp").and_then(Bencode::as_str), Some("v=0"));
    }

    #[test]
    fn hostile_input_is_refused_without_allocating_or_recursing() {
        assert_eq!(Bencode::decode(b"d3:abc"), Err(NgError::Truncated));
        assert_eq!(Bencode::decode(b"99999999999999:x"), Err(NgError::Truncated));
        assert_eq!(Bencode::decode(b"999999999999999999999999:x"), Err(NgError::Malformed));
        assert_eq!(Bencode::decode(&[b'l'; 10_000]), Err(NgError::TooDeep));
        assert_eq!(Bencode::decode(b"de trailing"), Err(NgError::Trailing));
        assert_eq!(Bencode::decode(b"ixe"), Err(NgError::Malformed));
        assert_eq!(split_cookie(b"d7:command4:pinge"), Err(NgError::NoCookie));
        assert_eq!(split_cookie(b"abc d7:command4:pinge").map(|(c, _)| c), Ok(&b"abc"[..]));
        let long = [vec![b'x'; MAX_COOKIE + 1], b" d7:command4:pinge".to_vec()].concat();
        assert_eq!(split_cookie(&long), Err(NgError::CookieTooLong));
        let longest = [vec![b'x'; MAX_COOKIE], b" d7:command4:pinge".to_vec()].concat();
        assert!(split_cookie(&longest).is_ok());
    }
}
