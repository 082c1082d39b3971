//! Sockets to an upstream, every one carrying the firewall mark.
//!
//! The ruleset lets only marked packets reach an upstream, and setting a mark needs
//! `CAP_NET_ADMIN`, so an agent cannot talk to the upstream itself and tunnel through it.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpSocket, UdpSocket};

/// Puts `mark` on `socket` (0: none).
pub fn set_mark(socket: socket2::SockRef<'_>, mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    socket.set_mark(mark).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!(
                "cannot set socket mark {mark:#x} on an upstream socket (needs CAP_NET_ADMIN): {error}"
            ),
        )
    })
}

/// A fresh marked UDP socket connected to `upstream`, on a source port the kernel draws at
/// random from `net.ipv4.ip_local_port_range`. Connected, so the kernel itself drops every
/// datagram that does not come from the upstream's address and port.
pub fn udp(upstream: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(upstream),
        socket2::Type::DGRAM.nonblocking(),
        Some(socket2::Protocol::UDP),
    )?;
    set_mark(socket2::SockRef::from(&socket), mark)?;
    socket.connect(&upstream.into())?;
    UdpSocket::from_std(socket.into())
}

/// A marked TCP socket, not yet connected.
pub fn tcp(upstream: SocketAddr, mark: u32) -> io::Result<TcpSocket> {
    let socket = match upstream {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    set_mark(socket2::SockRef::from(&socket), mark)?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// Ports the kernel draws source ports from (`net.ipv4.ip_local_port_range`, which covers
/// IPv6 too), if readable.
pub fn local_port_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some((low, high)),
        _ => None,
    }
}
