//! A minimal HTTP/1.1 `GET` and `text/event-stream` reader over one
//! connection: response head, chunked (or length / until-EOF) body, SSE
//! field parsing. Everything is decoded in place in reused buffers, and every
//! await point is cancel-safe (all state lives in [`SseReader`]).

use std::io;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::NetStream;

/// Longest response head or chunk-size line accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Longest error body read.
const MAX_ERROR_BODY: usize = 64 * 1024;

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// The parts of a response head the client uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) retry_after: Option<Duration>,
    chunked: bool,
    content_length: Option<u64>,
}

/// Parses `Retry-After` given in seconds (HTTP dates are not used by the gateway).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Where the response head in `raw` ends (just after its blank line), if
/// it has; an error once it is longer than [`MAX_HEAD`] without ending.
pub(crate) fn head_end(raw: &[u8]) -> io::Result<Option<usize>> {
    if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        return Ok(Some(i + 4));
    }
    if raw.len() > MAX_HEAD {
        return Err(bad("response head too long"));
    }
    Ok(None)
}

pub(crate) fn parse_head(bytes: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(bytes).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not an HTTP/1.x response"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut head = Head {
        status,
        ..Head::default()
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-type") {
            head.content_type = value.to_ascii_lowercase();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value
                .to_ascii_lowercase()
                .split(',')
                .any(|v| v.trim() == "chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("retry-after") {
            head.retry_after = parse_retry_after(value);
        }
    }
    Ok(head)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Body {
    Chunked(Chunk),
    Length(u64),
    UntilEof,
}

impl Body {
    pub(crate) fn of(head: &Head) -> Self {
        if head.chunked {
            Self::Chunked(Chunk::Size)
        } else if let Some(n) = head.content_length {
            Self::Length(n)
        } else {
            Self::UntilEof
        }
    }

    pub(crate) fn done(&self) -> bool {
        matches!(self, Self::Chunked(Chunk::Done) | Self::Length(0))
    }

    /// Moves decoded body bytes from `raw` to `out`.
    pub(crate) fn decode(&mut self, raw: &mut BytesMut, out: &mut BytesMut) -> io::Result<()> {
        loop {
            match self {
                Self::UntilEof => {
                    out.extend_from_slice(raw);
                    raw.clear();
                    return Ok(());
                }
                Self::Length(n) => {
                    let take = raw.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                    out.extend_from_slice(&raw[..take]);
                    raw.advance(take);
                    *n -= take as u64;
                    return Ok(());
                }
                Self::Chunked(state) => match *state {
                    Chunk::Done => return Ok(()),
                    Chunk::Size => {
                        let Some(nl) = raw.iter().position(|b| *b == b'\n') else {
                            if raw.len() > MAX_HEAD {
                                return Err(bad("chunk size line too long"));
                            }
                            return Ok(());
                        };
                        let line =
                            std::str::from_utf8(&raw[..nl]).map_err(|_| bad("bad chunk size"))?;
                        let hex = line
                            .trim_end_matches('\r')
                            .split(';')
                            .next()
                            .unwrap_or_default()
                            .trim();
                        let size =
                            u64::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))?;
                        raw.advance(nl + 1);
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(n) => {
                        if raw.is_empty() {
                            return Ok(());
                        }
                        let take = raw.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                        out.extend_from_slice(&raw[..take]);
                        raw.advance(take);
                        let left = n - take as u64;
                        *state = if left == 0 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left)
                        };
                    }
                    Chunk::DataEnd | Chunk::Trailers => {
                        let Some(nl) = raw.iter().position(|b| *b == b'\n') else {
                            if raw.len() > MAX_HEAD {
                                return Err(bad("chunk trailer too long"));
                            }
                            return Ok(());
                        };
                        let empty = raw[..nl].iter().all(|b| *b == b'\r');
                        raw.advance(nl + 1);
                        if *state == Chunk::DataEnd {
                            if !empty {
                                return Err(bad("missing CRLF after chunk data"));
                            }
                            *state = Chunk::Size;
                        } else if empty {
                            *state = Chunk::Done;
                        }
                    }
                },
            }
        }
    }
}

/// The named event types the gateway sends (anything else is `Other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// No `event:` field: a `message`.
    Message,
    Connected,
    Unrecoverable,
    TokenExpired,
    /// The node is draining (data: a `reconnect` frame).
    Reconnect,
    Other,
}

/// One dispatched event, borrowing the parser's buffers.
#[derive(Debug)]
pub(crate) struct Event<'a> {
    pub(crate) kind: EventKind,
    pub(crate) data: &'a [u8],
    /// The event's `id:` (empty if it had none).
    pub(crate) id: &'a str,
}

/// The SSE field parser (WHATWG "event stream interpretation").
#[derive(Debug, Default)]
pub(crate) struct Parser {
    data: Vec<u8>,
    has_data: bool,
    kind: Option<EventKind>,
    id: String,
    /// The last `retry:` value (milliseconds).
    pub(crate) retry_ms: Option<u64>,
    /// An event is complete and readable with [`Parser::event`]; its
    /// buffers are cleared on the next [`Parser::advance`].
    ready: bool,
}

impl Parser {
    /// Consumes lines of `text` until an event is complete (true; read it
    /// with [`Parser::event`]) or the text runs out (false).
    pub(crate) fn advance(&mut self, text: &mut BytesMut) -> bool {
        if self.ready {
            self.ready = false;
            self.data.clear();
            self.has_data = false;
            self.kind = None;
            self.id.clear();
        }
        loop {
            let Some(end) = text.iter().position(|b| *b == b'\n' || *b == b'\r') else {
                return false;
            };
            // A trailing \r may be the first half of \r\n: wait for more.
            if text[end] == b'\r' && end + 1 == text.len() {
                return false;
            }
            let skip = if text[end] == b'\r' && text.get(end + 1) == Some(&b'\n') {
                2
            } else {
                1
            };
            let line = text.split_to(end + skip);
            let line = &line[..end];
            if line.is_empty() {
                if self.has_data {
                    if self.data.last() == Some(&b'\n') {
                        self.data.pop();
                    }
                    self.ready = true;
                    return true;
                }
                self.kind = None;
                self.id.clear();
                continue;
            }
            if line[0] == b':' {
                continue; // comment (keep-alive)
            }
            let (field, value) = match line.iter().position(|b| *b == b':') {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (line, &b""[..]),
            };
            match field {
                b"data" => {
                    self.data.extend_from_slice(value);
                    self.data.push(b'\n');
                    self.has_data = true;
                }
                b"event" => {
                    self.kind = Some(match value {
                        b"message" => EventKind::Message,
                        b"connected" => EventKind::Connected,
                        b"unrecoverable" => EventKind::Unrecoverable,
                        b"token_expired" => EventKind::TokenExpired,
                        b"reconnect" => EventKind::Reconnect,
                        _ => EventKind::Other,
                    })
                }
                b"id" if !value.contains(&0) => {
                    self.id.clear();
                    self.id.push_str(&String::from_utf8_lossy(value));
                }
                b"retry" => {
                    if let Some(ms) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                        self.retry_ms = Some(ms);
                    }
                }
                _ => {} // unknown fields
            }
        }
    }

    /// Bytes of the event being read that [`Parser::advance`] holds.
    fn pending(&self) -> usize {
        self.data.len() + self.id.len()
    }

    /// The event completed by the last [`Parser::advance`] that returned true.
    pub(crate) fn event(&self) -> Event<'_> {
        Event {
            kind: self.kind.unwrap_or(EventKind::Message),
            data: &self.data,
            id: &self.id,
        }
    }
}

/// Decodes body bytes from `raw` (into `text`) and reads events from them:
/// true when an event is complete (read it from `parser`), false when more
/// bytes are needed. An event (or a line) that grows past `max_event` bytes
/// is an error: a stream must not make the client hold unbounded memory.
pub(crate) fn step(
    body: &mut Body,
    parser: &mut Parser,
    raw: &mut BytesMut,
    text: &mut BytesMut,
    max_event: usize,
) -> io::Result<bool> {
    body.decode(raw, text)?;
    if parser.advance(text) {
        return Ok(true);
    }
    if text.len().saturating_add(parser.pending()) > max_event {
        return Err(bad("an SSE event larger than max_message_size"));
    }
    Ok(false)
}

/// An open `GET /sse` response: its head, then its events.
pub(crate) struct SseReader {
    stream: NetStream,
    raw: BytesMut,
    text: BytesMut,
    body: Body,
    parser: Parser,
    /// Largest event accepted (the client's `max_message_size`).
    max_event: usize,
    eof: bool,
    /// When bytes last arrived (any: events, keep-alive comments).
    pub(crate) last_recv: Instant,
    pub(crate) head: Head,
}

impl SseReader {
    /// Sends the request and reads the response head.
    pub(crate) async fn open(
        mut stream: NetStream,
        request: &[u8],
        read_buffer: usize,
        max_event: usize,
    ) -> io::Result<Self> {
        stream.write_all(request).await?;
        stream.flush().await?;
        let mut raw = BytesMut::with_capacity(read_buffer.max(512));
        let head_end = loop {
            if let Some(end) = head_end(&raw)? {
                break end;
            }
            if raw.capacity() - raw.len() < 256 {
                raw.reserve(1024);
            }
            if stream.read_buf(&mut raw).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the response head",
                ));
            }
        };
        let head = parse_head(&raw[..head_end])?;
        raw.advance(head_end);
        let body = Body::of(&head);
        Ok(Self {
            stream,
            raw,
            text: BytesMut::new(),
            body,
            parser: Parser::default(),
            max_event,
            eof: false,
            last_recv: Instant::now(),
            head,
        })
    }

    /// Reads more bytes into `raw`; false at the end of the connection.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.raw.capacity() - self.raw.len() < 256 {
            self.raw.reserve(1024);
        }
        let n = self.stream.read_buf(&mut self.raw).await?;
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.last_recv = Instant::now();
        Ok(true)
    }

    /// The whole (error) body, at most [`MAX_ERROR_BODY`] bytes.
    pub(crate) async fn read_body(&mut self) -> io::Result<Vec<u8>> {
        let mut out = BytesMut::new();
        loop {
            self.body.decode(&mut self.raw, &mut out)?;
            if self.body.done() || out.len() >= MAX_ERROR_BODY || self.eof {
                break;
            }
            if !self.fill().await? {
                break;
            }
        }
        out.truncate(MAX_ERROR_BODY);
        Ok(out.to_vec())
    }

    /// The next event; `None` when the stream ended. Cancel-safe.
    pub(crate) async fn next_event(&mut self) -> io::Result<Option<Event<'_>>> {
        loop {
            let (body, parser) = (&mut self.body, &mut self.parser);
            if step(body, parser, &mut self.raw, &mut self.text, self.max_event)? {
                return Ok(Some(self.parser.event()));
            }
            if self.body.done() || self.eof {
                return Ok(None);
            }
            self.fill().await?;
        }
    }

    /// Makes the next close abrupt (RST), for tests.
    pub(crate) fn set_abortive_close(&self) {
        self.stream.set_abortive_close();
    }

    /// The last `retry:` the server sent, if any.
    pub(crate) fn retry(&self) -> Option<Duration> {
        self.parser.retry_ms.map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(parser: &mut Parser, text: &mut BytesMut) -> Vec<(EventKind, String, String)> {
        let mut out = Vec::new();
        while parser.advance(text) {
            let e = parser.event();
            out.push((
                e.kind,
                String::from_utf8_lossy(e.data).into_owned(),
                e.id.to_owned(),
            ));
        }
        out
    }

    #[test]
    fn parses_fields_comments_and_split_lines() {
        let mut p = Parser::default();
        let mut text = BytesMut::from(
            &b"retry: 2000\n\nevent: connected\nid: v1.a.b-1\ndata: {\"x\":1}\n\n: ka\n\nid: v1.a.b-2\r\ndata: one\r\ndata:two\r\n\r\nevent: unrecoverable\ndata: u\n\nevent: token_expired\ndata: t\n\ndata: par"[..],
        );
        let got = events(&mut p, &mut text);
        assert_eq!(p.retry_ms, Some(2000));
        assert_eq!(
            got,
            vec![
                (EventKind::Connected, "{\"x\":1}".into(), "v1.a.b-1".into()),
                (EventKind::Message, "one\ntwo".into(), "v1.a.b-2".into()),
                (EventKind::Unrecoverable, "u".into(), String::new()),
                (EventKind::TokenExpired, "t".into(), String::new()),
            ]
        );
        // The rest of a line arrives later.
        text.extend_from_slice(b"tial\r");
        assert!(events(&mut p, &mut text).is_empty());
        text.extend_from_slice(b"\n\r\n");
        assert_eq!(
            events(&mut p, &mut text),
            vec![(EventKind::Message, "partial".into(), String::new())]
        );
    }

    #[test]
    fn decodes_chunked_bodies_split_anywhere() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 0..wire.len() {
            let mut body = Body::Chunked(Chunk::Size);
            let mut raw = BytesMut::new();
            let mut out = BytesMut::new();
            raw.extend_from_slice(&wire[..split]);
            body.decode(&mut raw, &mut out).unwrap();
            raw.extend_from_slice(&wire[split..]);
            body.decode(&mut raw, &mut out).unwrap();
            assert_eq!(&out[..], b"hello, world", "split at {split}");
            assert!(body.done(), "split at {split}");
        }
        let mut body = Body::Chunked(Chunk::Size);
        assert!(body
            .decode(&mut BytesMut::from(&b"zz\r\n"[..]), &mut BytesMut::new())
            .is_err());
    }

    /// The bounded-read property of the fuzz target `sdk_sse_stream`: an
    /// event that never ends (one endless line, or `data:` lines with no
    /// blank line) grew the reader's buffers without bound; now it stops at
    /// `max_event`.
    #[test]
    fn an_event_larger_than_the_limit_is_an_error() {
        for piece in [&b"data: xxxxxxxx\n"[..], &b"xxxxxxxxxxxxxxx"[..]] {
            let (mut body, mut parser) = (Body::UntilEof, Parser::default());
            let (mut raw, mut text) = (BytesMut::new(), BytesMut::new());
            raw.extend_from_slice(b"data: ");
            let mut fed = 0;
            let err = loop {
                match step(&mut body, &mut parser, &mut raw, &mut text, 1024) {
                    Ok(ready) => assert!(!ready),
                    Err(e) => break e,
                }
                raw.extend_from_slice(piece);
                fed += piece.len();
                assert!(fed < 2048, "not refused");
            };
            assert!(err.to_string().contains("max_message_size"), "{err}");
        }
        // Below the limit: read.
        let (mut body, mut parser) = (Body::UntilEof, Parser::default());
        let mut raw = BytesMut::from(&b"data: short\n\n"[..]);
        let mut text = BytesMut::new();
        assert!(step(&mut body, &mut parser, &mut raw, &mut text, 1024).unwrap());
        assert_eq!(parser.event().data, b"short");
    }

    #[test]
    fn parses_heads() {
        let h = parse_head(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nRetry-After: 3\r\ncontent-length: 10\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.status, 503);
        assert_eq!(h.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(Body::of(&h), Body::Length(10));
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        assert_eq!(
            (h.status, h.content_type.as_str()),
            (200, "text/event-stream")
        );
        assert_eq!(Body::of(&h), Body::Chunked(Chunk::Size));
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
        assert_eq!(parse_retry_after(" 12 "), Some(Duration::from_secs(12)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
