//! `dnsfence ctl`: the control socket's client.
//!
//! Exit status: 0 when the server did what was asked (for `ready`: it is ready), 1 when it
//! refused or failed (its message on stderr; for `ready`: not ready), 2 when the socket cannot
//! be reached or does not answer in HTTP.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

use super::http;

/// How long `ctl` waits for an answer (a reload waits for queries in flight and the kernel).
const ANSWER_TIME: Duration = Duration::from_secs(30);
/// Largest answer read.
const MAX_ANSWER: u64 = 4 << 20;

/// One `ctl` command.
#[derive(Debug, Clone)]
pub enum Command {
    Status,
    Ready,
    Reload,
    Grant {
        name: String,
        ttl: String,
        client: Option<std::net::IpAddr>,
        group: Option<String>,
        reason: String,
        force: bool,
    },
    Grants,
    Revoke {
        id: String,
    },
}

/// What the server said.
pub enum Answer {
    /// A 2xx status.
    Done(Value),
    /// Any other status, with the server's body.
    Refused(u16, Value),
    /// No HTTP answer at all.
    Unreachable(String),
}

/// Sends one request to the socket at `socket`.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Answer {
    let mut stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(error) => {
            return Answer::Unreachable(format!(
                "cannot connect to the control socket {}: {error} (is dnsfence serving? \
                 pass --socket PATH or --policy FILE)",
                socket.display()
            ));
        }
    };
    let _ = stream.set_read_timeout(Some(ANSWER_TIME));
    let _ = stream.set_write_timeout(Some(ANSWER_TIME));
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: dnsfence\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // A refused peer is answered before its request is read: a failed write can still be
    // followed by a readable answer.
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()));
    let mut answer = Vec::new();
    if let Err(error) = (&mut stream).take(MAX_ANSWER).read_to_end(&mut answer)
        && answer.is_empty()
    {
        return Answer::Unreachable(format!(
            "no answer from the control socket {}: {error}",
            socket.display()
        ));
    }
    let Some((status, body)) = http::parse_response(&answer) else {
        return Answer::Unreachable(format!(
            "the control socket {} did not answer in HTTP",
            socket.display()
        ));
    };
    let value = serde_json::from_slice(body)
        .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(body).trim().to_owned() }));
    if (200..300).contains(&status) {
        Answer::Done(value)
    } else {
        Answer::Refused(status, value)
    }
}

/// Runs one command and prints its outcome.
pub fn run(socket: &Path, as_json: bool, command: Command) -> ExitCode {
    let (method, path, body) = match &command {
        Command::Status => ("GET", "/v1/status".to_owned(), None),
        Command::Ready => ("GET", "/v1/ready".to_owned(), None),
        Command::Reload => ("POST", "/v1/reload".to_owned(), None),
        Command::Grants => ("GET", "/v1/grants".to_owned(), None),
        Command::Grant {
            name,
            ttl,
            client,
            group,
            reason,
            force,
        } => (
            "POST",
            "/v1/grants".to_owned(),
            Some(json!({
                "name": name,
                "ttl": ttl,
                "client": client,
                "group": group,
                "reason": reason,
                "force": force,
            })),
        ),
        Command::Revoke { id } => ("DELETE", format!("/v1/grants/{id}"), None),
    };
    match call(socket, method, &path, body.as_ref()) {
        Answer::Unreachable(message) => {
            eprintln!("dnsfence ctl: {message}");
            ExitCode::from(2)
        }
        Answer::Done(value) => {
            if as_json {
                println!("{}", pretty(&value));
            } else {
                print_done(&command, &value);
            }
            ExitCode::SUCCESS
        }
        Answer::Refused(status, value) => {
            if as_json {
                println!("{}", pretty(&value));
            } else if matches!(command, Command::Ready) && status == 503 {
                println!("not ready: waiting for {}", waiting_for(&value));
            } else {
                let message = value["error"].as_str().unwrap_or("request failed");
                eprintln!("dnsfence ctl: {message} (HTTP {status})");
                if let Some(errors) = value["errors"].as_array() {
                    for error in errors {
                        eprintln!("{}", error.as_str().unwrap_or_default());
                    }
                }
            }
            ExitCode::FAILURE
        }
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn waiting_for(value: &Value) -> String {
    value["waiting_for"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn scope(grant: &Value) -> String {
    match &grant["scope"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k} {}", v.as_str().map_or(v.to_string(), str::to_owned)))
            .collect::<Vec<_>>()
            .join(", "),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_done(command: &Command, value: &Value) {
    match command {
        Command::Status => {
            let policy = &value["policy"];
            println!(
                "dnsfence {} (pid {}), {}",
                value["version"].as_str().unwrap_or("?"),
                value["pid"],
                if value["ready"]["ready"].as_bool() == Some(true) {
                    "ready".to_owned()
                } else {
                    format!("not ready: waiting for {}", waiting_for(&value["ready"]))
                }
            );
            println!(
                "policy {} ({}), {} groups, {} rules",
                policy["file"].as_str().unwrap_or("?"),
                policy["tag"].as_str().unwrap_or("?"),
                policy["groups"],
                policy["rules"]
            );
            println!(
                "reloads: {} ok, {} failed; admitted addresses tracked: {}; active grants: {}",
                value["reloads"]["ok"],
                value["reloads"]["failed"],
                value["admitted_addresses"],
                value["grants"].as_array().map_or(0, Vec::len)
            );
        }
        Command::Ready => println!("ready"),
        Command::Reload => {
            let revoked = &value["revoked"];
            println!(
                "reloaded policy {} ({}); revoked {} addresses, cut {} connections",
                value["policy"].as_str().unwrap_or("?"),
                if value["changed"].as_bool() == Some(true) {
                    "changed"
                } else {
                    "unchanged"
                },
                revoked["elements"].as_u64().unwrap_or(0),
                revoked["connections"].as_u64().unwrap_or(0)
            );
            if let Some(error) = value["revoke_error"].as_str() {
                println!("warning: {error}");
            }
        }
        Command::Grant { .. } => println!(
            "{} {} until {} ({}s)",
            value["id"].as_str().unwrap_or("?"),
            value["name"].as_str().unwrap_or("?"),
            value["expires_at"].as_str().unwrap_or("?"),
            value["expires_in_s"]
                .as_f64()
                .map_or(0, |s| s.round() as u64)
        ),
        Command::Grants => {
            let grants = value["grants"].as_array().cloned().unwrap_or_default();
            if grants.is_empty() {
                println!("no active grants");
            }
            for g in grants {
                println!(
                    "{}\t{}\t{}\tuntil {} ({}s left)\tby uid {}\t{}",
                    g["id"].as_str().unwrap_or("?"),
                    g["name"].as_str().unwrap_or("?"),
                    scope(&g),
                    g["expires_at"].as_str().unwrap_or("?"),
                    g["expires_in_s"].as_f64().map_or(0, |s| s.round() as u64),
                    g["uid"],
                    g["reason"].as_str().unwrap_or("")
                );
            }
        }
        Command::Revoke { id } => {
            let revoked = &value["revoked"];
            println!(
                "ended {id}; revoked {} addresses, cut {} connections",
                revoked["elements"].as_u64().unwrap_or(0),
                revoked["connections"].as_u64().unwrap_or(0)
            );
        }
    }
}
