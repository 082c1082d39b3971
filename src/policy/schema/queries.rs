//! `deny_with`, `qtypes`, `cname` and `https_hints`: how a query is answered.

use std::collections::HashMap;
use std::str::FromStr;

use hickory_proto::rr::RecordType;

use super::super::diagnostic::{Pos, Report, quote};
use super::super::raw::Node;
use super::super::read;
use super::super::{CnameMode, DenyWith, HintMode};

/// The query types allowed when `qtypes` is absent.
pub(crate) const DEFAULT_QTYPES: [RecordType; 4] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::CNAME,
    RecordType::HTTPS,
];

pub(super) fn deny_with(r: &mut Report, node: Option<&Node>) -> DenyWith {
    node.and_then(|n| {
        read::choice(
            r,
            n,
            "deny_with",
            &[
                ("nxdomain", DenyWith::NxDomain),
                ("refused", DenyWith::Refused),
            ],
        )
    })
    .unwrap_or(DenyWith::NxDomain)
}

pub(super) fn cname(r: &mut Report, node: Option<&Node>) -> CnameMode {
    node.and_then(|n| {
        read::choice(
            r,
            n,
            "cname",
            &[("follow", CnameMode::Follow), ("strict", CnameMode::Strict)],
        )
    })
    .unwrap_or(CnameMode::Follow)
}

pub(super) fn https_hints(r: &mut Report, node: Option<&Node>) -> HintMode {
    node.and_then(|n| {
        read::choice(
            r,
            n,
            "https_hints",
            &[("admit", HintMode::Admit), ("strip", HintMode::Strip)],
        )
    })
    .unwrap_or(HintMode::Admit)
}

pub(super) fn qtypes(r: &mut Report, node: Option<&Node>) -> Vec<RecordType> {
    let Some(node) = node else {
        return DEFAULT_QTYPES.to_vec();
    };
    let Some(items) = read::list(r, node, "qtypes") else {
        return DEFAULT_QTYPES.to_vec();
    };
    if items.is_empty() {
        r.error(
            node.pos,
            "qtypes is empty, so no query could be answered; list types such as [A, AAAA, CNAME, HTTPS]",
        );
    }
    let mut types: Vec<RecordType> = Vec::new();
    let mut seen: HashMap<RecordType, Pos> = HashMap::new();
    for item in items {
        let Some(word) = read::text(r, item, "a qtype") else {
            continue;
        };
        let upper = word.to_ascii_uppercase();
        match RecordType::from_str(&upper) {
            Ok(
                t @ (RecordType::ANY
                | RecordType::AXFR
                | RecordType::IXFR
                | RecordType::OPT
                | RecordType::TSIG),
            ) => r.error(
                item.pos,
                format!(
                    "qtype {} is a meta type whose answers cannot be filtered; \
                     list data types such as A, AAAA, CNAME, HTTPS",
                    quote(&t.to_string())
                ),
            ),
            Ok(t) => {
                if let Some(first) = seen.insert(t, item.pos) {
                    r.warn(
                        item.pos,
                        format!(
                            "qtype {t} is listed twice (also on line {}); remove one",
                            first.line
                        ),
                    );
                } else {
                    types.push(t);
                }
            }
            Err(_) => r.error(
                item.pos,
                format!(
                    "unknown qtype {}; write a record type name such as A, AAAA, CNAME, HTTPS, \
                     SVCB, TXT, MX",
                    quote(word)
                ),
            ),
        }
    }
    types
}
