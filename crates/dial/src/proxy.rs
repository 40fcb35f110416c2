//! HTTP proxies: which one a connection to the cloud goes through
//! (`https_proxy`/`HTTPS_PROXY`, `no_proxy`/`NO_PROXY`, read the way curl
//! and Azure IoT Edge read them) and the `CONNECT` exchange that turns a
//! connection to the proxy into a tunnel to the cloud.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use percent_encoding::percent_decode_str;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{DialError, authority};

/// Largest proxy answer to CONNECT read (status line and headers); a proxy
/// sending more is broken or hostile.
const MAX_ANSWER: usize = 16 * 1024;
/// Most headers in the proxy's answer.
const MAX_HEADERS: usize = 64;

/// A proxy URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("proxy URL {url:?}: {why}")]
pub struct ProxyError {
    /// The URL as given, credentials removed.
    pub url: String,
    /// Why.
    pub why: String,
}

/// An HTTP proxy reached with `CONNECT`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
}

// The password never appears in logs.
impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// `http://host:port` (without credentials), for logs and `verge check`.
impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

impl Proxy {
    /// Parses `http://[user:password@]host[:port]` (a URL without a scheme
    /// is taken as `http://`, as curl does). User and password are
    /// percent-decoded. `https://` proxies (TLS to the proxy itself) are not
    /// supported and say so.
    pub fn parse(url: &str) -> Result<Proxy, ProxyError> {
        let url = url.trim();
        let with_scheme = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        let err = |why: &str| ProxyError {
            url: redact(&with_scheme),
            why: why.to_owned(),
        };
        let parsed = url::Url::parse(&with_scheme).map_err(|e| err(&e.to_string()))?;
        if parsed.scheme() != "http" {
            return Err(err(
                "only http:// proxies are supported (the tunnel itself carries TLS)",
            ));
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err(err("no host")),
        };
        let port = parsed.port_or_known_default().unwrap_or(80);
        let credentials = if parsed.username().is_empty() {
            None
        } else {
            let decode = |s: &str| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| err("credentials are not UTF-8 once percent-decoded"))
            };
            Some((
                decode(parsed.username())?,
                decode(parsed.password().unwrap_or(""))?,
            ))
        };
        Ok(Proxy {
            host,
            port,
            credentials,
        })
    }

    /// The proxy to reach `target_host` through, from the process
    /// environment (see [`Proxy::from_vars`]).
    pub fn from_env(target_host: &str) -> Result<Option<Proxy>, ProxyError> {
        Self::from_vars(|name| std::env::var(name).ok(), target_host)
    }

    /// The proxy to reach `target_host` through: `https_proxy`, else
    /// `HTTPS_PROXY` (empty = unset), unless `no_proxy` (else `NO_PROXY`)
    /// lists the host. `var` looks a variable up (tests pass a map).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        target_host: &str,
    ) -> Result<Option<Proxy>, ProxyError> {
        let first = |names: [&str; 2]| {
            names
                .into_iter()
                .filter_map(&var)
                .find(|v| !v.trim().is_empty())
        };
        let Some(url) = first(["https_proxy", "HTTPS_PROXY"]) else {
            return Ok(None);
        };
        if let Some(no_proxy) = first(["no_proxy", "NO_PROXY"])
            && bypassed(&no_proxy, target_host)
        {
            return Ok(None);
        }
        Proxy::parse(&url).map(Some)
    }

    /// Whether the URL carried credentials.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// Opens a tunnel to `host:port` through the proxy: TCP to the proxy
    /// (bounded by `timeout`), then CONNECT and the proxy's answer (bounded
    /// by `timeout` again). The stream returned carries the target's bytes.
    pub async fn tunnel(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, DialError> {
        let proxy = self.to_string();
        let mut tcp =
            tokio::time::timeout(timeout, TcpStream::connect((self.host.as_str(), self.port)))
                .await
                .map_err(|_| DialError::Timeout {
                    step: "connecting to the proxy",
                    target: proxy.clone(),
                })?
                .map_err(|source| DialError::ProxyConnect {
                    proxy: proxy.clone(),
                    source,
                })?;
        let _ = tcp.set_nodelay(true);
        tokio::time::timeout(timeout, self.connect_exchange(&mut tcp, host, port))
            .await
            .map_err(|_| DialError::Timeout {
                step: "waiting for the proxy's answer to CONNECT",
                target: proxy,
            })??;
        Ok(tcp)
    }

    /// Sends CONNECT for `host:port` on `io` and reads the proxy's answer.
    /// Any 2xx opens the tunnel; 407 (401), 403 and 502–504 get errors of their
    /// own, so a wrong password or a proxy rule is told apart from a cloud
    /// that cannot be reached.
    pub async fn connect_exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        host: &str,
        port: u16,
    ) -> Result<(), DialError> {
        let proxy = self.to_string();
        let target = authority(host, port);
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some((user, password)) = &self.credentials {
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            req.push_str(&format!("Proxy-Authorization: Basic {basic}\r\n"));
        }
        req.push_str("\r\n");
        let io_err = |source| DialError::ProxyIo {
            proxy: proxy.clone(),
            source,
        };
        io.write_all(req.as_bytes()).await.map_err(io_err)?;
        io.flush().await.map_err(io_err)?;

        let protocol = |why: String| DialError::ProxyProtocol {
            proxy: proxy.clone(),
            why,
        };
        let mut buf = Vec::with_capacity(512);
        let (status, reason, len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut answer = httparse::Response::new(&mut headers);
            match answer.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = answer.code.unwrap_or(0);
                    break (status, answer.reason.unwrap_or("").to_owned(), len);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(protocol(format!("malformed answer to CONNECT: {e}"))),
            }
            if buf.len() >= MAX_ANSWER {
                return Err(protocol(format!(
                    "answer to CONNECT longer than {MAX_ANSWER} bytes"
                )));
            }
            // Read at most up to the cap, so a flood is cut off there.
            let mut chunk = [0u8; 1024];
            let room = (MAX_ANSWER - buf.len()).min(chunk.len());
            let n = io.read(&mut chunk[..room]).await.map_err(io_err)?;
            if n == 0 {
                return Err(protocol(
                    "closed the connection before answering CONNECT".into(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        match status {
            200..=299 => {
                // The TLS client speaks first, so nothing of the target's
                // can legitimately follow the answer yet.
                if buf.len() > len {
                    return Err(protocol("sent data after its answer to CONNECT".into()));
                }
                Ok(())
            }
            // 401 is not HTTP's proxy status, but tinyproxy answers a bad
            // BasicAuth with it.
            401 | 407 => Err(DialError::ProxyAuth {
                proxy,
                sent_credentials: self.credentials.is_some(),
                status,
            }),
            403 => Err(DialError::ProxyForbidden { proxy, target }),
            502..=504 => Err(DialError::ProxyUnreachable {
                proxy,
                target,
                status,
                reason,
            }),
            _ => Err(DialError::ProxyStatus {
                proxy,
                target,
                status,
                reason,
            }),
        }
    }
}

/// The URL without its credentials (for error messages).
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "<unparsable>".into(),
    }
}

/// Whether `no_proxy` exempts `host`: comma-separated entries, `*` for
/// every host; an entry matches the host itself and its subdomains (a
/// leading `.` or `*.` is ignored), case-insensitively; an entry's `:port`
/// is ignored. CIDR ranges are not supported (an IP address entry matches
/// that address only).
pub fn bypassed(no_proxy: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    no_proxy.split(',').map(str::trim).any(|entry| {
        if entry == "*" {
            return true;
        }
        let entry = entry.to_ascii_lowercase();
        let entry = entry
            .strip_prefix("*.")
            .or_else(|| entry.strip_prefix('.'))
            .unwrap_or(&entry);
        // Strip a port: `host:port` or `[v6]:port`, not a bare IPv6 address.
        let entry = if let Some(v6) = entry.strip_prefix('[') {
            v6.split(']').next().unwrap_or(v6)
        } else if entry.matches(':').count() == 1 {
            entry.split(':').next().unwrap_or(entry)
        } else {
            entry
        };
        let entry = entry.trim_end_matches('.');
        !entry.is_empty()
            && (host == entry
                || (host.len() > entry.len()
                    && host.ends_with(entry)
                    && host.as_bytes()[host.len() - entry.len() - 1] == b'.'))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn parses_urls_with_and_without_scheme_and_credentials() {
        let p = Proxy::parse("http://proxy.local:3128").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.credentials),
            ("proxy.local", 3128, None)
        );
        let p = Proxy::parse("proxy.local:8080").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.local", 8080));
        assert_eq!(Proxy::parse("http://p").unwrap().port, 80);
        let p = Proxy::parse("http://us%40er:p%3Ass@10.0.0.1:3128/").unwrap();
        assert_eq!(p.credentials, Some(("us@er".to_owned(), "p:ss".to_owned())));
        assert_eq!(p.to_string(), "http://10.0.0.1:3128");
        let p = Proxy::parse("http://[::1]:3128").unwrap();
        assert_eq!(p.to_string(), "http://[::1]:3128");
        let e = Proxy::parse("https://user:secret@p:443").unwrap_err();
        assert!(e.to_string().contains("only http://"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        // The password stays out of Debug.
        let p = Proxy::parse("http://u:secret@p:1").unwrap();
        assert!(!format!("{p:?}").contains("secret"));
        assert!(Proxy::parse("http://:3128").is_err());
    }

    #[test]
    fn env_lower_case_first_empty_is_unset_and_no_proxy_applies() {
        let host = "hub.example.net";
        assert_eq!(Proxy::from_vars(vars(&[]), host).unwrap(), None);
        let p = Proxy::from_vars(
            vars(&[("https_proxy", "http://a:1"), ("HTTPS_PROXY", "http://b:2")]),
            host,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.host, "a");
        let p = Proxy::from_vars(
            vars(&[("https_proxy", " "), ("HTTPS_PROXY", "http://b:2")]),
            host,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.host, "b");
        // http_proxy is for plain HTTP: not used for the cloud's TLS.
        assert_eq!(
            Proxy::from_vars(vars(&[("http_proxy", "http://a:1")]), host).unwrap(),
            None
        );
        for np in [
            "example.net",
            ".example.net",
            "*.example.net",
            "other, HUB.example.net:443",
            "*",
        ] {
            assert_eq!(
                Proxy::from_vars(
                    vars(&[("HTTPS_PROXY", "http://b:2"), ("NO_PROXY", np)]),
                    host
                )
                .unwrap(),
                None,
                "{np}"
            );
        }
        for np in ["ample.net", "other.example.net", "", "net.example"] {
            assert!(
                Proxy::from_vars(
                    vars(&[("https_proxy", "http://b:2"), ("no_proxy", np)]),
                    host
                )
                .unwrap()
                .is_some(),
                "{np}"
            );
        }
        assert!(Proxy::from_vars(vars(&[("https_proxy", "ftp://x")]), host).is_err());
    }

    #[test]
    fn no_proxy_ip_entries() {
        assert!(bypassed("127.0.0.1", "127.0.0.1"));
        assert!(!bypassed("127.0.0.1", "127.0.0.2"));
        assert!(bypassed("::1", "::1"));
        assert!(bypassed("[::1]:443", "[::1]"));
    }

    /// Runs the client side of CONNECT against a scripted proxy answer and
    /// returns what the client sent and the outcome.
    async fn exchange(proxy: &Proxy, answer: &'static [u8]) -> (String, Result<(), DialError>) {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut b = [0u8; 1024];
            while !got.ends_with(b"\r\n\r\n") {
                let n = server.read(&mut b).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&b[..n]);
            }
            // Dribble the answer to exercise partial parses.
            for chunk in answer.chunks(7) {
                server.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            // Closing: a client still waiting for the rest sees the end.
            drop(server);
            String::from_utf8(got).unwrap()
        });
        let r = proxy
            .connect_exchange(&mut client, "hub.example", 443)
            .await;
        let sent = srv.await.unwrap();
        (sent, r)
    }

    #[tokio::test]
    async fn connect_request_and_success() {
        let p = Proxy::parse("http://alice:s%20cret@p:3128").unwrap();
        let (sent, r) = exchange(
            &p,
            b"HTTP/1.1 200 Connection established\r\nProxy-agent: x\r\n\r\n",
        )
        .await;
        r.unwrap();
        // base64("alice:s cret")
        assert_eq!(
            sent,
            "CONNECT hub.example:443 HTTP/1.1\r\nHost: hub.example:443\r\n\
             Proxy-Authorization: Basic YWxpY2U6cyBjcmV0\r\n\r\n"
        );
        let p = Proxy::parse("http://p:3128").unwrap();
        let (sent, r) = exchange(&p, b"HTTP/1.0 200 OK\r\n\r\n").await;
        r.unwrap();
        assert!(!sent.contains("Proxy-Authorization"));
    }

    #[tokio::test]
    async fn refusals_are_told_apart() {
        let with = Proxy::parse("http://u:wrong@p:3128").unwrap();
        let without = Proxy::parse("http://p:3128").unwrap();
        let (_, r) = exchange(&with, b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n").await;
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                DialError::ProxyAuth {
                    sent_credentials: true,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("refused the credentials"), "{e}");
        let (_, r) = exchange(
            &without,
            b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
        )
        .await;
        assert!(matches!(
            r,
            Err(DialError::ProxyAuth {
                sent_credentials: false,
                ..
            })
        ));
        let (_, r) = exchange(&with, b"HTTP/1.1 401 Unauthorized\r\n\r\n").await;
        assert!(matches!(r, Err(DialError::ProxyAuth { status: 401, .. })));
        let (_, r) = exchange(&without, b"HTTP/1.1 403 Access violation\r\n\r\n").await;
        let e = r.unwrap_err();
        assert!(matches!(e, DialError::ProxyForbidden { .. }), "{e}");
        assert!(e.to_string().contains("hub.example:443"), "{e}");
        let (_, r) = exchange(&without, b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        assert!(matches!(
            r,
            Err(DialError::ProxyUnreachable { status: 502, .. })
        ));
        let (_, r) = exchange(&without, b"HTTP/1.1 500 Oops\r\n\r\n").await;
        assert!(matches!(r, Err(DialError::ProxyStatus { status: 500, .. })));
    }

    #[tokio::test]
    async fn malformed_early_close_and_trailing_data() {
        let p = Proxy::parse("http://p:3128").unwrap();
        let (_, r) = exchange(&p, b"SSH-2.0-OpenSSH\r\n\r\n").await;
        assert!(matches!(r, Err(DialError::ProxyProtocol { .. })), "{r:?}");
        let (_, r) = exchange(&p, b"HTTP/1.1 200 OK\r\n").await;
        assert!(matches!(r, Err(DialError::ProxyProtocol { .. })), "{r:?}");
        let (_, r) = exchange(&p, b"HTTP/1.1 200 OK\r\n\r\nextra").await;
        assert!(matches!(r, Err(DialError::ProxyProtocol { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_off() {
        let p = Proxy::parse("http://p:3128").unwrap();
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let mut b = [0u8; 1024];
            let _ = server.read(&mut b).await;
            let _ = server.write_all(b"HTTP/1.1 200 OK\r\n").await;
            let line = b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
            while server.write_all(line).await.is_ok() {}
        });
        let r = p.connect_exchange(&mut client, "h", 443).await;
        assert!(matches!(r, Err(DialError::ProxyProtocol { .. })), "{r:?}");
        drop(client);
        srv.await.unwrap();
    }
}
