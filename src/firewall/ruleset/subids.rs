//! The subordinate ids of contained users (`/etc/subuid`, `/etc/subgid`), which the `output`
//! gate contains along with the users themselves.
//!
//! Why: a socket's owner (`meta skuid`, `meta skgid`) is the *kernel* id, the one in the
//! initial user namespace. A contained user (uid 1000) can create a user namespace without
//! creating a network namespace, and `newuidmap`/`newgidmap` (setuid root, from `uidmap`)
//! map into it the ranges `/etc/subuid` and `/etc/subgid` grant that user (`useradd` grants
//! `100000:65536` by default). After `setuid(1)` inside, its new sockets are owned by kuid
//! 100000 in the host's network namespace: a gate that only knew uid 1000 accepted them, and
//! the DNS interception skipped them too. So the gate also contains every range granted to a
//! contained user: `meta skuid != 1000 meta skuid != 100000-165535 … accept`.
//!
//! What `newuidmap` grants is decided by the files *when it runs*, so a range added to a
//! file later is uncontained until the ruleset is built again: the files are read every time
//! the ruleset is built (start, reload), never cached. An entry names its user by name or by
//! uid (`newuidmap` accepts both: `getpwuid(caller)` then either spelling), and a user may
//! have several entries; `/etc/subgid` is keyed by *user* too (the caller of `newgidmap`), so
//! both files are searched for the contained uids. Entries served by NSS (`subid:` in
//! `nsswitch.conf`, sssd or FreeIPA) are not in the files and not seen here (README: switch
//! user namespaces off, `user.max_user_namespaces=0`, where that matters).
//!
//! The parser is for a root-owned file but takes nothing for granted: at most
//! [`MAX_FILE_BYTES`] are read, malformed lines are skipped (as `newuidmap` skips them) and
//! counted, and a user's ranges are merged and, beyond [`MAX_RANGES`], widened to one span
//! (containing more, never less).

use std::io::Read as _;
use std::path::Path;

/// The most of one file that is read: real files are a few lines per user.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The most ranges one gate rule carries per file (each is three expressions); more are
/// widened to the single span from the lowest to the highest id, which contains more ids,
/// never fewer.
pub(crate) const MAX_RANGES: usize = 32;

/// The directory the files are read from when the policy does not say (`subids_from`).
pub(crate) const DEFAULT_DIR: &str = "/etc";

/// An inclusive range of ids: `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct IdRange {
    pub(crate) first: u32,
    pub(crate) last: u32,
}

impl std::fmt::Display for IdRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// The ranges granted to the contained users, from both files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Subordinate {
    pub(crate) uids: Vec<IdRange>,
    pub(crate) gids: Vec<IdRange>,
    /// What the start-up line should say besides the ranges (skipped lines, widening).
    pub(crate) notes: Vec<String>,
}

impl Subordinate {
    /// `subuids 100000-165535; subgids 100000-165535`, or empty.
    pub(crate) fn summary(&self) -> String {
        let list = |name: &str, r: &[IdRange]| {
            (!r.is_empty()).then(|| {
                let items: Vec<String> = r.iter().map(IdRange::to_string).collect();
                format!("{name} {}", items.join(","))
            })
        };
        [list("subuids", &self.uids), list("subgids", &self.gids)]
            .into_iter()
            .flatten()
            .chain(self.notes.iter().cloned())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A contained user as the files may name it: its uid, and its name if it has one.
pub(crate) struct Owner {
    pub(crate) uid: u32,
    pub(crate) name: Option<String>,
}

/// The contained users, named through NSS as `newuidmap` names its caller.
pub(crate) fn owners(uids: &[u32]) -> Vec<Owner> {
    uids.iter()
        .map(|&uid| Owner {
            uid,
            name: nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name),
        })
        .collect()
}

/// Reads `subuid` and `subgid` in `dir` for `owners`. A missing file grants nothing; a file
/// that exists but cannot be read is an error (the ruleset would leave its ranges open).
pub(crate) fn read(dir: &Path, owners: &[Owner]) -> Result<Subordinate, String> {
    let mut out = Subordinate::default();
    if owners.is_empty() {
        return Ok(out);
    }
    for (file, ranges) in [("subuid", &mut out.uids), ("subgid", &mut out.gids)] {
        let path = dir.join(file);
        let Some(text) = read_bounded(&path)? else {
            continue;
        };
        let found = parse(&text, owners);
        if text.len() as u64 >= MAX_FILE_BYTES {
            out.notes.push(format!(
                "{}: only the first {MAX_FILE_BYTES} bytes read",
                path.display()
            ));
        }
        if found.skipped > 0 {
            out.notes.push(format!(
                "{}: {} malformed line(s) skipped",
                path.display(),
                found.skipped
            ));
        }
        let (merged, widened) = merge(found.ranges);
        if widened {
            out.notes.push(format!(
                "{}: more than {MAX_RANGES} ranges, widened to one span",
                path.display()
            ));
        }
        *ranges = merged;
    }
    Ok(out)
}

fn read_bounded(path: &Path) -> Result<Option<String>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "firewall.contain: cannot read {} ({e}), so the subordinate ids it grants \
                 the contained users could not be contained; make it readable, or point \
                 firewall.contain.subids_from at the right directory",
                path.display()
            ));
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("firewall.contain: cannot read {}: {e}", path.display()))?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

struct Found {
    ranges: Vec<IdRange>,
    skipped: usize,
}

/// The ranges of `owners` in one file's text (`owner:first:count` per line).
fn parse(text: &str, owners: &[Owner]) -> Found {
    let mut found = Found {
        ranges: Vec::new(),
        skipped: 0,
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split(':');
        let (Some(owner), Some(first), Some(count), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            found.skipped += 1;
            continue;
        };
        let (Ok(first), Ok(count)) = (first.trim().parse::<u32>(), count.trim().parse::<u64>())
        else {
            found.skipped += 1;
            continue;
        };
        let owner = owner.trim();
        let ours = owners
            .iter()
            .any(|o| o.name.as_deref() == Some(owner) || owner.parse::<u32>().ok() == Some(o.uid));
        if !ours || count == 0 {
            continue;
        }
        // Past the last id the kernel has: contain up to it (more, never less).
        let last = u64::from(first)
            .saturating_add(count - 1)
            .min(u64::from(u32::MAX));
        found.ranges.push(IdRange {
            first,
            last: u32::try_from(last).unwrap_or(u32::MAX),
        });
        if found.ranges.len() > 4 * MAX_RANGES * owners.len().max(1) {
            // Merging below bounds the rule; this bounds the memory on the way there.
            let (merged, _) = merge(std::mem::take(&mut found.ranges));
            found.ranges = merged;
        }
    }
    found
}

/// Sorted, overlapping and adjacent ranges joined; beyond [`MAX_RANGES`], one span.
fn merge(mut ranges: Vec<IdRange>) -> (Vec<IdRange>, bool) {
    ranges.sort();
    let mut out: Vec<IdRange> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(prev) if u64::from(r.first) <= u64::from(prev.last) + 1 => {
                prev.last = prev.last.max(r.last);
            }
            _ => out.push(r),
        }
    }
    if out.len() > MAX_RANGES
        && let (Some(lo), Some(hi)) = (out.first(), out.last())
    {
        let span = IdRange {
            first: lo.first,
            last: hi.last,
        };
        return (vec![span], true);
    }
    (out, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(uid: u32, name: &str) -> Owner {
        Owner {
            uid,
            name: Some(name.to_string()),
        }
    }

    fn r(first: u32, last: u32) -> IdRange {
        IdRange { first, last }
    }

    #[test]
    fn entries_are_found_by_user_name_or_by_uid() {
        let text = "alice:100000:65536\n\
                    bob:165536:65536\n\
                    1000:300000:10\n\
                    # a comment\n\
                    \n\
                    1001:400000:5\n";
        let f = parse(text, &[owner(1000, "alice")]);
        assert_eq!(f.ranges, [r(100000, 165535), r(300000, 300009)]);
        assert_eq!(f.skipped, 0);
        // A user with no name (no passwd entry) is found by its uid only.
        let f = parse(
            text,
            &[Owner {
                uid: 1001,
                name: None,
            }],
        );
        assert_eq!(f.ranges, [r(400000, 400004)]);
    }

    #[test]
    fn malformed_lines_are_skipped_and_counted_never_a_panic() {
        let text = "alice\nalice:1\nalice:x:5\nalice:1:2:3\nalice:-1:5\nalice:5:-1\n\
                    alice:4294967295:18446744073709551615\nalice:10:0\nalice:7:3\n";
        let f = parse(text, &[owner(1000, "alice")]);
        // Past the last uid is clamped to it (contained), a zero count grants nothing.
        assert_eq!(f.ranges, [r(u32::MAX, u32::MAX), r(7, 9)]);
        assert_eq!(f.skipped, 6);
        // Bytes that are not UTF-8 arrive replaced and are skipped like any bad line.
        let bytes = String::from_utf8_lossy(b"alice:\xff\xfe:5\nalice:1:1\n").into_owned();
        assert_eq!(parse(&bytes, &[owner(1000, "alice")]).ranges, [r(1, 1)]);
    }

    #[test]
    fn ranges_are_merged_and_too_many_become_one_wider_span() {
        let (m, widened) = merge(vec![r(10, 20), r(21, 30), r(5, 12), r(40, 40)]);
        assert_eq!(m, [r(5, 30), r(40, 40)]);
        assert!(!widened);
        let many: Vec<IdRange> = (0..100u32).map(|i| r(i * 10, i * 10 + 1)).collect();
        let (m, widened) = merge(many);
        assert_eq!(m, [r(0, 991)]);
        assert!(widened);
    }

    #[test]
    fn files_are_read_from_the_directory_and_missing_ones_grant_nothing() {
        let dir = std::env::temp_dir().join(format!("dnsfence-subids-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("subuid"), "alice:100000:65536\n").unwrap();
        let s = read(&dir, &[owner(1000, "alice")]).unwrap();
        assert_eq!(s.uids, [r(100000, 165535)]);
        assert!(s.gids.is_empty(), "no subgid file: no ranges");
        assert_eq!(s.summary(), "subuids 100000-165535");
        std::fs::remove_dir_all(&dir).unwrap();
        let none = read(&dir, &[owner(1000, "alice")]).unwrap();
        assert_eq!(none, Subordinate::default());
    }
}
