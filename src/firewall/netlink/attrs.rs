//! Walking raw netlink: the messages of one datagram, the attributes of one message, and the
//! error code (with the kernel's extended-ack text) of an `NLMSG_ERROR`.
//!
//! Every read is bounds-checked and returns `None` on malformed input: a reply the kernel sent
//! cannot make dnsfence panic.

use netlink_packet_core::{NLA_TYPE_MASK, NLM_F_ACK_TLVS, NLM_F_CAPPED};

/// `NLMSGERR_ATTR_MSG`: the extended acknowledgement's text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// One netlink message of a reply.
pub(super) struct Reply<'a> {
    pub(super) ty: u16,
    pub(super) flags: u16,
    pub(super) seq: u32,
    pub(super) payload: &'a [u8],
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(super) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(crate) fn be32_of(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

pub(super) fn be64_of(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

pub(super) fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(b.get(..end).unwrap_or_default()).into_owned()
}

/// Iterates over the netlink messages of one datagram.
pub(super) fn replies(mut buf: &[u8]) -> impl Iterator<Item = Reply<'_>> {
    std::iter::from_fn(move || {
        let len = u32_at(buf, 0)? as usize;
        if len < 16 || len > buf.len() {
            return None;
        }
        let r = Reply {
            ty: u16_at(buf, 4)?,
            flags: u16_at(buf, 6)?,
            seq: u32_at(buf, 8)?,
            payload: buf.get(16..len)?,
        };
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or_default();
        Some(r)
    })
}

/// Iterates over the attributes in `buf` as (type without flags, value).
pub(crate) fn nlas(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16_at(buf, 0)? as usize;
        let kind = u16_at(buf, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = buf.get(4..len)?;
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or_default();
        Some((kind, value))
    })
}

pub(super) fn nla(buf: &[u8], kind: u16) -> Option<&[u8]> {
    nlas(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

/// The error code and extended-ack message of an `NLMSG_ERROR` reply.
pub(super) fn parse_error(r: &Reply<'_>) -> Option<(i32, Option<String>)> {
    let code = i32::from_ne_bytes(r.payload.get(..4)?.try_into().ok()?);
    let mut detail = None;
    if r.flags & NLM_F_ACK_TLVS != 0 {
        // The original header follows the code; its payload too unless capped.
        let orig_len = if r.flags & NLM_F_CAPPED != 0 {
            16
        } else {
            u32_at(r.payload, 4).map_or(16, |l| l as usize)
        };
        let tlvs = r
            .payload
            .get(4 + ((orig_len + 3) & !3)..)
            .unwrap_or_default();
        detail = nla(tlvs, NLMSGERR_ATTR_MSG)
            .map(cstr)
            .filter(|s| !s.is_empty());
    }
    Some((code, detail))
}
