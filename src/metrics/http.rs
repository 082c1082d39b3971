//! The endpoint: a deliberately small HTTP/1.1 server for three GET paths.
//!
//! Scrapers and probes send one short request and read one reply, so this reads at most
//! [`MAX_REQUEST`] bytes with a short deadline, answers, and closes the connection: one
//! connection at a time, on a thread of its own. A client that never sends costs at most
//! [`DEADLINE`] before the next one is served.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Metrics;

const MAX_REQUEST: usize = 8 * 1024;
const DEADLINE: Duration = Duration::from_secs(2);

/// The running endpoint; dropping it stops the thread.
pub struct MetricsServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds `listen` (the policy guarantees a loopback address) and serves on a new thread.
pub fn serve_metrics(listen: SocketAddr, metrics: Arc<Metrics>) -> io::Result<MetricsServer> {
    if !listen.ip().is_loopback() {
        // The policy refuses this already; never trust that silently for an agent-facing bind.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("metrics.listen {listen} is not a loopback address"),
        ));
    }
    let listener = TcpListener::bind(listen)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind metrics {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = std::thread::Builder::new()
        .name("dnsfence-metrics".into())
        .spawn({
            let stop = Arc::clone(&stop);
            move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let _ = answer(stream, &metrics);
                    }
                }
            }
        })?;
    Ok(MetricsServer {
        addr,
        stop,
        thread: Some(thread),
    })
}

fn answer(mut stream: TcpStream, metrics: &Arc<Metrics>) -> io::Result<()> {
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.set_write_timeout(Some(DEADLINE))?;
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            metrics.render(),
        ),
        ("GET", "/healthz") => {
            let stale = metrics.health.stale();
            if stale.is_empty() {
                ("200 OK", "text/plain; charset=utf-8", "ok\n".to_owned())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!("{}\n", stale.join("\n")),
                )
            }
        }
        ("GET", "/readyz") => {
            let report = metrics.readiness.report();
            let body = serde_json::to_string(&report).unwrap_or_default() + "\n";
            let status = if report.ready {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "application/json", body)
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "the paths are /metrics, /healthz and /readyz\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Readiness;
    use crate::policy::Policy;

    fn get(addr: SocketAddr, path: &str) -> (String, String) {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\n\r\n").unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    /// The real endpoint over loopback: `/readyz` says 503 and why while the ruleset is not
    /// installed, 200 once it is.
    #[test]
    fn readyz_is_not_ready_before_the_ruleset_is_installed() {
        let policy = Policy::parse(
            "listen: [\"127.0.0.1:53\"]\nupstreams: [\"192.0.2.53:53\"]\nallow: [a.example]\n\
             metrics: {listen: \"127.0.0.1:9153\"}\n",
            std::path::Path::new("p.yaml"),
        )
        .unwrap();
        let readiness = Readiness::new();
        readiness.set_policy_loaded();
        readiness.set_listeners_bound();
        let metrics = Arc::new(Metrics::new(&policy, readiness.clone(), None, true));
        let server = serve_metrics("127.0.0.1:0".parse().unwrap(), metrics).unwrap();
        let (status, body) = get(server.addr, "/readyz");
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
        assert!(body.contains("\"firewall\":\"pending\""), "{body}");
        readiness.set_firewall_installed();
        let (status, body) = get(server.addr, "/readyz");
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        // Health: nothing has answered yet, but the limit has not passed either.
        let (status, _) = get(server.addr, "/healthz");
        assert_eq!(status, "HTTP/1.1 200 OK");
    }

    #[test]
    fn only_loopback_is_ever_bound() {
        let policy = Policy::parse(
            "listen: [\"127.0.0.1:53\"]\nupstreams: [\"192.0.2.53:53\"]\nallow: [a.example]\n",
            std::path::Path::new("p.yaml"),
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new(&policy, Readiness::new(), None, false));
        assert!(serve_metrics("0.0.0.0:0".parse().unwrap(), metrics).is_err());
    }
}
