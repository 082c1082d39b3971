//! Just enough HTTP/1.1 for the control socket, with hard bounds.
//!
//! One request per connection (`Connection: close`), a request line and headers of at most
//! [`MAX_HEAD`] bytes, a body of at most [`MAX_BODY`] bytes announced by `Content-Length`
//! (chunked bodies are refused), and the whole request within [`REQUEST_TIME`]. That is all
//! `curl --unix-socket` and `dnsfence ctl` need, and small enough to read in one sitting: the
//! socket is a privileged interface, and a general-purpose HTTP stack would be most of the code
//! an allowed-but-buggy client could reach.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Request line and headers, at most.
pub const MAX_HEAD: usize = 8 * 1024;
/// Body, at most.
pub const MAX_BODY: usize = 64 * 1024;
/// The whole request must arrive within this.
pub const REQUEST_TIME: Duration = Duration::from_secs(5);

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// Why a request could not be read: the status to answer and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub status: u16,
    pub message: String,
}

impl BadRequest {
    fn new(status: u16, message: impl Into<String>) -> BadRequest {
        BadRequest {
            status,
            message: message.into(),
        }
    }
}

/// Reads one request, within the size and time bounds.
pub async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Request, BadRequest> {
    match tokio::time::timeout(REQUEST_TIME, read_bounded(stream)).await {
        Ok(result) => result,
        Err(_) => Err(BadRequest::new(
            408,
            format!(
                "the request did not arrive within {} s",
                REQUEST_TIME.as_secs()
            ),
        )),
    }
}

async fn read_bounded<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Request, BadRequest> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(BadRequest::new(
                431,
                format!("request head longer than {MAX_HEAD} bytes"),
            ));
        }
        let mut chunk = [0u8; 1024];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| BadRequest::new(400, format!("cannot read the request: {e}")))?;
        if n == 0 {
            return Err(BadRequest::new(
                400,
                "the request ended before its headers did",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head_end > MAX_HEAD {
        return Err(BadRequest::new(
            431,
            format!("request head longer than {MAX_HEAD} bytes"),
        ));
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| BadRequest::new(400, "the request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest::new(
            400,
            "malformed request line; expected `METHOD /path HTTP/1.1`",
        ));
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(BadRequest::new(505, "only HTTP/1.1 is spoken here"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(BadRequest::new(400, "malformed method"));
    }
    if !target.starts_with('/') {
        return Err(BadRequest::new(400, "the request target must be a path"));
    }
    let mut content_length: Option<usize> = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(BadRequest::new(400, "malformed header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length: usize = value
                .parse()
                .map_err(|_| BadRequest::new(400, "Content-Length is not a number"))?;
            if content_length.is_some_and(|l| l != length) {
                return Err(BadRequest::new(400, "conflicting Content-Length headers"));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(BadRequest::new(
                411,
                "chunked bodies are not accepted; send Content-Length",
            ));
        }
    }
    let length = content_length.unwrap_or(0);
    let method = method.to_owned();
    let path = target.split('?').next().unwrap_or(target).to_owned();
    if length > MAX_BODY {
        return Err(BadRequest::new(
            413,
            format!("request body longer than {MAX_BODY} bytes"),
        ));
    }
    let mut body = buf.split_off(head_end + 4);
    if body.len() > length {
        return Err(BadRequest::new(
            400,
            "more bytes than Content-Length announced",
        ));
    }
    let missing = length - body.len();
    if missing > 0 {
        let start = body.len();
        body.resize(length, 0);
        stream
            .read_exact(&mut body[start..])
            .await
            .map_err(|_| BadRequest::new(400, "the body is shorter than Content-Length"))?;
    }
    Ok(Request { method, path, body })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Internal Server Error",
    }
}

/// Writes a JSON response and ends the exchange.
pub async fn write_json<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    body: &serde_json::Value,
) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(body).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        text.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(text.as_bytes()).await?;
    stream.flush().await?;
    stream.shutdown().await
}

/// Parses a response as `dnsfence ctl` receives it: status and body.
pub fn parse_response(bytes: &[u8]) -> Option<(u16, &[u8])> {
    let end = find(bytes, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, &bytes[end + 4..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Request, BadRequest> {
        let mut reader = bytes;
        read_request(&mut reader).await
    }

    #[tokio::test]
    async fn a_request_with_a_body_is_read_whole() {
        let r = parse(b"POST /v1/grants?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            .await
            .unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/grants");
        assert_eq!(r.body, b"{}");
    }

    #[tokio::test]
    async fn malformed_and_oversized_requests_are_refused_with_a_status() {
        assert_eq!(parse(b"garbage\r\n\r\n").await.unwrap_err().status, 400);
        assert_eq!(parse(b"GET /\r\n\r\n").await.unwrap_err().status, 400);
        assert_eq!(parse(b"GET / HTTP/1.1").await.unwrap_err().status, 400);
        assert_eq!(
            parse(b"GET / SPDY/3\r\n\r\n").await.unwrap_err().status,
            505
        );
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(parse(big.as_bytes()).await.unwrap_err().status, 413);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse(long.as_bytes()).await.unwrap_err().status, 431);
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(chunked).await.unwrap_err().status, 411);
        let short = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}";
        assert_eq!(parse(short).await.unwrap_err().status, 400);
    }

    #[test]
    fn responses_are_parsed_back() {
        let (status, body) =
            parse_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!(status, 403);
        assert_eq!(body, b"{}");
    }
}
