//! Revocation on the admission thread: deleting elements, and forgetting their lifetimes.
//!
//! Revocations go through the same queue and thread as admissions, so the two are ordered: an
//! admission queued before a revocation is committed before it, never after it.
//!
//! A delete of an element that is not in the set (it expired meanwhile) would abort the whole
//! transaction with `ENOENT`, so each element is first re-added with the shortest timeout and
//! then deleted, in the same transaction: the kernel commits a batch as one generation, so no
//! packet ever sees the re-added element. If the kernel still refuses (a full set cannot take
//! the re-add of an element that already expired), the elements are deleted one by one and the
//! missing ones skipped.
//!
//! Deleted elements are also forgotten by the lifetime map and by the acknowledgement cache:
//! otherwise an answer for another name that yields the same address would be taken as
//! already admitted and skip the kernel, or be re-added with the revoked name's longer lifetime.

use std::net::IpAddr;

use nix::errno::Errno;
use tokio::sync::oneshot;

use super::{Admission, Key, MIN_LIFETIME, millis, slot};
use crate::firewall::conntrack;
use crate::firewall::netlink::{Elem, NlError};
use crate::firewall::ruleset::{Family, element_key, normalize_ip};
use crate::firewall::{AdmitError, Revoked};

/// Elements per revocation transaction, at most (each costs an add and a delete).
const MAX_REVOKE_ELEMS: usize = 2048;

/// Delete these elements; with `cut`, also their connections.
pub(crate) struct RevokeRequest {
    /// (client, destination); the client is ignored unless sets are per client, where an entry
    /// without one is skipped.
    pub(crate) targets: Vec<(Option<IpAddr>, IpAddr)>,
    pub(crate) cut: bool,
    pub(crate) reply: oneshot::Sender<Result<Revoked, AdmitError>>,
}

impl Admission {
    pub(super) fn revoke(&mut self, request: RevokeRequest) {
        let RevokeRequest {
            targets,
            cut,
            reply,
        } = request;
        let per_client = self.cfg.per_client;
        let mut keys: Vec<(Key, Vec<u8>)> = Vec::with_capacity(targets.len());
        for (client, addr) in targets {
            let addr = normalize_ip(addr);
            let key: Key = if per_client {
                let Some(client) = client.map(normalize_ip) else {
                    continue;
                };
                if Family::of(client) != Family::of(addr) {
                    continue;
                }
                (Some(client), addr)
            } else {
                (None, addr)
            };
            if keys.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let client = key.0.unwrap_or(addr);
            if let Some(bytes) = element_key(per_client, client, addr) {
                keys.push((key, bytes));
            }
        }
        let result = self.delete(&keys).map(|elements| {
            let (connections, cut_error) = if cut {
                let targets: Vec<conntrack::Cut> = keys.iter().map(|(k, _)| *k).collect();
                match conntrack::cut(&targets) {
                    Ok(n) => (n, None),
                    Err(error) => (0, Some(error)),
                }
            } else {
                (0, None)
            };
            Revoked {
                elements,
                connections,
                cut_error,
            }
        });
        let _ = reply.send(result);
    }

    /// Deletes the elements; returns how many keys were asked for.
    fn delete(&mut self, keys: &[(Key, Vec<u8>)]) -> Result<usize, AdmitError> {
        for chunk in keys.chunks(MAX_REVOKE_ELEMS) {
            if let Err(error) = self.delete_together(chunk) {
                if !error.is_kernel() {
                    return Err(self.admit_error(&error));
                }
                tracing::debug!(target: "dnsfence::firewall", %error, "revocation refused as a whole; deleting one by one");
                for one in chunk {
                    self.delete_alone(one)?;
                }
            }
            self.forget(chunk);
        }
        Ok(keys.len())
    }

    fn delete_together(&mut self, keys: &[(Key, Vec<u8>)]) -> Result<(), NlError> {
        let mut batch = self.sock.begin(&self.cfg.table);
        for family in [Family::V4, Family::V6] {
            let of_family: Vec<&(Key, Vec<u8>)> = keys
                .iter()
                .filter(|(k, _)| Family::of(k.1) == family)
                .collect();
            if of_family.is_empty() {
                continue;
            }
            let elems: Vec<Elem<'_>> = of_family
                .iter()
                .map(|(_, bytes)| Elem {
                    key: bytes,
                    timeout_ms: millis(MIN_LIFETIME),
                })
                .collect();
            batch.add_elements(family.set_name(), &elems);
            let bytes: Vec<Vec<u8>> = of_family.iter().map(|(_, b)| b.clone()).collect();
            batch.del_elements(family.set_name(), &bytes);
        }
        self.sock.commit(batch)
    }

    fn delete_alone(&mut self, (key, bytes): &(Key, Vec<u8>)) -> Result<(), AdmitError> {
        let mut batch = self.sock.begin(&self.cfg.table);
        batch.del_elements(Family::of(key.1).set_name(), std::slice::from_ref(bytes));
        match self.sock.commit(batch) {
            Ok(()) => Ok(()),
            Err(error) if error.errno() == Some(Errno::ENOENT) => Ok(()),
            Err(error) => Err(self.admit_error(&error)),
        }
    }

    fn forget(&mut self, keys: &[(Key, Vec<u8>)]) {
        for (key, _) in keys {
            if let Some(map) = self.lifetimes.maps.get_mut(slot(key.1)) {
                map.remove(key);
            }
            if let Some(client) = key.0.map(super::share_key)
                && let Some(dests) = self.lifetimes.clients.get_mut(&client)
            {
                dests.remove(key);
                if dests.is_empty() {
                    self.lifetimes.clients.remove(&client);
                }
            }
        }
        if let Ok(mut acked) = self.confirmed.acked.lock() {
            for (key, _) in keys {
                acked.map.remove(key);
            }
        }
    }
}
