//! A minimal WebSocket client for the receiving side of the fan-out
//! benchmark: a hand-written upgrade, then server frames parsed in place from
//! one reusable buffer (no allocation per message), so one core can read
//! hundreds of thousands of messages per second.

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client frame (masked, as RFC 6455 requires of clients).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// One parsed server frame: its opcode and where its payload is in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameAt {
    pub opcode: u8,
    pub start: usize,
    pub end: usize,
}

/// Parses the frame at the start of `buf`; `None` if it is not complete yet.
/// Returns the frame and its total length.
pub fn parse_frame(buf: &[u8]) -> anyhow::Result<Option<(FrameAt, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (mut hdr, len) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (4, u64::from(u16::from_be_bytes([buf[2], buf[3]])))
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (10, u64::from_be_bytes(b))
        }
        n => (2, u64::from(n)),
    };
    if masked {
        bail!("the server sent a masked frame");
    }
    if len > 16 * 1024 * 1024 {
        bail!("frame of {len} bytes");
    }
    let len = len as usize;
    if buf.len() < hdr + len {
        return Ok(None);
    }
    let start = hdr;
    hdr += len;
    Ok(Some((
        FrameAt {
            opcode,
            start,
            end: hdr,
        },
        hdr,
    )))
}

/// The unsigned integer right after the first `key` in `s`.
pub fn int_after(s: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(s, key)? + key.len();
    digits(&s[at..])
}

/// [`int_after`] with a prepared searcher (for a hot loop).
pub fn int_after_with(s: &[u8], key: &memchr::memmem::Finder<'_>) -> Option<u64> {
    let at = key.find(s)? + key.needle().len();
    digits(&s[at..])
}

/// The JSON string (without escapes) right after a prepared searcher's
/// needle (which ends with the opening quote).
pub fn str_after_with<'a>(s: &'a [u8], key: &memchr::memmem::Finder<'_>) -> Option<&'a str> {
    let at = key.find(s)? + key.needle().len();
    let len = memchr::memchr(b'"', &s[at..])?;
    std::str::from_utf8(&s[at..at + len]).ok()
}

/// The unsigned integer right after the last occurrence of a prepared
/// searcher's needle in `s`.
pub fn int_after_last_with(s: &[u8], key: &memchr::memmem::FinderRev<'_>) -> Option<u64> {
    let at = key.rfind(s)? + key.needle().len();
    digits(&s[at..])
}

fn digits(s: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut any = false;
    for &b in s {
        if b.is_ascii_digit() {
            v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
            any = true;
        } else {
            break;
        }
    }
    any.then_some(v)
}

/// Reads more bytes into `buf[end..]` (unparsed bytes are `buf[start..end]`);
/// false at end of stream. Makes room first: moves the unparsed bytes to the
/// front when a quarter or less is free, and doubles a full buffer.
pub async fn fill_buf(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    start: &mut usize,
    end: &mut usize,
) -> anyhow::Result<bool> {
    if *start == *end {
        *start = 0;
        *end = 0;
    } else if buf.len() - *end < buf.len() / 4 {
        buf.copy_within(*start..*end, 0);
        *end -= *start;
        *start = 0;
        if *end == buf.len() {
            let n = buf.len();
            buf.resize(n * 2, 0);
        }
    }
    let n = stream.read(&mut buf[*end..]).await?;
    *end += n;
    Ok(n > 0)
}

/// A connected WebSocket: the stream and what was read past the last frame.
pub struct RawWs {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
    /// Unparsed bytes are `buf[start..end]`.
    pub start: usize,
    pub end: usize,
}

impl RawWs {
    /// Upgrades `stream` (`GET /ws`, no subprotocol: JSON).
    pub async fn handshake(
        mut stream: TcpStream,
        host: &str,
        buf_size: usize,
    ) -> anyhow::Result<Self> {
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; buf_size.max(4096)];
        let mut end = 0;
        loop {
            let n = stream.read(&mut buf[end..]).await?;
            if n == 0 {
                bail!("closed during the upgrade");
            }
            end += n;
            if let Some(p) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
                if !buf.starts_with(b"HTTP/1.1 101") {
                    bail!("upgrade refused: {}", String::from_utf8_lossy(&buf[..p]));
                }
                // The accept key for this fixed nonce (RFC 6455 example).
                if !buf[..p]
                    .windows(28)
                    .any(|w| w == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                {
                    bail!("bad Sec-WebSocket-Accept");
                }
                return Ok(Self {
                    stream,
                    buf,
                    start: p + 4,
                    end,
                });
            }
            if end == buf.len() {
                bail!("upgrade response too long");
            }
        }
    }

    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.stream
            .write_all(&client_frame(1, text.as_bytes()))
            .await?;
        Ok(())
    }

    /// Reads more bytes; false at end of stream. Makes room first.
    pub async fn fill(&mut self) -> anyhow::Result<bool> {
        fill_buf(
            &mut self.stream,
            &mut self.buf,
            &mut self.start,
            &mut self.end,
        )
        .await
    }

    /// The next complete frame already in the buffer (consumed).
    pub fn next_frame(&mut self) -> anyhow::Result<Option<FrameAt>> {
        match parse_frame(&self.buf[self.start..self.end])? {
            None => Ok(None),
            Some((f, len)) => {
                let base = self.start;
                self.start += len;
                Ok(Some(FrameAt {
                    opcode: f.opcode,
                    start: base + f.start,
                    end: base + f.end,
                }))
            }
        }
    }

    /// Reads until a text frame containing `"type":"<kind>"` arrives and
    /// returns it; an `error` frame or a close fails.
    pub async fn expect(&mut self, kind: &str) -> anyhow::Result<Vec<u8>> {
        let want = format!("\"type\":\"{kind}\"");
        loop {
            while let Some(f) = self.next_frame()? {
                let p = &self.buf[f.start..f.end];
                match f.opcode {
                    1 if p.windows(want.len()).any(|w| w == want.as_bytes()) => {
                        return Ok(p.to_vec())
                    }
                    1 if p.starts_with(br#"{"type":"error""#) => {
                        bail!("gateway answered: {}", String::from_utf8_lossy(p))
                    }
                    8 => bail!("closed by the gateway: {}", close_reason(p)),
                    _ => {}
                }
            }
            if !self.fill().await.context("reading")? {
                bail!("connection closed waiting for {kind}");
            }
        }
    }
}

/// A close frame's code and reason, readable.
pub fn close_reason(p: &[u8]) -> String {
    if p.len() >= 2 {
        format!(
            "{} {}",
            u16::from_be_bytes([p[0], p[1]]),
            String::from_utf8_lossy(&p[2..])
        )
    } else {
        "no code".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn parses_frames_of_every_length_form() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'x'; len];
            let f = server_frame(1, &payload);
            let (at, total) = parse_frame(&f).unwrap().unwrap();
            assert_eq!(total, f.len());
            assert_eq!(at.end - at.start, len);
            assert_eq!(at.opcode, 1);
            // Incomplete frames wait for more bytes.
            assert!(parse_frame(&f[..f.len() - 1]).unwrap().is_none() || len == 0);
        }
        assert!(parse_frame(&[0x81]).unwrap().is_none());
    }

    #[test]
    fn client_frames_are_masked() {
        let f = client_frame(1, b"hello");
        assert_eq!(f[0], 0x81);
        assert_eq!(f[1], 0x80 | 5);
        let mask = &f[2..6];
        let un: Vec<u8> = f[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(un, b"hello");
    }

    #[test]
    fn picks_seq_and_ts() {
        let m = br#"{"type":"message","channel":"c","seq":42,"epoch":"ab","data":{"n":1,"seq":7},"ts":1700000000123}"#;
        assert_eq!(int_after(m, b"\"seq\":"), Some(42));
        let epoch = memchr::memmem::Finder::new(b"\"epoch\":\"");
        assert_eq!(
            str_after_with(br#"{"seq":1,"epoch":"e7","ts":2}"#, &epoch),
            Some("e7")
        );
        assert_eq!(str_after_with(br#"{"seq":1}"#, &epoch), None);
        let ts = memchr::memmem::FinderRev::new(b"\"ts\":");
        assert_eq!(int_after_last_with(m, &ts), Some(1_700_000_000_123));
        let seq = memchr::memmem::Finder::new(b"\"seq\":");
        assert_eq!(int_after_with(m, &seq), Some(42));
        assert_eq!(int_after(m, b"\"nope\":"), None);
    }
}
