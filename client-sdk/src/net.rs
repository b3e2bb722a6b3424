//! Base URL handling and the byte stream under both transports (TCP, or TLS
//! over TCP with the `tls` feature).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::error::Error;

/// A parsed `http(s)://host[:port][/prefix]` base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseUrl {
    pub(crate) tls: bool,
    /// Host as written (brackets kept for IPv6 literals).
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path prefix without a trailing slash (`""` for none).
    pub(crate) prefix: String,
}

impl BaseUrl {
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &'static str| Error::InvalidUrl {
            url: url.to_owned(),
            reason: why,
        };
        let (tls, rest) = if let Some(r) = strip_prefix_ci(url, "https://") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(url, "http://") {
            (false, r)
        } else if let Some(r) = strip_prefix_ci(url, "wss://") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(url, "ws://") {
            (false, r)
        } else {
            return Err(bad("the scheme must be http:// or https://"));
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(bad("a base URL takes no query or fragment"));
        }
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not supported; use a token"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(end) = authority.strip_prefix('[').and_then(|a| a.find(']'))
        {
            // [v6]:port
            let host = &authority[..end + 2];
            match &authority[end + 2..] {
                "" => (host, default_port),
                p => (
                    host,
                    p.strip_prefix(':')
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(|| bad("bad port"))?,
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad("bad port"))?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }

    /// `host:port` for the `Host` header (port left out when it is the default).
    pub(crate) fn host_header(&self) -> String {
        if self.port == if self.tls { 443 } else { 80 } {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The WebSocket URL of the gateway: `ws(s)://host:port/prefix/ws`.
    pub(crate) fn ws_url(&self) -> String {
        format!(
            "{}://{}{}/ws",
            if self.tls { "wss" } else { "ws" },
            self.host_header(),
            self.prefix
        )
    }

    /// The host name without IPv6 brackets (for DNS and TLS).
    fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix))
    .then(|| &s[prefix.len()..])
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved
/// characters), so `+`, `=`, `/`, `:` and `@` in channel names survive
/// form decoding on the server.
pub(crate) fn push_query_value(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

/// The connection under a transport.
pub(crate) enum NetStream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl NetStream {
    /// Connects to the base URL's host (TLS when `https`). `recv_buffer` sets
    /// `SO_RCVBUF` before connecting; `bind` is the local address to connect
    /// from (addresses of the other family are skipped).
    pub(crate) async fn connect(
        base: &BaseUrl,
        recv_buffer: Option<u32>,
        bind: Option<std::net::IpAddr>,
    ) -> io::Result<Self> {
        let mut last_err = None;
        let mut tcp = None;
        for addr in tokio::net::lookup_host((base.bare_host(), base.port)).await? {
            if bind.is_some_and(|b| b.is_ipv4() != addr.is_ipv4()) {
                last_err.get_or_insert_with(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("bind address family does not match {addr}"),
                    )
                });
                continue;
            }
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(size) = recv_buffer {
                socket.set_recv_buffer_size(size)?;
            }
            if let Some(ip) = bind {
                socket.bind(std::net::SocketAddr::new(ip, 0))?;
            }
            match socket.connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let tcp = match tcp {
            Some(t) => t,
            None => {
                return Err(last_err.unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{} did not resolve", base.host),
                    )
                }))
            }
        };
        tcp.set_nodelay(true)?;
        if base.tls {
            return Self::tls(base, tcp).await;
        }
        Ok(Self::Plain(tcp))
    }

    #[cfg(feature = "tls")]
    async fn tls(base: &BaseUrl, tcp: TcpStream) -> io::Result<Self> {
        use std::sync::{Arc, OnceLock};
        use tokio_rustls::rustls;

        static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
        let config = CONFIG
            .get_or_init(|| {
                let roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map(|b| b.with_root_certificates(roots).with_no_client_auth());
                match config {
                    Ok(c) => Arc::new(c),
                    // The ring provider supports the default versions; this
                    // arm only keeps the code free of panics.
                    Err(_) => Arc::new(
                        rustls::ClientConfig::builder()
                            .with_root_certificates(rustls::RootCertStore::empty())
                            .with_no_client_auth(),
                    ),
                }
            })
            .clone();
        let name = rustls::pki_types::ServerName::try_from(base.bare_host().to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        Ok(Self::Tls(Box::new(stream)))
    }

    #[cfg(not(feature = "tls"))]
    async fn tls(_base: &BaseUrl, _tcp: TcpStream) -> io::Result<Self> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "https:// needs the client-sdk `tls` feature",
        ))
    }

    /// Makes the next close abrupt (RST instead of FIN), for tests.
    pub(crate) fn set_abortive_close(&self) {
        let tcp = match self {
            Self::Plain(s) => s,
            #[cfg(feature = "tls")]
            Self::Tls(s) => s.get_ref().0,
        };
        let _ = tcp.set_zero_linger();
    }
}

impl AsyncRead for NetStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for NetStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_base_urls() {
        let u = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.prefix.as_str()),
            (false, "127.0.0.1", 8080, "")
        );
        assert_eq!(u.ws_url(), "ws://127.0.0.1:8080/ws");
        let u = BaseUrl::parse("HTTPS://gw.example.com/rt/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.prefix.as_str()),
            (true, "gw.example.com", 443, "/rt")
        );
        assert_eq!(u.ws_url(), "wss://gw.example.com/rt/ws");
        let u = BaseUrl::parse("http://[::1]:9000/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.bare_host()),
            ("[::1]", 9000, "::1")
        );
        assert_eq!(u.host_header(), "[::1]:9000");
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("http://:80").is_err());
        assert!(BaseUrl::parse("http://h:notaport").is_err());
        assert!(BaseUrl::parse("http://h/x?y=1").is_err());
    }

    #[tokio::test]
    async fn connects_from_the_bind_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let base = BaseUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let src: std::net::IpAddr = "127.0.0.3".parse().unwrap();
        let _stream = NetStream::connect(&base, None, Some(src)).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), src);
        // An address of the other family cannot reach an IPv4 host.
        let v6: std::net::IpAddr = "::1".parse().unwrap();
        assert!(NetStream::connect(&base, None, Some(v6)).await.is_err());
    }

    #[test]
    fn encodes_query_values() {
        let mut s = String::new();
        push_query_value(&mut s, "chat:room-1/a.b@c=d+e_f ~$");
        assert_eq!(s, "chat%3Aroom-1%2Fa.b%40c%3Dd%2Be_f%20~%24");
    }
}
