//! `firewall.contain` and user namespaces: a contained uid must not step out of the gate by
//! creating a user namespace (in the host's network namespace) mapped onto the subordinate
//! ids `/etc/subuid` grants it, which is what `newuidmap`/`newgidmap` do for any user.
//!
//! The attack as the review reproduced it: the agent's process calls `unshare(CLONE_NEWUSER)`,
//! root writes its `uid_map`/`gid_map` (`0 <uid> 1` and `1 <first subordinate id> 65536`, as
//! `newuidmap` writes them), and the process calls `setuid(1000)` inside: its new sockets are
//! owned by kuid `first + 999`. The test's own `subuid`/`subgid` live in the lab's directory
//! (`firewall.contain.subids_from`), never in the host's `/etc`.
//!
//! Controls through the same tools: the agent without a namespace is contained, another uid
//! without a namespace and in a namespace mapped onto ids no file grants connects.

mod common;

use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output, Stdio};

use common::lab::{LabPolicy, dig_addresses, output_text};
use common::netns::*;
use common::require_root;
use common::tools::require_tool;
use nix::sched::{CloneFlags, setns, unshare};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

/// The agent: `nobody`, named by its user name in `subuid` (by uid in `subgid`), as
/// `useradd` writes entries.
const AGENT_UID: u32 = 65534;
const AGENT_NAME: &str = "nobody";
/// What the files grant the agent.
const AGENT_SUBIDS: u32 = 300_000;
/// An uncontained user, and ids no file grants anyone (its namespace's control).
const OTHER_UID: u32 = 4343;
const UNGRANTED_IDS: u32 = 500_000;
/// The id the process takes inside its namespace (kuid = first subordinate id + 999).
const INNER_ID: u32 = 1000;

/// An address dnsfence never hands out, with a listener behind it in `inet`.
const NOT_ADMITTED: &str = "198.51.100.20:80";
/// Another DNS server than dnsfence's upstream.
const OTHER_DNS: &str = "198.51.100.99";

fn policy(lab: &Lab) -> String {
    LabPolicy::new(lab)
        .allow(&["api.allowed.test"])
        .top("qtypes: [A, AAAA]\n")
        .firewall(&format!(
            "  hooks: [output]
  set_size: 4096
  contain:
    uids: [{AGENT_UID}]
    subids_from: \"{dir}\"
    # The controls ask their own resolver as uncontained processes; this test is about the
    # user namespace, not the host's DNS (tests/contain.rs covers host_dns).
    host_dns: direct
",
            dir = lab.dir.path().display(),
        ))
        .yaml()
}

/// How the process that runs `argv` is made, in the gateway's network namespace.
#[derive(Clone, Copy)]
enum As {
    /// `uid` (gid the same, no other groups), no user namespace.
    Plain(u32),
    /// `uid`, then a user namespace of its own whose ids 1.. root maps onto `first`..
    /// (`0 uid 1`, `1 first 65536` for both maps), then uid and gid [`INNER_ID`] inside.
    Namespaced { uid: u32, first: u32 },
}

/// Runs `argv` as `who` in the lab's gateway (where dnsfence's `output` chain is), waiting
/// for it (`argv` bounds its own time).
fn run(lab: &Lab, who: As, argv: &[&str]) -> Output {
    if let Some(program) = argv.first() {
        require_tool(program);
    }
    let netns = std::fs::File::open(lab.gw.path()).unwrap();
    let (uid, mapped) = match who {
        As::Plain(uid) => (uid, None),
        As::Namespaced { uid, first } => (uid, Some(first)),
    };
    // The child says "in its namespace" with its pid on `ready`; root writes its maps and
    // answers on `go` (a byte, or end of file when the maps could not be written).
    let (mut ready_r, ready_w) = std::io::pipe().unwrap();
    let (go_r, mut go_w) = std::io::pipe().unwrap();
    // The child's copy of the mapper's end: closed in the child, or it would never see end of
    // file on `go` when the mapper gives up.
    let mapper_end = go_w.as_raw_fd();
    let mapper = std::thread::spawn(move || -> Result<(), String> {
        let Some(first) = mapped else {
            return Ok(());
        };
        let mut pid = [0u8; 4];
        ready_r
            .read_exact(&mut pid)
            .map_err(|e| format!("the child never reached its namespace: {e}"))?;
        let pid = u32::from_ne_bytes(pid);
        for (file, id) in [("uid_map", uid), ("gid_map", uid)] {
            let map = format!("0 {id} 1\n1 {first} 65536\n");
            std::fs::write(format!("/proc/{pid}/{file}"), map)
                .map_err(|e| format!("writing {file} of {pid}: {e}"))?;
        }
        go_w.write_all(b"g").map_err(|e| e.to_string())
    });
    let mut command = Command::new(argv[0]);
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only system calls (nix wraps each one) on memory the
    // closure owns; nothing allocates or takes a lock.
    unsafe {
        command.pre_exec(move || {
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)?;
            setgroups(&[])?;
            setresgid(Gid::from_raw(uid), Gid::from_raw(uid), Gid::from_raw(uid))?;
            setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))?;
            if mapped.is_some() {
                nix::unistd::close(mapper_end)?;
                unshare(CloneFlags::CLONE_NEWUSER)?;
                let pid = nix::unistd::getpid().as_raw() as u32;
                nix::unistd::write(&ready_w, &pid.to_ne_bytes())?;
                let mut go = [0u8; 1];
                if nix::unistd::read(&go_r, &mut go)? != 1 {
                    return Err(std::io::Error::other("no uid_map was written"));
                }
                let inner = Gid::from_raw(INNER_ID);
                setresgid(inner, inner, inner)?;
                let inner = Uid::from_raw(INNER_ID);
                setresuid(inner, inner, inner)?;
            }
            Ok(())
        });
    }
    let spawned = command.spawn();
    // The closure (and with it the child's ends of the pipes) goes: a mapper still waiting
    // for a child that died reads end of file instead of waiting forever.
    drop(command);
    let mapper = mapper.join().unwrap();
    let child = spawned.unwrap_or_else(|e| panic!("starting {argv:?} as {uid}: {e}"));
    let out = child.wait_with_output().unwrap();
    if let Err(e) = mapper {
        panic!(
            "the user namespace could not be set up: {e}\n{}",
            output_text(&out)
        );
    }
    out
}

/// A TCP connect (perl, 0.8 s) from `who` to `to`.
fn connect(lab: &Lab, who: As, to: &str) -> Result<String, String> {
    // `$<` and `$(`: the ids the process has where it runs (inside its namespace), and the
    // kernel's owner of the socket is what the gate sees.
    let script = format!(
        "use IO::Socket::INET; IO::Socket::INET->new(PeerAddr => '{to}', Timeout => 0.8) \
         or do {{ print \"uid $< failed: $!\\n\"; exit 1 }}; print \"uid $< connected\\n\";"
    );
    let out = run(lab, who, &["timeout", "5", "perl", "-e", &script]);
    if out.status.success() {
        Ok(output_text(&out))
    } else {
        Err(output_text(&out))
    }
}

/// `dig` from `who`, asking `server` (UDP) for the A records of `name`.
fn dig(lab: &Lab, who: As, server: &str, name: &str) -> Result<Vec<String>, String> {
    let at = format!("@{server}");
    let argv = [
        "timeout", "5", "dig", &at, "+time=2", "+tries=1", "+short", name, "A",
    ];
    dig_addresses(&run(lab, who, &argv))
}

#[test]
fn a_contained_uid_stays_contained_in_a_user_namespace_mapped_onto_its_subordinate_ids() {
    if !require_root(
        "a_contained_uid_stays_contained_in_a_user_namespace_mapped_onto_its_subordinate_ids",
    ) {
        return;
    }
    require_tool("perl");
    let lab = Lab::new("userns1");
    std::fs::write(
        lab.dir.path().join("subuid"),
        format!("someone:100000:65536\n{AGENT_NAME}:{AGENT_SUBIDS}:65536\n"),
    )
    .unwrap();
    std::fs::write(
        lab.dir.path().join("subgid"),
        format!("{AGENT_UID}:{AGENT_SUBIDS}:65536\n"),
    )
    .unwrap();
    lab.upstream.a("api.allowed.test", "198.51.100.10", 300);
    lab.start_fence(&policy(&lab));
    let started = lab.fence_stderr();
    let last = AGENT_SUBIDS + 65535;
    assert!(
        started.contains(&format!(
            "(uids {AGENT_UID}; subuids {AGENT_SUBIDS}-{last}; subgids {AGENT_SUBIDS}-{last}; \
             firewall.contain)"
        )),
        "the start line must show the subordinate ids it contains:\n{started}"
    );

    // Controls: the agent as itself is contained; another user reaches the address, as
    // itself and from a namespace of its own (so the namespace itself is no obstacle).
    assert!(
        connect(&lab, As::Plain(AGENT_UID), NOT_ADMITTED).is_err(),
        "the contained uid reached an address dnsfence never handed out\n{}",
        lab.ruleset()
    );
    assert!(connect(&lab, As::Plain(OTHER_UID), NOT_ADMITTED).is_ok());
    let other_inside = connect(
        &lab,
        As::Namespaced {
            uid: OTHER_UID,
            first: UNGRANTED_IDS,
        },
        NOT_ADMITTED,
    );
    assert!(
        other_inside
            .as_ref()
            .is_ok_and(|said| said.contains(&format!("uid {INNER_ID} connected"))),
        "an uncontained uid in its own user namespace must connect: {other_inside:?}"
    );

    // The attack: the agent in a user namespace mapped onto what subuid grants it.
    let agent_inside = As::Namespaced {
        uid: AGENT_UID,
        first: AGENT_SUBIDS,
    };
    let escaped = connect(&lab, agent_inside, NOT_ADMITTED);
    assert!(
        escaped
            .as_ref()
            .is_err_and(|said| said.contains(&format!("uid {INNER_ID} failed"))),
        "the contained uid stepped out of the gate through a user namespace on its \
         subordinate ids: {escaped:?}\n{}",
        lab.ruleset()
    );
    // Its DNS is still intercepted: another server's question is answered by dnsfence.
    lab.other_dns4.a("api.allowed.test", "198.51.100.66", 300);
    assert_eq!(
        dig(&lab, agent_inside, OTHER_DNS, "api.allowed.test"),
        Ok(vec!["198.51.100.10".to_string()]),
        "the namespaced agent's DNS must be answered by dnsfence\n{}",
        lab.ruleset()
    );
    assert_eq!(
        dig(
            &lab,
            As::Namespaced {
                uid: OTHER_UID,
                first: UNGRANTED_IDS,
            },
            OTHER_DNS,
            "api.allowed.test"
        ),
        Ok(vec!["198.51.100.66".to_string()]),
        "an uncontained namespace's DNS goes where it sent it"
    );
}
