//! The netlink socket to nf_tables: sending one batch in one `send`, and reading every
//! acknowledgement of it.

use std::os::fd::AsRawFd;

use netlink_packet_core::NLMSG_ERROR;
use netlink_packet_netfilter::none::ControlMessage;
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, sockopt};
use nix::sys::time::TimeVal;

use super::attrs::{parse_error, replies};
use super::batch::{Batch, append, control_message};
use super::error::{NlError, Op, io_err};

/// Requested socket buffers. `SO_SNDBUFFORCE` ignores `wmem_max` (needs CAP_NET_ADMIN, which
/// nf_tables needs anyway).
const SOCKET_BUFFER: usize = 8 << 20;
/// Receive buffer for one datagram (dumps come in skbs of at most a few pages).
const RECV_BUFFER: usize = 256 << 10;
/// How long to wait for a reply that the kernel should already have queued.
pub(super) const RECV_TIMEOUT_SECS: i64 = 5;

/// The netlink socket to nf_tables, in the network namespace of the thread that opened it.
pub(crate) struct NfSocket {
    sock: Socket,
    seq: u32,
    pub(super) rbuf: Vec<u8>,
    /// The effective send buffer: a batch must fit in it.
    sndbuf: usize,
}

impl NfSocket {
    /// Opens and configures the socket. Needs no privilege; changes to nf_tables need
    /// CAP_NET_ADMIN (in the namespace's user namespace).
    pub(crate) fn open() -> Result<NfSocket, NlError> {
        let op = || Op::Socket("opening the netlink socket");
        let mut sock = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| io_err(op(), Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        sock.bind_auto()
            .map_err(|e| io_err(op(), Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        // Best effort: both only make errors smaller or clearer.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        if nix::sys::socket::setsockopt(&sock, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
            let _ = nix::sys::socket::setsockopt(&sock, sockopt::SndBuf, &SOCKET_BUFFER);
        }
        if nix::sys::socket::setsockopt(&sock, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
            let _ = nix::sys::socket::setsockopt(&sock, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
        nix::sys::socket::setsockopt(
            &sock,
            sockopt::ReceiveTimeout,
            &TimeVal::new(RECV_TIMEOUT_SECS, 0),
        )
        .map_err(|e| io_err(Op::Socket("setting the receive timeout"), e))?;
        // The kernel doubles the value it stores and keeps half for bookkeeping.
        let sndbuf = nix::sys::socket::getsockopt(&sock, sockopt::SndBuf)
            .map(|b| b / 2)
            .unwrap_or(100_000);
        // Start sequence numbers from something unlikely to collide with stale replies.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        Ok(NfSocket {
            sock,
            seq,
            rbuf: vec![0; RECV_BUFFER],
            sndbuf,
        })
    }

    /// The largest batch, in bytes, that one `send` carries.
    pub(crate) fn max_batch_bytes(&self) -> usize {
        self.sndbuf.saturating_sub(4096).max(16 << 10)
    }

    pub(super) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Starts a batch on `table`.
    pub(crate) fn begin(&mut self, table: &str) -> Batch {
        let seq = self.next_seq();
        let mut buf = Vec::with_capacity(4096);
        append(&mut buf, &control_message(ControlMessage::BatchBegin, seq));
        Batch {
            buf,
            table: table.to_string(),
            first_seq: seq,
            next_seq: seq.wrapping_add(1),
            ops: Vec::new(),
            family: super::batch::TableFamily::Inet,
        }
    }

    pub(super) fn send(&self, buf: &[u8], op: Op) -> Result<(), NlError> {
        let sent = nix::sys::socket::send(self.sock.as_raw_fd(), buf, MsgFlags::empty())
            .map_err(|e| io_err(op, e))?;
        if sent != buf.len() {
            return Err(NlError::Protocol(format!(
                "netlink: sent {sent} of {} bytes",
                buf.len()
            )));
        }
        Ok(())
    }

    /// Receives one datagram into the buffer; returns its length.
    pub(super) fn recv(&mut self, dontwait: bool) -> Result<Option<usize>, NlError> {
        let mut flags = MsgFlags::MSG_TRUNC;
        if dontwait {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        loop {
            match nix::sys::socket::recv(self.sock.as_raw_fd(), &mut self.rbuf, flags) {
                Ok(n) if n > self.rbuf.len() => {
                    return Err(NlError::Protocol(format!(
                        "netlink: a reply of {n} bytes was truncated"
                    )));
                }
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(io_err(Op::Socket("reading netlink replies"), e)),
            }
        }
    }

    /// Sends the batch as one transaction and waits for every acknowledgement.
    pub(crate) fn commit(&mut self, batch: Batch) -> Result<(), NlError> {
        let Batch {
            mut buf,
            first_seq,
            next_seq,
            ops,
            ..
        } = batch;
        if ops.is_empty() {
            return Ok(());
        }
        let end_seq = next_seq;
        append(
            &mut buf,
            &control_message(ControlMessage::BatchEnd, end_seq),
        );
        self.seq = end_seq;
        self.send(&buf, Op::Batch)?;

        let in_batch = |seq: u32| seq.wrapping_sub(first_seq) <= end_seq.wrapping_sub(first_seq);
        let mut acked = vec![false; ops.len()];
        let mut remaining = ops.len();
        let mut first_error: Option<NlError> = None;
        while remaining > 0 {
            // Every reply is queued before send() returns; blocking only guards against a
            // kernel that does not answer, and stops once an error arrived.
            let Some(n) = self.recv(first_error.is_some())? else {
                if first_error.is_some() {
                    break;
                }
                return Err(NlError::Protocol(format!(
                    "netlink: no acknowledgement within {RECV_TIMEOUT_SECS} s for {remaining} of {} \
                     message(s); the transaction's outcome is unknown",
                    ops.len()
                )));
            };
            let datagram = self.rbuf.get(..n).unwrap_or_default();
            for r in replies(datagram) {
                if r.ty != NLMSG_ERROR || !in_batch(r.seq) {
                    continue;
                }
                let Some((code, detail)) = parse_error(&r) else {
                    continue;
                };
                // Message i of the batch has sequence number first_seq + 1 + i.
                let idx = usize::try_from(r.seq.wrapping_sub(first_seq).wrapping_sub(1))
                    .ok()
                    .filter(|i| ops.get(*i).is_some_and(|(s, _)| *s == r.seq));
                if let Some(i) = idx
                    && let Some(a) = acked.get_mut(i)
                    && !*a
                {
                    *a = true;
                    remaining -= 1;
                }
                if code != 0 && first_error.is_none() {
                    let op = idx
                        .and_then(|i| ops.get(i))
                        .map_or(Op::Batch, |(_, op)| op.clone());
                    first_error = Some(NlError::Kernel {
                        op,
                        errno: Errno::from_raw(-code),
                        detail,
                    });
                }
            }
        }
        // Drain anything left so that the next transaction starts clean.
        if first_error.is_some() {
            while self.recv(true)?.is_some() {}
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
