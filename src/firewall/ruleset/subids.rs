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
//! The parser reads what `newuidmap` reads (shadow's `lib/subordinateio.c`), so that no range
//! it grants is missed: the whole file, line by line; a line of 1,024 bytes or more is
//! invalid there and skipped here; exactly three `:`-separated non-empty fields; numbers as C's
//! `strtoul` with base 0 reads them (`0x186a0` is hexadecimal, `0303240` octal, leading
//! blanks and `+` allowed, nothing after the digits); the owner by name, by the uid in
//! decimal, or by another name with the same uid. Where it cannot follow the file it
//! contains more, never less: owners and numbers are trimmed, a file larger than
//! [`MAX_FILE_BYTES`] is refused (the ruleset is not built), and a user's ranges are merged
//! and, beyond [`MAX_RANGES`], widened to one span. Malformed lines are skipped (as
//! `newuidmap` skips them) and counted in the start-up line.

use std::collections::HashMap;
use std::io::{BufReader, Read as _};
use std::path::Path;

/// The largest file read: real files are a few lines per user. A larger one is refused
/// rather than read in part (a range past the end would be uncontained).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// shadow's `subordinate_parse` refuses a line this long or longer.
const MAX_LINE_BYTES: usize = 1024;

/// Owner names looked up through NSS per file at most (an alias of a contained user: another
/// name with its uid); further names are looked up without being remembered.
const MAX_CACHED_NAMES: usize = 4096;

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
    let mut uid_of_name = |name: &str| {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    };
    for (file, ranges) in [("subuid", &mut out.uids), ("subgid", &mut out.gids)] {
        let path = dir.join(file);
        let Some(found) = read_file(&path, owners, &mut uid_of_name, MAX_FILE_BYTES)? else {
            continue;
        };
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

/// Reads and parses one file of at most `max_bytes`; `None` when it does not exist.
fn read_file(
    path: &Path,
    owners: &[Owner],
    uid_of_name: &mut dyn FnMut(&str) -> Option<u32>,
    max_bytes: u64,
) -> Result<Option<Found>, String> {
    let cannot = |e: std::io::Error| {
        format!(
            "firewall.contain: cannot read {} ({e}), so the subordinate ids it grants the \
             contained users could not be contained; make it readable, or point \
             firewall.contain.subids_from at the right directory",
            path.display()
        )
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cannot(e)),
    };
    let found = parse_from(
        BufReader::new(file.take(max_bytes.saturating_add(1))),
        owners,
        uid_of_name,
    )
    .map_err(cannot)?;
    if found.bytes > max_bytes {
        return Err(format!(
            "firewall.contain: {} is larger than {max_bytes} bytes; dnsfence reads it whole \
             (newuidmap does) and will not contain only part of it: shrink it",
            path.display()
        ));
    }
    Ok(Some(found))
}

struct Found {
    ranges: Vec<IdRange>,
    skipped: usize,
    bytes: u64,
}

/// The ranges of `owners` in one file's text (`owner:first:count` per line).
#[cfg(test)]
fn parse(text: &str, owners: &[Owner]) -> Found {
    let mut no_aliases = |_: &str| None;
    match parse_from(text.as_bytes(), owners, &mut no_aliases) {
        Ok(found) => found,
        Err(_) => Found {
            ranges: Vec::new(),
            skipped: 0,
            bytes: 0,
        },
    }
}

/// The ranges of `owners`, line by line from `reader`; a line is never held beyond
/// [`MAX_LINE_BYTES`].
fn parse_from(
    mut reader: impl std::io::BufRead,
    owners: &[Owner],
    uid_of_name: &mut dyn FnMut(&str) -> Option<u32>,
) -> std::io::Result<Found> {
    let mut found = Found {
        ranges: Vec::new(),
        skipped: 0,
        bytes: 0,
    };
    let mut names: HashMap<String, Option<u32>> = HashMap::new();
    let mut line = Vec::with_capacity(MAX_LINE_BYTES);
    loop {
        line.clear();
        let (read, complete) = read_line_bounded(&mut reader, &mut line)?;
        if read == 0 {
            break;
        }
        found.bytes += read as u64;
        if !complete {
            // As long as shadow's limit or longer: invalid there, so it grants nothing.
            found.skipped += 1;
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() || text.trim_start().starts_with('#') {
            continue;
        }
        let mut fields = text.split(':');
        let (Some(owner), Some(first), Some(count), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            found.skipped += 1;
            continue;
        };
        let (Some(first), Some(count)) = (c_ulong(first.trim_end()), c_ulong(count.trim_end()))
        else {
            found.skipped += 1;
            continue;
        };
        let Ok(first) = u32::try_from(first) else {
            // No kernel id starts there: newuidmap's map would be refused.
            found.skipped += 1;
            continue;
        };
        let owner = owner.trim();
        if owner.is_empty() {
            found.skipped += 1;
            continue;
        }
        let ours = owners
            .iter()
            .any(|o| o.name.as_deref() == Some(owner) || owner.parse::<u32>().ok() == Some(o.uid))
            || {
                // Another name with a contained user's uid (newuidmap's last try).
                let uid = match names.get(owner) {
                    Some(uid) => *uid,
                    None => {
                        let uid = if owner.bytes().all(|b| b.is_ascii_digit()) {
                            None
                        } else {
                            uid_of_name(owner)
                        };
                        if names.len() < MAX_CACHED_NAMES {
                            names.insert(owner.to_string(), uid);
                        }
                        uid
                    }
                };
                uid.is_some_and(|uid| owners.iter().any(|o| o.uid == uid))
            };
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
    Ok(found)
}

/// Reads one line into `line` (at most [`MAX_LINE_BYTES`] bytes kept; the rest of a longer
/// line is read and dropped). Returns the bytes consumed and whether the line was short
/// enough (shorter than shadow's limit, newline not counted).
fn read_line_bounded(
    reader: &mut impl std::io::BufRead,
    line: &mut Vec<u8>,
) -> std::io::Result<(usize, bool)> {
    let mut consumed = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = (MAX_LINE_BYTES + 1).saturating_sub(line.len());
        line.extend_from_slice(buf.get(..take.min(room)).unwrap_or_default());
        reader.consume(take);
        consumed += take;
        if done {
            break;
        }
    }
    let content = line.strip_suffix(b"\n").map_or(line.len(), <[u8]>::len);
    Ok((consumed, content < MAX_LINE_BYTES))
}

/// A number as C's `strtoul(s, &end, 0)` reads it, the whole field consumed (shadow's
/// `str2ul`): leading blanks, an optional `+`, then `0x`/`0X` hexadecimal, a leading `0`
/// octal, or decimal. `None` for anything else, a sign `-`, or more than 64 bits.
fn c_ulong(field: &str) -> Option<u64> {
    let s = field.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let s = s.strip_prefix('+').unwrap_or(s);
    let (digits, radix) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (hex, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
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
    fn numbers_are_read_as_newuidmap_reads_them() {
        // strtoul with base 0: hexadecimal and octal too, or a range newuidmap grants would
        // be left out (or the wrong one contained).
        let text = "alice:0x186a0:0x10000\n\
                    alice:0303240:010\n\
                    alice: +7:3\n\
                    alice:-1:5\n\
                    alice:0x:5\n\
                    alice:09:5\n\
                    alice:4294967296:5\n";
        let f = parse(text, &[owner(1000, "alice")]);
        assert_eq!(f.ranges, [r(100000, 165535), r(100000, 100007), r(7, 9)]);
        assert_eq!(f.skipped, 4);
        assert_eq!(c_ulong("18446744073709551615"), Some(u64::MAX));
        assert_eq!(c_ulong("18446744073709551616"), None);
        assert_eq!(c_ulong("0"), Some(0));
    }

    #[test]
    fn a_line_as_long_as_shadows_limit_is_skipped_and_the_next_one_read() {
        let long = format!("alice:1:1#{}\n", "x".repeat(MAX_LINE_BYTES));
        let text = format!("{long}alice:5:1\n");
        let f = parse(&text, &[owner(1000, "alice")]);
        assert_eq!(f.ranges, [r(5, 5)]);
        assert_eq!(f.skipped, 1);
        assert_eq!(f.bytes, text.len() as u64);
    }

    #[test]
    fn another_name_with_a_contained_uid_is_that_user() {
        let text = "alias:200000:10\nstranger:300000:10\n";
        let mut lookup = |name: &str| (name == "alias").then_some(1000);
        let f = parse_from(text.as_bytes(), &[owner(1000, "alice")], &mut lookup).unwrap();
        assert_eq!(f.ranges, [r(200000, 200009)]);
    }

    #[test]
    fn a_file_beyond_the_limit_is_refused_not_read_in_part() {
        let dir = tempfile_dir("big");
        let path = dir.join("subuid");
        std::fs::write(&path, "bob:1:1\nalice:5:1\n").unwrap();
        let mut none = |_: &str| None;
        let alice = [owner(1000, "alice")];
        let err = read_file(&path, &alice, &mut none, 10).err().unwrap();
        assert!(err.contains("larger than 10 bytes"), "{err}");
        // Control: within the limit it is read whole.
        let found = read_file(&path, &alice, &mut none, 18).unwrap().unwrap();
        assert_eq!(found.ranges, [r(5, 5)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(tag: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dnsfence-subids-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
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
