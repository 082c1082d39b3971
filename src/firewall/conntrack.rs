//! Cutting connections: deleting conntrack entries over netlink (ctnetlink).
//!
//! The ruleset accepts `ct state established,related` before it looks at the allow sets, so a
//! connection opened while its destination was admitted lives on after the element is deleted.
//! To end it at once, the conntrack entries whose original destination is a revoked address
//! (and, with per-client sets, whose source is that client) are deleted: the connection's next
//! packet is no longer `established`, meets the allow sets, and is dropped.
//!
//! The entries are found with one dump per address family and deleted by their original tuple,
//! echoed back to the kernel byte for byte (with their zone). An entry that vanished in between
//! (`ENOENT`) is not an error. Messages are built by hand: `netlink-packet-netfilter` has no
//! conntrack types, and the wire format is small and stable (`nfnetlink_conntrack.h`).

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, sockopt};
use nix::sys::time::TimeVal;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Delete messages per datagram (their acknowledgements must fit the receive buffer).
const DELETES_PER_SEND: usize = 256;
const RECV_BUFFER: usize = 1 << 20;

/// A destination to cut: every connection to `addr`, or only those from `client`.
pub(crate) type Cut = (Option<IpAddr>, IpAddr);

/// Deletes the conntrack entries of connections to the given destinations; returns how many
/// were deleted.
pub(crate) fn cut(targets: &[Cut]) -> Result<usize, String> {
    if targets.is_empty() {
        return Ok(0);
    }
    let any: HashSet<IpAddr> = targets
        .iter()
        .filter(|(client, _)| client.is_none())
        .map(|(_, addr)| addr.to_canonical())
        .collect();
    let pairs: HashSet<(IpAddr, IpAddr)> = targets
        .iter()
        .filter_map(|(client, addr)| client.map(|c| (c.to_canonical(), addr.to_canonical())))
        .collect();
    cut_matching(|src: IpAddr, dst: IpAddr| {
        any.contains(&dst.to_canonical())
            || pairs.contains(&(src.to_canonical(), dst.to_canonical()))
    })
}

/// Deletes the conntrack entries whose original (source, destination) `wanted` selects (a
/// reload that removed an `allow_cidrs` range cuts the connections into it); returns how many.
pub(crate) fn cut_matching(wanted: impl Fn(IpAddr, IpAddr) -> bool) -> Result<usize, String> {
    let mut sock = CtSocket::open()?;
    let mut deleted = 0;
    for family in [AF_INET, AF_INET6] {
        let doomed = sock.dump(family, &wanted)?;
        deleted += sock.delete(family, &doomed)?;
    }
    Ok(deleted)
}

struct CtSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// One entry to delete: its original tuple and zone attributes, as the kernel sent them.
struct Entry {
    attrs: Vec<u8>,
}

fn push_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_ne_bytes());
}

fn push_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_ne_bytes());
}

/// Appends one netlink message: header, `nfgenmsg`, attributes.
fn message(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) {
    let len = 16 + 4 + attrs.len();
    push_u32(buf, u32::try_from(len).unwrap_or(u32::MAX));
    push_u16(buf, (NFNL_SUBSYS_CTNETLINK << 8) | kind);
    push_u16(buf, flags);
    push_u32(buf, seq);
    push_u32(buf, 0);
    buf.extend_from_slice(&[family, 0, 0, 0]);
    buf.extend_from_slice(attrs);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// The attributes of `buf`: (type without flags, payload, the whole attribute).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let whole = &buf[..len];
        let payload = &buf[4..len];
        let padded = len.div_ceil(4) * 4;
        buf = buf.get(padded..).unwrap_or(&[]);
        Some((kind, payload, whole))
    })
}

fn address(payload: &[u8]) -> Option<IpAddr> {
    match payload.len() {
        4 => <[u8; 4]>::try_from(payload).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(payload).ok().map(IpAddr::from),
        _ => None,
    }
}

/// Source and destination of an original tuple.
fn endpoints(tuple: &[u8]) -> Option<(IpAddr, IpAddr)> {
    let (_, ip, _) = attributes(tuple).find(|(kind, _, _)| *kind == CTA_TUPLE_IP)?;
    let mut src = None;
    let mut dst = None;
    for (kind, payload, _) in attributes(ip) {
        match kind {
            CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = address(payload),
            CTA_IP_V4_DST | CTA_IP_V6_DST => dst = address(payload),
            _ => {}
        }
    }
    Some((src?, dst?))
}

impl CtSocket {
    fn open() -> Result<CtSocket, String> {
        let mut sock = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| format!("conntrack: cannot open a netlink socket: {e}"))?;
        sock.bind_auto()
            .map_err(|e| format!("conntrack: cannot bind the netlink socket: {e}"))?;
        nix::sys::socket::setsockopt(&sock, sockopt::ReceiveTimeout, &TimeVal::new(5, 0))
            .map_err(|e| format!("conntrack: cannot set a receive timeout: {e}"))?;
        let _ = nix::sys::socket::setsockopt(&sock, sockopt::RcvBufForce, &RECV_BUFFER);
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos());
        Ok(CtSocket {
            sock,
            seq,
            buf: vec![0; RECV_BUFFER],
        })
    }

    fn send(&self, buf: &[u8]) -> Result<(), String> {
        let sent = nix::sys::socket::send(self.sock.as_raw_fd(), buf, MsgFlags::empty())
            .map_err(|e| format!("conntrack: send: {}", e.desc()))?;
        if sent != buf.len() {
            return Err(format!("conntrack: sent {sent} of {} bytes", buf.len()));
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<usize, String> {
        loop {
            match nix::sys::socket::recv(self.sock.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err("conntrack: the kernel did not answer".into()),
                Err(e) => return Err(format!("conntrack: receive: {}", e.desc())),
            }
        }
    }

    /// Calls `each(kind, flags, seq, body)` for every message of the next datagram.
    fn messages(&mut self, mut each: impl FnMut(u16, u32, &[u8])) -> Result<(), String> {
        let n = self.recv()?;
        let mut data = self.buf.get(..n).unwrap_or(&[]);
        while data.len() >= 16 {
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            if len < 16 || len > data.len() {
                break;
            }
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
            each(kind, seq, &data[16..len]);
            data = data.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
        }
        Ok(())
    }

    /// The entries of `family` whose original (source, destination) `wanted` selects.
    fn dump(
        &mut self,
        family: u8,
        wanted: impl Fn(IpAddr, IpAddr) -> bool,
    ) -> Result<Vec<Entry>, String> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut req = Vec::with_capacity(32);
        message(
            &mut req,
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            family,
            &[],
        );
        self.send(&req)?;
        let mut entries = Vec::new();
        let mut done = false;
        let mut failure = None;
        while !done {
            self.messages(|kind, got, body| {
                if got != seq {
                    return;
                }
                match kind {
                    NLMSG_DONE => done = true,
                    NLMSG_ERROR => {
                        let errno = body
                            .get(..4)
                            .and_then(|b| <[u8; 4]>::try_from(b).ok())
                            .map_or(0, i32::from_ne_bytes);
                        if errno != 0 {
                            failure = Some(Errno::from_raw(-errno));
                        }
                        done = true;
                    }
                    _ => {
                        let attrs = body.get(4..).unwrap_or(&[]);
                        let mut keep = Vec::new();
                        let mut selected = false;
                        for (kind, payload, whole) in attributes(attrs) {
                            if kind == CTA_TUPLE_ORIG {
                                selected = endpoints(payload).is_some_and(|(s, d)| wanted(s, d));
                                keep.extend_from_slice(whole);
                            } else if kind == CTA_ZONE {
                                keep.extend_from_slice(whole);
                            }
                            while !keep.len().is_multiple_of(4) {
                                keep.push(0);
                            }
                        }
                        if selected {
                            entries.push(Entry { attrs: keep });
                        }
                    }
                }
            })?;
        }
        match failure {
            // No conntrack in this kernel or namespace: nothing to cut.
            Some(Errno::ENOENT | Errno::EOPNOTSUPP | Errno::EAFNOSUPPORT) => Ok(Vec::new()),
            Some(errno) => Err(format!(
                "conntrack: listing connections failed: {}",
                errno.desc()
            )),
            None => Ok(entries),
        }
    }

    /// Deletes the entries; an entry already gone is not an error.
    fn delete(&mut self, family: u8, entries: &[Entry]) -> Result<usize, String> {
        let mut deleted = 0;
        for chunk in entries.chunks(DELETES_PER_SEND) {
            let first = self.seq.wrapping_add(1);
            let mut req = Vec::new();
            for entry in chunk {
                self.seq = self.seq.wrapping_add(1);
                message(
                    &mut req,
                    IPCTNL_MSG_CT_DELETE,
                    NLM_F_REQUEST | NLM_F_ACK,
                    self.seq,
                    family,
                    &entry.attrs,
                );
            }
            let last = self.seq;
            self.send(&req)?;
            let mut pending = chunk.len();
            let mut failure = None;
            while pending > 0 {
                self.messages(|kind, seq, body| {
                    if kind != NLMSG_ERROR || seq.wrapping_sub(first) > last.wrapping_sub(first) {
                        return;
                    }
                    pending = pending.saturating_sub(1);
                    let errno = body
                        .get(..4)
                        .and_then(|b| <[u8; 4]>::try_from(b).ok())
                        .map_or(0, i32::from_ne_bytes);
                    match Errno::from_raw(-errno) {
                        _ if errno == 0 => deleted += 1,
                        Errno::ENOENT => {}
                        other => failure = Some(other),
                    }
                })?;
            }
            if let Some(errno) = failure {
                return Err(format!(
                    "conntrack: deleting a connection failed: {}",
                    errno.desc()
                ));
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_are_read_back_from_their_attributes() {
        // CTA_TUPLE_IP { V4_SRC 10.0.0.1, V4_DST 192.0.2.7 }
        let mut ip = Vec::new();
        for (kind, addr) in [
            (CTA_IP_V4_SRC, [10, 0, 0, 1]),
            (CTA_IP_V4_DST, [192, 0, 2, 7]),
        ] {
            push_u16(&mut ip, 8);
            push_u16(&mut ip, kind);
            ip.extend_from_slice(&addr);
        }
        let mut tuple = Vec::new();
        push_u16(&mut tuple, u16::try_from(4 + ip.len()).unwrap());
        push_u16(&mut tuple, CTA_TUPLE_IP | 0x8000);
        tuple.extend_from_slice(&ip);
        assert_eq!(
            endpoints(&tuple),
            Some(("10.0.0.1".parse().unwrap(), "192.0.2.7".parse().unwrap()))
        );
        assert_eq!(endpoints(&tuple[..6]), None, "truncated");
    }
}
