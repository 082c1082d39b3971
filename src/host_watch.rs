//! Keeps the pipeline's list of this host's addresses current.
//!
//! The pipeline treats a query from any address of this host as the loopback client (see
//! [`pipeline::local_source`](crate::pipeline::local_source)); an address added after start
//! (a container runtime creating a bridge, DHCP, an administrator) must count from the moment
//! a process could bind it. One thread listens for the kernel's address announcements
//! (rtnetlink groups `RTMGRP_IPV4_IFADDR` and `RTMGRP_IPV6_IFADDR`) and re-reads the list on
//! each, and at least every [`PERIOD`] in case an announcement was lost (a full socket buffer)
//! or the subscription could not be made. Re-reading costs one `getifaddrs`: nothing runs per
//! query.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, sockopt};
use nix::sys::time::TimeVal;

use crate::pipeline::local_source::HostAddresses;

/// The longest the list goes without a re-read.
pub const PERIOD: Duration = Duration::from_secs(2);

const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// Starts the watching thread; it runs as long as the process.
pub fn watch(host: Arc<HostAddresses>) -> std::io::Result<()> {
    let socket = subscribe();
    if let Err(error) = &socket {
        tracing::warn!(
            "cannot subscribe to address changes ({error}); this host's addresses are re-read \
             every {}s instead",
            PERIOD.as_secs()
        );
    }
    std::thread::Builder::new()
        .name("host-addresses".into())
        .spawn(move || run(&host, socket.ok()))
        .map(|_| ())
}

fn subscribe() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))?;
    let seconds = i64::try_from(PERIOD.as_secs()).unwrap_or(2);
    nix::sys::socket::setsockopt(&socket, sockopt::ReceiveTimeout, &TimeVal::new(seconds, 0))
        .map_err(std::io::Error::from)?;
    Ok(socket)
}

fn run(host: &HostAddresses, socket: Option<Socket>) {
    // Read again: an address may have come between the pipeline's first read and the
    // subscription.
    host.refresh();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match &socket {
            // A message, a timeout or an overflow (ENOBUFS): all mean "read the list again".
            Some(socket) => {
                match nix::sys::socket::recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(_) | Err(Errno::EAGAIN | Errno::ENOBUFS | Errno::EINTR) => {}
                    // Anything else may repeat at once: never spin on it.
                    Err(_) => std::thread::sleep(PERIOD),
                }
            }
            None => std::thread::sleep(PERIOD),
        }
        host.refresh();
    }
}
