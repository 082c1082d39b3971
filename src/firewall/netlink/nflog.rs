//! Reading an NFLOG group: the packets the ruleset's drop rules logged, as raw facts
//! (addresses, protocol, destination port). What they mean is decided above the firewall.
//!
//! The socket is a `NETLINK_NETFILTER` socket bound to one group with `NFULNL_CFG_CMD_BIND`
//! (configuration messages built with `netlink-packet-netfilter`'s nflog types), asking for
//! the first [`COPY_RANGE`] bytes of each packet: enough for the IP header and the ports.
//! Packets arrive as `NFULNL_MSG_PACKET` messages, walked by hand like every other reply here;
//! the IP header in `NFULA_PAYLOAD` is parsed with bounds checks only. Like every netlink
//! socket it belongs to the network namespace of the thread that opened it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use netlink_packet_core::NLMSG_ERROR;
use netlink_packet_netfilter::NetfilterProtoFamily;
use netlink_packet_netfilter::nflog::{ConfigCmd, ConfigMode, ConfigNla, config_request};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, sockopt};
use nix::sys::time::TimeVal;

use super::attrs::{nlas, parse_error, replies};
use super::error::{NlError, Op, io_err};

/// Bytes of each logged packet the kernel copies to us.
const COPY_RANGE: u32 = 128;
/// `NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET`.
const NFULNL_PACKET: u16 = 4 << 8;
/// `NFULA_PAYLOAD`.
const NFULA_PAYLOAD: u16 = 9;
/// Receive buffer: a burst of logged packets waits here (the rules are rate-limited anyway).
const RECV_BUFFER: usize = 1 << 20;

/// One dropped packet, as the kernel logged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DroppedPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub proto: u8,
    /// The destination port, for TCP and UDP (and SCTP, DCCP, UDP-Lite).
    pub dport: Option<u16>,
}

/// A socket bound to one NFLOG group.
pub struct DropReader {
    sock: Socket,
    buf: Vec<u8>,
    group: u16,
}

impl DropReader {
    /// Binds `group` in the current network namespace (needs CAP_NET_ADMIN). Reads wait at
    /// most `wait`. Fails with `EBUSY` when another process reads the group.
    pub fn open(group: u16, wait: std::time::Duration) -> Result<DropReader, String> {
        DropReader::open_nl(group, wait).map_err(|e| {
            if e.errno() == Some(Errno::EBUSY) {
                format!(
                    "NFLOG group {group} is read by another process (ulogd, another dnsfence?); \
                     choose another firewall.nflog_group"
                )
            } else {
                format!("NFLOG group {group}: {e}")
            }
        })
    }

    fn open_nl(group: u16, wait: std::time::Duration) -> Result<DropReader, NlError> {
        let op = || Op::Socket("opening the NFLOG socket");
        let mut sock = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| io_err(op(), Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        sock.bind_auto()
            .map_err(|e| io_err(op(), Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        if nix::sys::socket::setsockopt(&sock, sockopt::RcvBufForce, &RECV_BUFFER).is_err() {
            let _ = nix::sys::socket::setsockopt(&sock, sockopt::RcvBuf, &RECV_BUFFER);
        }
        let micros = i64::try_from(wait.as_micros()).unwrap_or(i64::MAX);
        nix::sys::socket::setsockopt(
            &sock,
            sockopt::ReceiveTimeout,
            &TimeVal::new(micros / 1_000_000, (micros % 1_000_000) as _),
        )
        .map_err(|e| io_err(Op::Socket("setting the receive timeout"), e))?;
        let mut reader = DropReader {
            sock,
            buf: vec![0; 64 << 10],
            group,
        };
        reader.configure(ConfigNla::Cmd(ConfigCmd::Bind))?;
        reader.configure(ConfigNla::Mode(ConfigMode::new_packet(COPY_RANGE)))?;
        Ok(reader)
    }

    /// Sends one configuration message for the group and waits for its acknowledgement.
    fn configure(&mut self, nla: ConfigNla) -> Result<(), NlError> {
        let op = || Op::Socket("configuring the NFLOG group");
        let mut message = config_request(NetfilterProtoFamily::Unspec, self.group, vec![nla]);
        message.header.sequence_number = 1;
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        nix::sys::socket::send(self.sock.as_raw_fd(), &bytes, MsgFlags::empty())
            .map_err(|e| io_err(op(), e))?;
        loop {
            let n = match nix::sys::socket::recv(
                self.sock.as_raw_fd(),
                &mut self.buf,
                MsgFlags::empty(),
            ) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io_err(op(), e)),
            };
            let datagram = self.buf.get(..n).unwrap_or_default();
            for r in replies(datagram) {
                if r.ty != NLMSG_ERROR {
                    continue;
                }
                let Some((code, detail)) = parse_error(&r) else {
                    continue;
                };
                if code == 0 {
                    return Ok(());
                }
                return Err(NlError::Kernel {
                    op: op(),
                    errno: Errno::from_raw(-code),
                    detail,
                });
            }
        }
    }

    /// Waits for logged packets (at most the wait given to `open`) and appends them to `out`.
    /// `Ok(false)` when the wait ended without any. Packets lost because the buffer overflowed
    /// are skipped (`ENOBUFS`), not an error.
    pub fn read(&mut self, out: &mut Vec<DroppedPacket>) -> Result<bool, String> {
        let n =
            match nix::sys::socket::recv(self.sock.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOBUFS) => return Ok(false),
                Err(e) => return Err(format!("reading NFLOG group {}: {e}", self.group)),
            };
        let datagram = self.buf.get(..n).unwrap_or_default();
        let before = out.len();
        for r in replies(datagram) {
            if r.ty != NFULNL_PACKET {
                continue;
            }
            // The nfgenmsg header (4 bytes), then the attributes.
            let attrs = r.payload.get(4..).unwrap_or_default();
            if let Some((_, payload)) = nlas(attrs).find(|(k, _)| *k == NFULA_PAYLOAD)
                && let Some(packet) = parse_ip(payload)
            {
                out.push(packet);
            }
        }
        Ok(out.len() > before)
    }
}

/// The facts of an IPv4 or IPv6 header (and the destination port right after it).
pub(crate) fn parse_ip(p: &[u8]) -> Option<DroppedPacket> {
    let version = p.first()? >> 4;
    let (src, dst, proto, rest): (IpAddr, IpAddr, u8, Option<&[u8]>) = match version {
        4 => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            let src: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            let fragment_offset = u16::from_be_bytes(p.get(6..8)?.try_into().ok()?) & 0x1fff;
            // Only the first fragment carries the ports.
            let rest = (ihl >= 20 && fragment_offset == 0)
                .then(|| p.get(ihl..))
                .flatten();
            (
                Ipv4Addr::from(src).into(),
                Ipv4Addr::from(dst).into(),
                *p.get(9)?,
                rest,
            )
        }
        6 => {
            let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            (
                Ipv6Addr::from(src).into(),
                Ipv6Addr::from(dst).into(),
                *p.get(6)?,
                p.get(40..),
            )
        }
        _ => return None,
    };
    // TCP, UDP, DCCP, SCTP, UDP-Lite: the destination port is the second 16-bit word.
    let dport = match proto {
        6 | 17 | 33 | 132 | 136 => rest
            .and_then(|t| t.get(2..4))
            .and_then(|b| b.try_into().ok())
            .map(u16::from_be_bytes),
        _ => None,
    };
    Some(DroppedPacket {
        src: src.to_canonical(),
        dst: dst.to_canonical(),
        proto,
        dport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_ipv6_headers_give_addresses_protocol_and_port() {
        let mut v4 = vec![0u8; 40];
        v4[0] = 0x45;
        v4[9] = 6;
        v4[12..16].copy_from_slice(&[10, 0, 0, 2]);
        v4[16..20].copy_from_slice(&[198, 51, 100, 7]);
        v4[22..24].copy_from_slice(&443u16.to_be_bytes());
        let p = parse_ip(&v4).unwrap();
        assert_eq!(p.src, IpAddr::from([10, 0, 0, 2]));
        assert_eq!(p.dst, IpAddr::from([198, 51, 100, 7]));
        assert_eq!((p.proto, p.dport), (6, Some(443)));
        // A later fragment: no port.
        v4[6] = 0x00;
        v4[7] = 0x10;
        assert_eq!(parse_ip(&v4).unwrap().dport, None);

        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[6] = 17;
        v6[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        v6[24..40].copy_from_slice(&"2001:db8::53".parse::<Ipv6Addr>().unwrap().octets());
        v6[42..44].copy_from_slice(&53u16.to_be_bytes());
        let p = parse_ip(&v6).unwrap();
        assert_eq!(p.dst, "2001:db8::53".parse::<IpAddr>().unwrap());
        assert_eq!((p.proto, p.dport), (17, Some(53)));
    }

    #[test]
    fn truncated_or_foreign_input_is_no_packet() {
        for bad in [&[][..], &[0x45, 0, 0][..], &[0x70; 60][..], &[0x60; 20][..]] {
            assert_eq!(parse_ip(bad), None);
        }
        // A header without ports: still the addresses.
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[9] = 6;
        assert_eq!(parse_ip(&v4).unwrap().dport, None);
    }
}
