//! Cheap passes over encoded bytes that do not build the value: the nesting
//! depth of a document (checked before decoding an input, so every codec has
//! the same limit, [`crate::MAX_DEPTH`]), and the head of a `message` frame
//! that does not decode (its channel and position, so a client can report it
//! and move past it). Both work at any depth: nothing here recurses.

/// What can be read of a `message` frame that does not decode as a whole
/// ([`crate::Codec::peek_message`]): enough for a client to report it and to count
/// it as received, so that the next message is not taken for a gap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageHead {
    pub channel: Option<String>,
    pub seq: Option<u64>,
    pub epoch: Option<String>,
}

// ---- JSON --------------------------------------------------------------------

/// Index just after the string whose opening quote is at `start - 1`
/// (`len` if it does not end).
fn json_string_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// Whether arrays and objects nest deeper than `limit` levels. Malformed text
/// is left to the decoder (this only counts brackets outside strings).
pub(crate) fn json_too_deep(b: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = json_string_end(b, i + 1);
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// Which head field a key names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Type,
    Channel,
    Seq,
    Epoch,
    Other,
}

fn field(key: &str) -> Field {
    match key {
        "type" => Field::Type,
        "channel" => Field::Channel,
        "seq" => Field::Seq,
        "epoch" => Field::Epoch,
        _ => Field::Other,
    }
}

fn set_str(head: &mut Head, f: Field, s: String) {
    match f {
        Field::Type => head.ty = Some(s),
        Field::Channel => head.channel = Some(s),
        Field::Epoch => head.epoch = Some(s),
        Field::Seq | Field::Other => {}
    }
}

#[derive(Default)]
struct Head {
    ty: Option<String>,
    channel: Option<String>,
    seq: Option<u64>,
    epoch: Option<String>,
}

impl Head {
    fn into_message_head(self) -> Option<MessageHead> {
        (self.ty.as_deref() == Some("message")).then_some(MessageHead {
            channel: self.channel,
            seq: self.seq,
            epoch: self.epoch,
        })
    }
}

/// The top-level `type`, `channel`, `seq` and `epoch` of a JSON object,
/// read without decoding (or even validating) the rest of it. The whole
/// object is scanned: a key given twice is read as its last value, as the
/// decoders read it (found by the fuzzer: stopping at the first complete
/// head disagreed with `decode_server`).
pub(crate) fn json_head(b: &[u8]) -> Option<MessageHead> {
    let mut head = Head::default();
    let mut depth = 0usize;
    let mut expect_key = false;
    let mut key: Option<Field> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if depth == 0 && !c.is_ascii_whitespace() && c != b'{' {
            return None; // not an object
        }
        match c {
            b'"' => {
                let end = json_string_end(b, i + 1);
                if depth == 1 {
                    let s = serde_json::from_slice::<String>(&b[i..end]).ok();
                    if expect_key {
                        expect_key = false;
                        key = s.as_deref().map(field);
                    } else if let (Some(f), Some(s)) = (key.take(), s) {
                        set_str(&mut head, f, s);
                    }
                }
                i = end;
                continue;
            }
            b'0'..=b'9' if depth == 1 => {
                let end = b[i..]
                    .iter()
                    .position(|c| !c.is_ascii_digit())
                    .map_or(b.len(), |n| i + n);
                if key.take() == Some(Field::Seq) {
                    head.seq = std::str::from_utf8(&b[i..end])
                        .ok()
                        .and_then(|s| s.parse().ok());
                }
                i = end;
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                key = None;
                expect_key = depth == 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    break;
                }
            }
            b'-' if depth == 1 => key = None, // a negative number: no `seq`
            b',' if depth == 1 => {
                expect_key = true;
                key = None;
            }
            _ => {}
        }
        i += 1;
    }
    head.into_message_head()
}

// ---- MessagePack -------------------------------------------------------------

/// One MessagePack item at `i`: the index after its own bytes (its header
/// and, for strings, binaries and extensions, its payload), how many values
/// it contains (array elements; map keys and values), and whether it is a
/// container. `None` when the bytes end early or the marker is invalid.
fn mp_item(b: &[u8], i: usize) -> Option<(usize, u64, bool)> {
    let m = *b.get(i)?;
    let be = |at: usize, n: usize| -> Option<u64> {
        let bytes = b.get(at..at + n)?;
        Some(bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    };
    // (header length, payload length, children, container)
    let (header, payload, children, container) = match m {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, 0, 0, false),
        0x80..=0x8f => (1, 0, 2 * u64::from(m & 0x0f), true),
        0x90..=0x9f => (1, 0, u64::from(m & 0x0f), true),
        0xa0..=0xbf => (1, u64::from(m & 0x1f), 0, false),
        0xc4 | 0xd9 => (2, be(i + 1, 1)?, 0, false),
        0xc5 | 0xda => (3, be(i + 1, 2)?, 0, false),
        0xc6 | 0xdb => (5, be(i + 1, 4)?, 0, false),
        0xc7 => (3, be(i + 1, 1)?, 0, false),
        0xc8 => (4, be(i + 1, 2)?, 0, false),
        0xc9 => (6, be(i + 1, 4)?, 0, false),
        0xca => (5, 0, 0, false),
        0xcb => (9, 0, 0, false),
        0xcc | 0xd0 => (2, 0, 0, false),
        0xcd | 0xd1 => (3, 0, 0, false),
        0xce | 0xd2 => (5, 0, 0, false),
        0xcf | 0xd3 => (9, 0, 0, false),
        0xd4 => (3, 0, 0, false),
        0xd5 => (4, 0, 0, false),
        0xd6 => (6, 0, 0, false),
        0xd7 => (10, 0, 0, false),
        0xd8 => (18, 0, 0, false),
        0xdc => (3, 0, be(i + 1, 2)?, true),
        0xdd => (5, 0, be(i + 1, 4)?, true),
        0xde => (3, 0, 2 * be(i + 1, 2)?, true),
        0xdf => (5, 0, 2 * be(i + 1, 4)?, true),
        0xc1 => return None,
    };
    let end = i
        .checked_add(header)?
        .checked_add(usize::try_from(payload).ok()?)?;
    (end <= b.len()).then_some((end, children, container))
}

/// Whether arrays and maps nest deeper than `limit` levels. Malformed input
/// is left to the decoder.
pub(crate) fn msgpack_too_deep(b: &[u8], limit: usize) -> bool {
    // Values still to read in each open container; at most `limit` of them.
    let mut open: Vec<u64> = Vec::new();
    let mut i = 0;
    loop {
        while open.last() == Some(&0) {
            open.pop();
        }
        let Some((next, children, container)) = mp_item(b, i) else {
            return false;
        };
        i = next;
        if let Some(left) = open.last_mut() {
            *left -= 1;
        }
        if container {
            if open.len() >= limit {
                return true;
            }
            open.push(children);
        }
        if open.iter().all(|&n| n == 0) {
            return false; // the top-level value is complete
        }
    }
}

/// Index after the value at `i` (its contents included), at any depth.
fn mp_skip(b: &[u8], mut i: usize) -> Option<usize> {
    let mut pending: u64 = 1;
    while pending > 0 {
        let (next, children, _) = mp_item(b, i)?;
        i = next;
        pending = pending - 1 + children;
    }
    Some(i)
}

fn mp_str(b: &[u8], i: usize) -> Option<String> {
    let (end, _, _) = mp_item(b, i)?;
    let start = match b[i] {
        0xa0..=0xbf => i + 1,
        0xd9 => i + 2,
        0xda => i + 3,
        0xdb => i + 5,
        _ => return None,
    };
    std::str::from_utf8(&b[start..end]).ok().map(str::to_owned)
}

fn mp_uint(b: &[u8], i: usize) -> Option<u64> {
    let (end, _, _) = mp_item(b, i)?;
    let m = b[i];
    if m <= 0x7f {
        return Some(u64::from(m));
    }
    let bytes = &b[i + 1..end];
    let n = bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    match m {
        0xcc..=0xcf => Some(n),
        // A signed encoding of a non-negative number.
        0xd0..=0xd3 if bytes.first().is_some_and(|&x| x < 0x80) => Some(n),
        _ => None,
    }
}

/// The top-level `type`, `channel`, `seq` and `epoch` of a MessagePack map,
/// read without decoding the rest of it; a key given twice is read as its
/// last value, as the decoders read it.
pub(crate) fn msgpack_head(b: &[u8]) -> Option<MessageHead> {
    let (mut i, children, container) = mp_item(b, 0)?;
    if !container || !matches!(b[0], 0x80..=0x8f | 0xde | 0xdf) {
        return None;
    }
    let mut head = Head::default();
    for _ in 0..children / 2 {
        let key = mp_str(b, i).map_or(Field::Other, |k| field(&k));
        let Some(value) = mp_skip(b, i) else { break };
        i = value;
        match key {
            Field::Seq => head.seq = mp_uint(b, i),
            Field::Other => {}
            f => {
                if let Some(s) = mp_str(b, i) {
                    set_str(&mut head, f, s);
                }
            }
        }
        let Some(next) = mp_skip(b, i) else { break };
        i = next;
    }
    head.into_message_head()
}
