//! A minimal SSE client for the receiving side of the fan-out benchmark, the
//! counterpart of [`crate::rawws`]: a raw `GET /sse`, then events cut out of
//! one reusable buffer in place (the gateway's stream is not chunked: the
//! body ends with the connection), handing back each event's `data:` line.

use anyhow::{bail, Context};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::rawws;

/// A connected SSE stream: the socket and what was read past the last event.
pub struct RawSse {
    pub stream: TcpStream,
    pub rb: SseBuf,
}

/// Received bytes; unparsed ones are `buf[start..end]`.
pub struct SseBuf {
    pub buf: Vec<u8>,
    pub start: usize,
    pub end: usize,
}

impl RawSse {
    /// `GET /sse?<query>`; reads up to the `connected` event and returns its
    /// `id:` (the stream's first cursor).
    pub async fn open(
        mut stream: TcpStream,
        host: &str,
        query: &str,
        buf_size: usize,
    ) -> anyhow::Result<(Self, String)> {
        let req = format!(
            "GET /sse?{query} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut s = Self {
            stream,
            rb: SseBuf {
                buf: vec![0u8; buf_size.max(4096)],
                start: 0,
                end: 0,
            },
        };
        loop {
            if !s.fill().await.context("reading the response head")? {
                bail!("closed before the response head");
            }
            let unread = &s.rb.buf[..s.rb.end];
            if let Some(p) = memchr::memmem::find(unread, b"\r\n\r\n") {
                if !unread.starts_with(b"HTTP/1.1 200") {
                    bail!(
                        "gateway answered: {}",
                        String::from_utf8_lossy(&unread[..p])
                    );
                }
                s.rb.start = p + 4;
                break;
            }
            if s.rb.end == s.rb.buf.len() {
                bail!("response head too long");
            }
        }
        loop {
            while let Some(event) = s.rb.next_event() {
                let e = &s.rb.buf[event.0..event.1];
                if e.starts_with(b"event: connected\n")
                    || memchr::memmem::find(e, b"\nevent: connected\n").is_some()
                {
                    let id = line_value(e, b"id: ").context("connected event without id")?;
                    let id = String::from_utf8_lossy(id).into_owned();
                    return Ok((s, id));
                }
            }
            if !s.fill().await.context("reading")? {
                bail!("closed before the connected event");
            }
        }
    }

    /// Reads more bytes; false at end of stream.
    pub async fn fill(&mut self) -> anyhow::Result<bool> {
        let rb = &mut self.rb;
        rawws::fill_buf(&mut self.stream, &mut rb.buf, &mut rb.start, &mut rb.end).await
    }
}

impl SseBuf {
    /// The next complete event in the buffer (consumed): its byte range,
    /// without the blank line that ends it.
    fn next_event(&mut self) -> Option<(usize, usize)> {
        let at = memchr::memmem::find(&self.buf[self.start..self.end], b"\n\n")?;
        let event = (self.start, self.start + at + 1);
        self.start += at + 2;
        Some(event)
    }

    /// The `data:` payload of the next complete event that has one
    /// (comments and `retry:` skipped): its byte range in `buf`.
    pub fn next_data(&mut self) -> Option<(usize, usize)> {
        loop {
            let (from, to) = self.next_event()?;
            let e = &self.buf[from..to];
            let at = if e.starts_with(b"data: ") {
                Some(0)
            } else {
                memchr::memmem::find(e, b"\ndata: ").map(|i| i + 1)
            };
            if let Some(at) = at {
                let start = from + at + b"data: ".len();
                let len = memchr::memchr(b'\n', &self.buf[start..to]).unwrap_or(to - start);
                return Some((start, start + len));
            }
        }
    }
}

/// The value of the first `<key>` line of an event (`key` includes `": "`).
fn line_value<'a>(event: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = if event.starts_with(key) {
        0
    } else {
        let mut nl = Vec::with_capacity(key.len() + 1);
        nl.push(b'\n');
        nl.extend_from_slice(key);
        memchr::memmem::find(event, &nl)? + 1
    } + key.len();
    let len = memchr::memchr(b'\n', &event[at..]).unwrap_or(event.len() - at);
    Some(&event[at..at + len])
}

/// The seqs of a cursor `v1.<hash>.<epoch>-<seq>...`, one per channel in
/// stream order (docs/PROTOCOL.md, "Cursor").
pub fn cursor_seqs(cursor: &str) -> anyhow::Result<Vec<u64>> {
    let mut parts = cursor.split('.');
    if parts.next() != Some("v1") || parts.next().is_none() {
        bail!("not a v1 cursor: {cursor:?}");
    }
    parts
        .map(|p| {
            p.rsplit_once('-')
                .and_then(|(_, seq)| seq.parse().ok())
                .with_context(|| format!("bad position {p:?} in cursor {cursor:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_their_data_are_cut_out_in_place() {
        let text = b"retry: 2000\n\n: ka\n\nid: v1.x.e-1\ndata: {\"a\":1}\n\nevent: unrecoverable\nid: v1.x.e-2\ndata: {\"b\":2}\n\nid: v1.x.e-3\ndata: {\"c\"";
        let e = line_value(b"event: connected\nid: v1.ab.e-4\ndata: {}\n", b"id: ");
        assert_eq!(e, Some(&b"v1.ab.e-4"[..]));
        let mut rb = SseBuf {
            buf: text.to_vec(),
            start: 0,
            end: text.len(),
        };
        let mut data = Vec::new();
        while let Some((a, b)) = rb.next_data() {
            data.push(String::from_utf8_lossy(&rb.buf[a..b]).into_owned());
        }
        assert_eq!(data, [r#"{"a":1}"#, r#"{"b":2}"#]);
        // The incomplete last event waits for more bytes.
        assert_eq!(&rb.buf[rb.start..rb.end], b"id: v1.x.e-3\ndata: {\"c\"");
    }

    #[test]
    fn cursors_give_one_seq_per_channel() {
        assert_eq!(cursor_seqs("v1.fa8736ad.k3f9-42.Z1-7").unwrap(), [42, 7]);
        assert_eq!(cursor_seqs("v1.00000000.ref-0").unwrap(), [0]);
        assert!(cursor_seqs("v2.x.e-1").is_err());
        assert!(cursor_seqs("v1.x.e-").is_err());
    }
}
