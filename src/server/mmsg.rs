//! Many datagrams per system call: `recvmmsg` in, `sendmmsg` out, with buffers kept for the
//! life of the socket's receive loop.
//!
//! A [`Batch`] owns [`BATCH`] receive slots of [`MAX_DATAGRAM`] bytes each (a DNS message over
//! UDP cannot be larger, so no datagram is ever cut short, exactly as with one `recv_from`
//! into one such buffer) and as many reply buffers of [`MAX_UDP_PAYLOAD`] bytes, the largest
//! UDP reply dnsfence sends. Memory is fixed: about 2 MiB of receive slots and 40 KiB of reply
//! buffers per socket, whatever the load.
//!
//! Both calls are libc's, each behind one `unsafe` block whose pointers all point into
//! buffers borrowed for the call (nix 0.30's versions keep raw pointers in a header table
//! that could not be held across an `.await`, and its `sendmmsg` reports how many messages
//! left only through an iterator that reads back addresses nobody wrote).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use nix::libc;
use socket2::{SockAddr, SockAddrStorage};

use super::MAX_UDP_PAYLOAD;

/// Datagrams read with one `recvmmsg` (and at most as many replies sent with one `sendmmsg`).
pub const BATCH: usize = 32;

/// Largest datagram read; a DNS message over UDP cannot be larger.
pub const MAX_DATAGRAM: usize = 65_535;

/// One socket's receive slots and reply buffers, reused batch after batch.
pub struct Batch {
    /// Where the kernel writes each datagram's sender.
    senders: Vec<SockAddrStorage>,
    /// `BATCH` slots of `MAX_DATAGRAM` bytes, one after another.
    slots: Box<[u8]>,
    /// Length and sender of each datagram of the last batch.
    received: Vec<(usize, Option<SocketAddr>)>,
    /// One reply buffer per fast reply of the batch, in the order they were answered.
    replies: Vec<Vec<u8>>,
    /// Where each reply goes (`replies[i]` to `peers[i]`).
    peers: Vec<SockAddr>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch {
            senders: (0..BATCH).map(|_| SockAddrStorage::zeroed()).collect(),
            slots: vec![0u8; BATCH * MAX_DATAGRAM].into_boxed_slice(),
            received: Vec::with_capacity(BATCH),
            replies: (0..BATCH)
                .map(|_| Vec::with_capacity(usize::from(MAX_UDP_PAYLOAD)))
                .collect(),
            peers: Vec::with_capacity(BATCH),
        }
    }

    /// Reads every datagram waiting on `socket`, up to [`BATCH`], without blocking; how many
    /// (`WouldBlock` when there are none).
    pub fn receive(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        self.received.clear();
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: an all-zero `mmsghdr` is a valid value (null pointers, zero lengths).
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut count: usize = 0;
        for (((header, iovec), slot), sender) in headers
            .iter_mut()
            .zip(iovecs.iter_mut())
            .zip(self.slots.chunks_exact_mut(MAX_DATAGRAM))
            .zip(self.senders.iter_mut())
        {
            iovec.iov_base = slot.as_mut_ptr().cast();
            iovec.iov_len = slot.len();
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_namelen = sender.size_of();
            header.msg_hdr.msg_name = (sender as *mut SockAddrStorage).cast();
            count += 1;
        }
        // SAFETY: `headers[..count]` point at `iovecs`, at receive slots of `iov_len` bytes and
        // at address storage of `msg_namelen` bytes, all borrowed (mutably) for the whole call;
        // the kernel writes only inside them and the headers. `count <= BATCH` fits a
        // `c_uint`; no timeout (the socket is non-blocking and MSG_DONTWAIT is set anyway).
        let received = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let received = usize::try_from(received).map_err(|_| io::Error::last_os_error())?;
        for (header, sender) in headers.iter().zip(self.senders.iter_mut()).take(received) {
            let storage = std::mem::replace(sender, SockAddrStorage::zeroed());
            let namelen = header.msg_hdr.msg_namelen.min(storage.size_of());
            // SAFETY: the kernel wrote the sender's address (of the family it set in the
            // storage, `msg_namelen` bytes long, capped at the storage's size) for this message.
            let peer = unsafe { SockAddr::new(storage, namelen) }.as_socket();
            // Cannot exceed the slot (a UDP payload is at most 65,507 bytes); capped anyway.
            let len =
                usize::try_from(header.msg_len).map_or(MAX_DATAGRAM, |len| len.min(MAX_DATAGRAM));
            self.received.push((len, peer));
        }
        Ok(self.received.len())
    }

    /// Datagram `index` of the last batch, its sender, and reply buffer `slot` (emptied) for
    /// its answer; `None` when there is no such datagram or it came without a sender.
    pub fn datagram(
        &mut self,
        index: usize,
        slot: usize,
    ) -> Option<(&[u8], SocketAddr, &mut Vec<u8>)> {
        let &(len, peer) = self.received.get(index)?;
        let start = index * MAX_DATAGRAM;
        let datagram = self.slots.get(start..start + len)?;
        let reply = self.replies.get_mut(slot)?;
        reply.clear();
        Some((datagram, peer?, reply))
    }

    /// Sets where the replies go: the first reply buffer to the first peer, and so on.
    pub fn set_peers(&mut self, peers: impl Iterator<Item = SocketAddr>) {
        self.peers.clear();
        self.peers.extend(peers.take(BATCH).map(SockAddr::from));
    }

    /// How many replies [`Batch::set_peers`] addressed.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Reply buffer `slot`, for tests that send without receiving.
    #[cfg(test)]
    pub fn reply_mut(&mut self, slot: usize) -> Option<&mut Vec<u8>> {
        self.replies.get_mut(slot)
    }

    /// Sends replies `first..` to their peers with one `sendmmsg`, without blocking; how many
    /// left (the kernel stops at the first it cannot send; sending from there reports why).
    pub fn send(&self, socket: &impl AsRawFd, first: usize) -> io::Result<usize> {
        let peers = self.peers.get(first..).unwrap_or_default();
        let replies = self.replies.get(first..).unwrap_or_default();
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: an all-zero `mmsghdr` is a valid value (null pointers, zero lengths).
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut count: usize = 0;
        for (((header, iovec), reply), peer) in headers
            .iter_mut()
            .zip(iovecs.iter_mut())
            .zip(replies)
            .zip(peers)
        {
            iovec.iov_base = reply.as_ptr().cast_mut().cast();
            iovec.iov_len = reply.len();
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_name = peer.as_ptr().cast_mut().cast();
            header.msg_hdr.msg_namelen = peer.len();
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        // SAFETY: `headers[..count]` point at `iovecs`, at reply buffers and at addresses that
        // are all borrowed for the whole call and outlive it; the kernel only reads them
        // (and writes each header's `msg_len`, inside `headers`). `count <= BATCH`, the length
        // of `headers`, so it fits a `c_uint`.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(sent).map_err(|_| io::Error::last_os_error())
    }
}
