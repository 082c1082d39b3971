//! The control socket: a Unix socket (never TCP: in the one-host setup an agent reaches every
//! loopback port), HTTP/1.1 + JSON, one request per connection.
//!
//! Every connection's peer is identified by the kernel (`SO_PEERCRED`: uid, gid, pid) before a
//! byte is read, and must have its uid in `control.allow_uids` or its gid in
//! `control.allow_gids` (read from the current policy, so a reload can change them). The file
//! mode is only a first fence: `0600` when only root is allowed, `0666` when other uids or gids
//! are (their permission comes from the credentials check, which holds whatever the mode).
//! A refused peer gets 403 at once and is logged.
//!
//! Bounded: [`MAX_CONNECTIONS`] requests served at once (beyond that, 503 at once), each
//! request bounded in size and time by [`super::http`].

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::http::{self, Request};
use super::{Control, GrantRequest, Peer, Refusal, Trigger};
use crate::pipeline::grants::parse_grant_label;
use crate::policy::ControlPolicy;

/// Requests served at once, at most.
pub const MAX_CONNECTIONS: usize = 16;
/// Connections being refused at once, at most (beyond that they are closed without a word).
const MAX_REFUSING: usize = 64;
/// Time to write a refusal.
const REFUSE_TIME: Duration = Duration::from_secs(1);

/// The bound socket; removes its file when dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `policy.socket`, creating its directory if needed. A stale socket file (no one
    /// listening) is replaced; a live one (another dnsfence) or a file of another kind is an
    /// error.
    pub fn bind(policy: &ControlPolicy) -> io::Result<ControlSocket> {
        let path = &policy.socket;
        let context = |e: io::Error| {
            io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
            && !parent.exists()
        {
            std::fs::create_dir_all(parent).map_err(context)?;
            let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755));
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(context(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process is serving it (is another dnsfence running?); set \
                         control.socket to another path",
                    )));
                }
                std::fs::remove_file(path).map_err(context)?;
            }
            Ok(_) => {
                return Err(context(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way; remove it or set control.socket",
                )));
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(context)?;
        let open = policy.allow_uids.iter().any(|&uid| uid != 0) || !policy.allow_gids.is_empty();
        let mode = if open { 0o666 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(context)?;
        Ok(ControlSocket {
            listener,
            path: path.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests until `stop` completes.
    pub async fn serve(self, control: Arc<Control>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let serving = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
        let refused = Arc::new(AtomicU64::new(0));
        loop {
            let stream = tokio::select! {
                _ = &mut stop => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "control socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let peer = match stream.peer_cred() {
                Ok(cred) => Peer {
                    uid: cred.uid(),
                    gid: cred.gid(),
                    pid: cred.pid(),
                },
                Err(error) => {
                    tracing::warn!(%error, "control socket: no peer credentials; connection closed");
                    continue;
                }
            };
            let allowed = {
                let policy = control.policy();
                policy.control.allow_uids.contains(&peer.uid)
                    || policy.control.allow_gids.contains(&peer.gid)
            };
            if !allowed {
                let before = refused.fetch_add(1, Ordering::Relaxed);
                // First refusals in full, then every power of two: a flood cannot flood stderr.
                if before < 16 || before.is_power_of_two() {
                    tracing::warn!(
                        uid = peer.uid,
                        gid = peer.gid,
                        pid = peer.pid,
                        refused = before + 1,
                        "control socket: peer refused (uid not in control.allow_uids, gid not in control.allow_gids)"
                    );
                }
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        let _permit = permit;
                        let body = json!({
                            "error": format!(
                                "uid {} is not allowed on this control socket (control.allow_uids / control.allow_gids)",
                                peer.uid
                            )
                        });
                        let mut stream = stream;
                        let _ = tokio::time::timeout(
                            REFUSE_TIME,
                            http::write_json(&mut stream, 403, &body),
                        )
                        .await;
                    });
                }
                continue;
            }
            let Ok(permit) = serving.clone().try_acquire_owned() else {
                tokio::spawn(async move {
                    let mut stream = stream;
                    let body = json!({"error": "the control socket is busy; try again"});
                    let _ = tokio::time::timeout(
                        REFUSE_TIME,
                        http::write_json(&mut stream, 503, &body),
                    )
                    .await;
                });
                continue;
            };
            let control = control.clone();
            tokio::spawn(async move {
                let _permit = permit;
                serve_one(stream, &control, peer).await;
            });
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve_one(mut stream: UnixStream, control: &Control, peer: Peer) {
    let (status, body) = match http::read_request(&mut stream).await {
        Ok(request) => route(control, peer, request).await,
        Err(bad) => (bad.status, json!({ "error": bad.message })),
    };
    if let Err(error) = http::write_json(&mut stream, status, &body).await {
        tracing::debug!(%error, "control socket: the reply could not be written");
    }
}

fn refusal(r: Refusal) -> (u16, serde_json::Value) {
    (r.status, r.to_json())
}

async fn route(control: &Control, peer: Peer, request: Request) -> (u16, serde_json::Value) {
    let method = request.method.as_str();
    let path = request.path.trim_end_matches('/');
    match (method, path) {
        ("GET", "/v1/status") => (200, control.status()),
        ("GET", "/v1/ready") => {
            let report = control.readiness().report();
            let status = if report.ready { 200 } else { 503 };
            (status, json!(report))
        }
        ("POST", "/v1/reload") => match control.reload(Trigger::Control(peer)).await {
            Ok(body) => (200, body),
            Err(r) => refusal(r),
        },
        ("GET", "/v1/grants") => (200, json!({ "grants": control.grants() })),
        ("GET", _) if path.starts_with("/v1/why/") => {
            let mut parts = path.trim_start_matches("/v1/why/").split('/');
            let ip = parts
                .next()
                .and_then(|p| p.parse::<std::net::IpAddr>().ok());
            let client = parts.next().map(str::parse::<std::net::IpAddr>);
            match (ip, client, parts.next()) {
                (Some(ip), None, None) => (200, control.why(ip, None)),
                (Some(ip), Some(Ok(client)), None) => (200, control.why(ip, Some(client))),
                _ => (
                    400,
                    json!({ "error": format!("{path}: write /v1/why/IP or /v1/why/IP/CLIENT") }),
                ),
            }
        }
        ("POST", "/v1/grants") => {
            let grant: GrantRequest = match serde_json::from_slice(&request.body) {
                Ok(grant) => grant,
                Err(error) => {
                    return (
                        400,
                        json!({
                            "error": format!(
                                "the body must be a JSON grant {{\"name\", \"ttl\", \"reason\", \
                                 optional \"client\" or \"group\", \"force\"}}: {error}"
                            )
                        }),
                    );
                }
            };
            match control.grant(grant, peer).await {
                Ok(view) => (201, json!(view)),
                Err(r) => refusal(r),
            }
        }
        ("DELETE", _) if path.starts_with("/v1/grants/") => {
            let label = path.trim_start_matches("/v1/grants/");
            let Some(id) = parse_grant_label(label) else {
                return (
                    400,
                    json!({ "error": format!("{label:?} is not a grant id (g<number>)") }),
                );
            };
            match control.revoke_grant(id, peer).await {
                Ok(body) => (200, body),
                Err(r) => refusal(r),
            }
        }
        (_, "/v1/status" | "/v1/ready" | "/v1/reload" | "/v1/grants") => (
            405,
            json!({ "error": format!("{method} is not allowed on {path}") }),
        ),
        (_, p) if p.starts_with("/v1/grants/") => (
            405,
            json!({ "error": format!("{method} is not allowed on {path}; use DELETE") }),
        ),
        _ => (
            404,
            json!({
                "error": format!(
                    "no such endpoint {path}; try GET /v1/status, GET /v1/ready, POST /v1/reload, \
                     GET|POST /v1/grants, DELETE /v1/grants/ID, GET /v1/why/IP[/CLIENT]"
                )
            }),
        ),
    }
}
