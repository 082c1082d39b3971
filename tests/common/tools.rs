//! The external programs the tests run, the Debian package of each, and the check every test
//! makes before running one.
//!
//! A test that runs a missing program must not pass because of it: `ping` that cannot start
//! "gets no reply", `dig` that cannot start "gets no answer", and a "must not reach" assertion
//! holds for the wrong reason. So every place that spawns a program calls [`require_tool`]
//! first, which panics (under `CI` or not: a missing tool is never a reason to skip) with the
//! package to install. [`TOOLS`] is the one list; `.ci/install-test-deps` installs exactly its
//! packages, and `tests/tools.rs` checks the two agree.
//!
//! This file uses only `std`: the unit tests under `src/` include it with `#[path]` too.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The script that installs every package of [`TOOLS`] (the README's test command runs it).
pub const INSTALL_SCRIPT: &str = ".ci/install-test-deps";

/// One program the tests run, and the Debian/Ubuntu package that ships it.
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

/// Every external program the test suite runs. Add a program here (and its package to
/// `.ci/install-test-deps`) before a test runs it: [`require_tool`] refuses unknown ones.
pub const TOOLS: &[Tool] = &[
    Tool {
        name: "ip",
        package: "iproute2",
    },
    Tool {
        name: "nft",
        package: "nftables",
    },
    Tool {
        name: "dig",
        package: "bind9-dnsutils",
    },
    Tool {
        name: "ping",
        package: "iputils-ping",
    },
    Tool {
        name: "setpriv",
        package: "util-linux",
    },
    Tool {
        name: "nsenter",
        package: "util-linux",
    },
    Tool {
        name: "sysctl",
        package: "procps",
    },
    Tool {
        name: "timeout",
        package: "coreutils",
    },
    Tool {
        name: "bash",
        package: "bash",
    },
    Tool {
        name: "perl",
        package: "perl-base",
    },
    Tool {
        name: "cp",
        package: "coreutils",
    },
    Tool {
        name: "docker",
        package: "docker.io",
    },
    Tool {
        name: "docker-compose",
        package: "docker-compose",
    },
    Tool {
        name: "debootstrap",
        package: "debootstrap",
    },
    Tool {
        name: "busybox",
        package: "busybox-static",
    },
    Tool {
        name: "file",
        package: "file",
    },
    Tool {
        name: "systemd-analyze",
        package: "systemd",
    },
    Tool {
        name: "qemu-system-x86_64",
        package: "qemu-system-x86",
    },
    Tool {
        name: "cpio",
        package: "cpio",
    },
    Tool {
        name: "ldd",
        package: "libc-bin",
    },
];

/// Where the program `name` is on `path` (a `PATH`-style list), the way `execvp` (and so
/// `std::process::Command`) looks it up: the first executable regular file of that name.
pub fn find_on(name: &str, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `Ok(())` when `name` can be started with `path` as `PATH`; otherwise the message a test
/// fails with: which program, which package, how to install it. Programs given by path (with
/// a `/`, like the dnsfence binary under test) are not looked up.
pub fn check_tool(name: &str, path: &OsStr) -> Result<(), String> {
    if name.contains('/') {
        return Ok(());
    }
    let Some(tool) = TOOLS.iter().find(|t| t.name == name) else {
        return Err(format!(
            "the tests run `{name}`, which is not in TOOLS (tests/common/tools.rs): add it there \
             with its Debian package, and the package to {INSTALL_SCRIPT}"
        ));
    };
    if find_on(name, path).is_some() {
        return Ok(());
    }
    let package = tool.package;
    let mut message = format!(
        "this test runs `{name}`, which is not on PATH ({}): install the Debian/Ubuntu package \
         `{package}` (`apt-get install {package}`, or `{INSTALL_SCRIPT}` for everything the \
         tests need)",
        path.to_string_lossy()
    );
    // `ip`, `nft` and `sysctl` live in sbin, which a non-root PATH often lacks.
    if let Some(there) = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|there| is_executable(there))
    {
        message.push_str(&format!(
            "; there is a {}: if that is it, its directory is missing from PATH (run the tests \
             as root, e.g. from `sudo -i`)",
            there.display()
        ));
    }
    Err(message)
}

/// Panics with [`check_tool`]'s message unless `name` can be started with this process's
/// `PATH`. Call it before spawning `name`, also inside a namespace (`ip netns exec` keeps
/// `PATH`).
pub fn require_tool(name: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Err(message) = check_tool(name, &path) {
        panic!("{message}");
    }
}

/// Every missing program of [`TOOLS`] with `path` as `PATH`, one message each.
pub fn missing_tools(path: &OsStr) -> Vec<String> {
    TOOLS
        .iter()
        .filter_map(|t| check_tool(t.name, path).err())
        .collect()
}
