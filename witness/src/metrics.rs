//! Prometheus metrics: the witness's own (volumes, nodes connected, decisions by kind) and the
//! small HTTP server that serves `/metrics` for the witness and for the node (`metroblk`'s
//! `metrics.rs` renders the node's text and hands it to [`serve`]).
//!
//! The server is off every other path: one thread of its own, plain blocking `std::net`,
//! one connection at a time (a scraper is one client; a second one waits in the kernel's
//! backlog), a request of at most [`REQUEST_BYTES_MAX`] read within [`CONNECTION_MAX`] as a
//! whole (a trickler is cut off), `Connection: close` after every answer. It only answers
//! `GET /metrics` (and `GET /` with a pointer there); the text is rendered per scrape by the
//! caller's function, which reads what it reports without waiting on anyone.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Longest request head accepted (request line and headers).
pub const REQUEST_BYTES_MAX: usize = 8 << 10;
/// One connection's whole budget: reading the request and writing the answer.
pub const CONNECTION_MAX: Duration = Duration::from_secs(5);

/// The content type of the Prometheus text format (version 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on `addr` from a thread named `name`, rendering each answer with
/// `render`. Returns the bound address (port 0 picks one) once listening.
pub fn serve(addr: SocketAddr, name: &str, render: impl Fn() -> String + Send + 'static) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("metrics_listen: cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => answer(c, &render),
                    // EMFILE and the like: wait instead of spinning.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    Ok(local)
}

/// What one request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    Index,
    NotFound,
    BadMethod,
    Malformed,
}

/// Parses a request head (pure).
fn parse(head: &[u8]) -> Asked {
    let Some(line) = head.split(|&b| b == b'\r' || b == b'\n').next() else { return Asked::Malformed };
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Asked::Malformed;
    };
    if !version.starts_with(b"HTTP/1.") {
        return Asked::Malformed;
    }
    if method != b"GET" {
        return Asked::BadMethod;
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    match path {
        b"/metrics" => Asked::Metrics,
        b"/" => Asked::Index,
        _ => Asked::NotFound,
    }
}

fn answer(mut conn: TcpStream, render: &dyn Fn() -> String) {
    let deadline = Instant::now() + CONNECTION_MAX;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || head.len() >= REQUEST_BYTES_MAX {
            break false;
        }
        let _ = conn.set_read_timeout(Some(left));
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break false,
            Ok(n) => head.extend_from_slice(&buf[..n.min(REQUEST_BYTES_MAX - head.len())]),
        }
    };
    let (status, body, content_type) = if !complete {
        if head.len() >= REQUEST_BYTES_MAX {
            ("431 Request Header Fields Too Large", String::new(), "text/plain")
        } else {
            return; // gone or too slow: nothing to answer
        }
    } else {
        match parse(&head) {
            Asked::Metrics => ("200 OK", render(), CONTENT_TYPE),
            Asked::Index => ("200 OK", "metrics are at /metrics\n".to_string(), "text/plain"),
            Asked::NotFound => ("404 Not Found", "not found; metrics are at /metrics\n".into(), "text/plain"),
            Asked::BadMethod => ("405 Method Not Allowed", String::new(), "text/plain"),
            Asked::Malformed => ("400 Bad Request", String::new(), "text/plain"),
        }
    };
    let _ =
        conn.set_write_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))));
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(header.as_bytes()).and_then(|()| conn.write_all(body.as_bytes()));
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

/// Label values of one decision: the request's kind and what the witness answered.
type DecisionLabels = [(&'static str, &'static str); 2];

/// The witness's metrics, updated by the server as it decides (no lock of the server's).
#[derive(Default)]
pub struct WitnessMetrics {
    volumes: Gauge,
    nodes_connected: Gauge,
    decisions: Family<DecisionLabels, Counter>,
}

impl WitnessMetrics {
    pub fn set_volumes(&self, n: usize) {
        self.volumes.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_nodes_connected(&self, n: usize) {
        self.nodes_connected.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One request decided: `kind` as `Request::kind` names it, `outcome` granted, refused or
    /// status.
    pub fn decided(&self, kind: &'static str, outcome: &'static str) {
        self.decisions.get_or_create(&[("request", kind), ("outcome", outcome)]).inc();
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let mut r = Registry::with_prefix("metroblk_witness");
        r.register("volumes", "Volumes the witness keeps a record of", self.volumes.clone());
        r.register("nodes_connected", "Authenticated node connections open now", self.nodes_connected.clone());
        r.register(
            "decisions",
            "Requests decided, by request kind and outcome (granted, refused, status)",
            self.decisions.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &r);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Asked::Metrics);
        assert_eq!(parse(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Asked::Metrics);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Asked::Index);
        assert_eq!(parse(b"GET /other HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(parse(b"POST /metrics HTTP/1.1\r\n\r\n"), Asked::BadMethod);
        assert_eq!(parse(b"GET /metrics\r\n\r\n"), Asked::Malformed);
        assert_eq!(parse(b"GET /metrics SPDY/3\r\n\r\n"), Asked::Malformed);
        assert_eq!(parse(b""), Asked::Malformed);
        assert_eq!(parse(b"\xff\xfe \x00 \x01"), Asked::Malformed);
    }

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(request).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let m = std::sync::Arc::new(WitnessMetrics::default());
        m.set_volumes(3);
        m.set_nodes_connected(2);
        m.decided("lease", "granted");
        m.decided("lease", "granted");
        m.decided("promote", "refused");
        let mm = m.clone();
        let addr = serve("127.0.0.1:0".parse().unwrap(), "metrics-test", move || mm.render()).unwrap();
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.contains("\nmetroblk_witness_volumes 3\n"), "{ok}");
        assert!(ok.contains("\nmetroblk_witness_nodes_connected 2\n"), "{ok}");
        assert!(ok.contains("metroblk_witness_decisions_total{request=\"lease\",outcome=\"granted\"} 2\n"), "{ok}");
        assert!(ok.contains("metroblk_witness_decisions_total{request=\"promote\",outcome=\"refused\"} 1\n"), "{ok}");
        assert!(get(addr, b"GET /x HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        // A head that never ends is cut at the limit.
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', REQUEST_BYTES_MAX));
        assert!(get(addr, &big).starts_with("HTTP/1.1 431"));
        // A client that says nothing does not keep the next one out for longer than the limit.
        let _silent = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        assert!(get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        assert!(t.elapsed() < CONNECTION_MAX + Duration::from_secs(2));
    }
}
