//! A small HTTP fault proxy for the scenario tests: it sits between a process and the real S3
//! server, forwards requests byte for byte (so SigV4 signatures stay valid), counts them by
//! method and path, and on request injects faults: an HTTP status (503, 403, …), a reset
//! connection, a stall, a truncated body, a delay, or a status held back until the test opens a
//! gate.
//!
//! Each client connection carries exactly one request: the proxy asks the server for
//! `Connection: close` and tells the client the same, so every request is a fresh connection and
//! the proxy never has to find where one response ends and the next begins. Request bodies are
//! framed by `Content-Length` (what S3 clients send); responses are relayed until the server
//! closes.
//!
//! Rules are checked in the order they were added; the first one that matches a request and
//! has uses left decides what happens to it. A request no rule takes is forwarded.

use anyhow::{anyhow, bail, Context, Result};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What happens to a request a rule takes.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and an S3-style XML error, without asking the server.
    Status(u16),
    /// Close the connection with a TCP reset as soon as the request head arrives.
    Reset,
    /// Read the request and then say nothing, holding the connection open, until the client
    /// gives up (or the proxy is dropped).
    Stall,
    /// Forward the request, then relay the response head and only half of its body, then
    /// close the connection.
    Truncate,
    /// Wait this long, then forward normally.
    Delay(Duration),
    /// Hold the request until [`FaultProxy::open_gate`] is called, then answer with this
    /// status (without asking the server). Lets a test decide the exact moment a client sees
    /// an error.
    Gated(u16),
}

/// Which requests a rule applies to.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    /// `GET`, `PUT`, `HEAD`, …; `None` matches any method.
    pub method: Option<String>,
    /// A substring of the request target (path and query); `None` matches any path.
    pub path_contains: Option<String>,
}

impl Matcher {
    pub fn any() -> Matcher {
        Matcher::default()
    }

    pub fn new(method: &str, path_contains: &str) -> Matcher {
        Matcher {
            method: Some(method.to_string()),
            path_contains: Some(path_contains.to_string()),
        }
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| target.contains(p))
    }
}

#[derive(Debug)]
struct Rule {
    matcher: Matcher,
    fault: Fault,
    /// `None`: until [`FaultProxy::clear`].
    remaining: Option<u32>,
}

/// One request as the proxy saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    /// The fault applied, by name (`status 503`, `reset`, …), or `None` when forwarded intact.
    pub fault: Option<String>,
    /// The server's status when the request reached it (and the response head came back).
    pub upstream_status: Option<u16>,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    seen: Vec<Seen>,
}

/// A running proxy. Dropping it stops accepting and cuts every connection it holds.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    gate: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// How long a stalled connection is held at most, so a forgotten stall cannot hang a test.
const STALL_MAX: Duration = Duration::from_secs(600);
/// The most a request head may hold.
const MAX_HEAD: usize = 64 * 1024;

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> Result<FaultProxy> {
        let upstream_addr = upstream
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("upstream {upstream:?} must be http://host:port"))?
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state: Arc<Mutex<State>> = Arc::default();
        let (gate, gate_rx) = watch::channel(0u64);
        let accept = {
            let state = state.clone();
            tokio::spawn(async move {
                // Connection tasks live in this set, so aborting the accept loop (on drop)
                // cuts them all, stalled ones included.
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                            let state = state.clone();
                            let upstream = upstream_addr.clone();
                            let gate = gate_rx.clone();
                            conns.spawn(async move {
                                if let Err(e) = serve(client, &upstream, state, gate).await {
                                    eprintln!("faultproxy: connection ended: {e:#}");
                                }
                            });
                        }
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    }
                }
            })
        };
        Ok(FaultProxy {
            addr,
            state,
            gate,
            accept,
        })
    }

    /// `http://127.0.0.1:PORT`, to give a process as its S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `fault` to the next `times` requests that match.
    pub fn inject(&self, matcher: Matcher, fault: Fault, times: u32) {
        self.lock().rules.push(Rule {
            matcher,
            fault,
            remaining: Some(times),
        });
    }

    /// Applies `fault` to every matching request until [`FaultProxy::clear`].
    pub fn inject_always(&self, matcher: Matcher, fault: Fault) {
        self.lock().rules.push(Rule {
            matcher,
            fault,
            remaining: None,
        });
    }

    /// Returns 503 for the next `n` requests of any kind.
    pub fn fail_next(&self, n: u32) {
        self.inject(Matcher::any(), Fault::Status(503), n);
    }

    /// Removes every rule: from now on everything is forwarded.
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Releases every request held by a [`Fault::Gated`] rule.
    pub fn open_gate(&self) {
        self.gate.send_modify(|n| *n += 1);
    }

    /// Every request seen so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Requests seen with this method whose target contains `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        let m = Matcher::new(method, path_contains);
        self.lock()
            .seen
            .iter()
            .filter(|s| m.matches(&s.method, &s.target))
            .count()
    }

    /// Like [`FaultProxy::count`], counting only requests the server answered with a 2xx.
    pub fn count_ok(&self, method: &str, path_contains: &str) -> usize {
        let m = Matcher::new(method, path_contains);
        self.lock()
            .seen
            .iter()
            .filter(|s| {
                m.matches(&s.method, &s.target)
                    && s.fault.is_none()
                    && s.upstream_status.is_some_and(|c| (200..300).contains(&c))
            })
            .count()
    }
}

/// The request head, parsed as far as the proxy needs.
struct Head {
    method: String,
    target: String,
    content_length: u64,
    /// The head re-serialized with `Connection: close`, ready to send upstream.
    bytes: Vec<u8>,
}

fn fault_name(f: &Fault) -> String {
    match f {
        Fault::Status(c) => format!("status {c}"),
        Fault::Reset => "reset".into(),
        Fault::Stall => "stall".into(),
        Fault::Truncate => "truncate".into(),
        Fault::Delay(d) => format!("delay {} ms", d.as_millis()),
        Fault::Gated(c) => format!("gated status {c}"),
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: &str,
    state: Arc<Mutex<State>>,
    mut gate: watch::Receiver<u64>,
) -> Result<()> {
    let (head, mut early_body) = read_head(&mut client).await?;
    // Decide and record under one lock, so counts and rule uses agree.
    let (fault, index) = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let fault = st
            .rules
            .iter_mut()
            .find(|r| r.remaining != Some(0) && r.matcher.matches(&head.method, &head.target))
            .map(|r| {
                if let Some(n) = r.remaining.as_mut() {
                    *n -= 1;
                }
                r.fault.clone()
            });
        st.seen.push(Seen {
            method: head.method.clone(),
            target: head.target.clone(),
            fault: fault
                .as_ref()
                .filter(|f| !matches!(f, Fault::Delay(_)))
                .map(fault_name),
            upstream_status: None,
        });
        (fault, st.seen.len() - 1)
    };
    let body_left = head.content_length.saturating_sub(early_body.len() as u64);

    match fault {
        Some(Fault::Reset) => {
            // SO_LINGER 0: close() sends RST instead of FIN.
            client.set_zero_linger()?;
            drop(client);
            return Ok(());
        }
        Some(Fault::Status(code)) => {
            discard(&mut client, body_left).await?;
            return answer(&mut client, code).await;
        }
        Some(Fault::Gated(code)) => {
            discard(&mut client, body_left).await?;
            let start = *gate.borrow_and_update();
            // Wait for the next open_gate() after this request arrived.
            while *gate.borrow() == start {
                if gate.changed().await.is_err() {
                    bail!("proxy dropped while a request was gated");
                }
            }
            return answer(&mut client, code).await;
        }
        Some(Fault::Stall) => {
            discard(&mut client, body_left).await?;
            tokio::time::sleep(STALL_MAX).await;
            return Ok(());
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Truncate) | None => {}
    }

    let mut server = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connecting to upstream {upstream}"))?;
    server.write_all(&head.bytes).await?;
    server.write_all(&early_body).await?;
    early_body.clear();
    copy_exact(&mut client, &mut server, body_left).await?;

    let (resp_head, resp_rest, status, resp_len) = read_response_head(&mut server).await?;
    {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = st.seen.get_mut(index) {
            s.upstream_status = Some(status);
        }
    }
    client.write_all(&resp_head).await?;
    if matches!(fault, Some(Fault::Truncate)) {
        // Half the body (at least one byte short), then a clean close: the client sees a
        // response that ends before its Content-Length.
        let total = resp_len.unwrap_or(resp_rest.len() as u64);
        let half = (total / 2).min(total.saturating_sub(1));
        let from_rest = (half as usize).min(resp_rest.len());
        client.write_all(&resp_rest[..from_rest]).await?;
        copy_exact(&mut server, &mut client, half - from_rest as u64).await?;
        client.flush().await?;
        return Ok(());
    }
    client.write_all(&resp_rest).await?;
    tokio::io::copy(&mut server, &mut client).await?;
    client.flush().await?;
    Ok(())
}

/// Reads until the blank line that ends a head; returns the head and any bytes after it.
async fn read_until_blank(stream: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(pos + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            bail!("head larger than {MAX_HEAD} bytes");
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before a complete head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Splits a head into its first line and header lines (without the trailing blank line).
fn lines(head: &[u8]) -> Result<(String, Vec<String>)> {
    let text = std::str::from_utf8(head).context("head is not UTF-8")?;
    let mut it = text.trim_end_matches("\r\n").split("\r\n");
    let first = it.next().unwrap_or_default().to_string();
    Ok((first, it.map(str::to_string).collect()))
}

fn header_value<'a>(headers: &'a [String], name: &str) -> Option<&'a str> {
    headers.iter().find_map(|h| {
        let (k, v) = h.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Rebuilds a head with `Connection: close` in place of any `Connection` header. The
/// Connection header is never among the signed headers of an S3 request, so this keeps the
/// signature valid.
fn with_close(first: &str, headers: &[String]) -> Vec<u8> {
    let mut out = String::with_capacity(1024);
    out.push_str(first);
    out.push_str("\r\n");
    for h in headers {
        let name = h.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

async fn read_head(client: &mut TcpStream) -> Result<(Head, Vec<u8>)> {
    let (raw, rest) = read_until_blank(client).await?;
    let (first, headers) = lines(&raw)?;
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    if header_value(&headers, "transfer-encoding").is_some() {
        bail!("chunked request bodies are not supported by the fault proxy");
    }
    let content_length = header_value(&headers, "content-length")
        .map(|v| v.parse::<u64>())
        .transpose()
        .context("bad Content-Length")?
        .unwrap_or(0);
    Ok((
        Head {
            method,
            target,
            content_length,
            bytes: with_close(&first, &headers),
        },
        rest,
    ))
}

/// Reads the server's response head: (head rewritten with Connection: close, bytes after it,
/// status, Content-Length).
async fn read_response_head(
    server: &mut TcpStream,
) -> Result<(Vec<u8>, Vec<u8>, u16, Option<u64>)> {
    let (raw, rest) = read_until_blank(server).await?;
    let (first, headers) = lines(&raw)?;
    let status = first
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad status line {first:?}"))?;
    let len = header_value(&headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    Ok((with_close(&first, &headers), rest, status, len))
}

async fn copy_exact<R, W>(from: &mut R, to: &mut W, n: u64) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let copied = tokio::io::copy(&mut from.take(n), to).await?;
    if copied != n {
        bail!("stream ended after {copied} of {n} bytes");
    }
    Ok(())
}

async fn discard(client: &mut TcpStream, n: u64) -> Result<()> {
    copy_exact(client, &mut tokio::io::sink(), n).await
}

async fn answer(client: &mut TcpStream, code: u16) -> Result<()> {
    let (reason, s3_code) = match code {
        403 => ("Forbidden", "AccessDenied"),
        404 => ("Not Found", "NoSuchKey"),
        429 => ("Too Many Requests", "SlowDown"),
        500 => ("Internal Server Error", "InternalError"),
        503 => ("Service Unavailable", "ServiceUnavailable"),
        _ => ("Error", "InjectedFault"),
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{s3_code}</Code><Message>injected by the fault proxy</Message></Error>"
    );
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(resp.as_bytes()).await?;
    client.flush().await?;
    Ok(())
}

/// Scripts "first this, then that": one single-use rule per fault, in order, so the first
/// matching request gets the first fault, the second the second, and so on.
pub fn sequence(proxy: &FaultProxy, matcher: &Matcher, faults: impl IntoIterator<Item = Fault>) {
    for f in faults {
        proxy.inject(matcher.clone(), f, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-request-per-connection upstream that answers 200 with `body` and records what
    /// it was sent.
    async fn upstream(body: &'static [u8]) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let g = got.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let g = g.clone();
                tokio::spawn(async move {
                    let (head, mut rest) = read_until_blank(&mut s).await.expect("head");
                    let (_, headers) = lines(&head).expect("lines");
                    let len: usize = header_value(&headers, "content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while rest.len() < len {
                        let mut b = [0u8; 1024];
                        let n = s.read(&mut b).await.expect("read");
                        rest.extend_from_slice(&b[..n]);
                    }
                    let mut all = head.clone();
                    all.extend_from_slice(&rest);
                    g.lock().expect("lock").push(all);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.write_all(body).await;
                });
            }
        });
        (format!("http://{addr}"), got)
    }

    /// Sends one raw request through the proxy and reads whatever comes back until close.
    async fn send(proxy: &FaultProxy, req: &str) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(proxy.addr).await?;
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(out)
    }

    const PUT: &str = "PUT /b/k.mp4 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello";
    const GET: &str = "GET /b/k.mp4 HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn forwards_counts_and_injects() {
        let (up, got) = upstream(b"0123456789").await;
        let p = FaultProxy::start(&up).await.expect("proxy");
        let ok = send(&p, PUT).await.expect("put");
        let text = String::from_utf8_lossy(&ok);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("Connection: close"), "{text}");
        assert!(text.ends_with("0123456789"), "{text}");
        // Forwarded byte for byte, but asking the server to close.
        let sent = String::from_utf8_lossy(&got.lock().expect("lock")[0]).into_owned();
        assert!(
            sent.starts_with("PUT /b/k.mp4 HTTP/1.1\r\nHost: x\r\n"),
            "{sent}"
        );
        assert!(sent.contains("Connection: close\r\n"), "{sent}");
        assert!(!sent.contains("keep-alive"), "{sent}");
        assert!(sent.ends_with("\r\n\r\nhello"), "{sent}");

        p.inject(Matcher::new("PUT", "k.mp4"), Fault::Status(503), 2);
        for _ in 0..2 {
            let r = send(&p, PUT).await.expect("put");
            assert!(String::from_utf8_lossy(&r).starts_with("HTTP/1.1 503"));
        }
        // A GET is not matched by the PUT rule, and the rule is used up anyway.
        let r = send(&p, GET).await.expect("get");
        assert!(String::from_utf8_lossy(&r).starts_with("HTTP/1.1 200"));
        let r = send(&p, PUT).await.expect("put");
        assert!(String::from_utf8_lossy(&r).starts_with("HTTP/1.1 200"));
        assert_eq!(p.count("PUT", "k.mp4"), 4);
        assert_eq!(p.count_ok("PUT", "k.mp4"), 2);
        assert_eq!(p.count("GET", "/b/"), 1);
        assert_eq!(got.lock().expect("lock").len(), 3);

        p.inject(Matcher::any(), Fault::Truncate, 1);
        let r = send(&p, GET).await.expect("get");
        let text = String::from_utf8_lossy(&r);
        assert!(text.contains("Content-Length: 10"), "{text}");
        assert!(text.ends_with("\r\n\r\n01234"), "half the body: {text}");

        p.inject(Matcher::any(), Fault::Reset, 1);
        match send(&p, GET).await {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
            Ok(b) => assert!(b.is_empty(), "a reset returns nothing"),
        }

        p.inject(Matcher::any(), Fault::Gated(503), 1);
        let held = {
            let addr = p.addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.write_all(GET.as_bytes()).await.expect("write");
                let mut out = Vec::new();
                s.read_to_end(&mut out).await.expect("read");
                out
            })
        };
        crate::wait_for(Duration::from_secs(5), "the gated request", || async {
            (p.seen().len() == 8).then_some(())
        })
        .await
        .expect("request arrives");
        assert!(!held.is_finished(), "held until the gate opens");
        p.open_gate();
        let out = held.await.expect("join");
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 503"));

        p.inject_always(Matcher::any(), Fault::Stall);
        let stalled = tokio::time::timeout(Duration::from_millis(300), send(&p, GET)).await;
        assert!(stalled.is_err(), "a stalled request gets no answer");
        p.clear();
        let r = send(&p, GET).await.expect("get");
        assert!(String::from_utf8_lossy(&r).starts_with("HTTP/1.1 200"));
    }
}
