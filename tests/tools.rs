//! The suite's own preconditions: every program the tests run is installed, the install script
//! installs exactly the packages the tests name, and a missing program fails a test with the
//! package to install (checked for real, with a `PATH` that lacks `ping`).

#[path = "common/tools.rs"]
mod tools;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use tools::{INSTALL_SCRIPT, TOOLS, check_tool, missing_tools, require_tool};

/// Set in the environment of the child run of [`child_requires_ping`].
const CHILD: &str = "DNSFENCE_TOOLS_CHILD";

/// A directory holding an executable stand-in for every tool but `without`.
fn path_without(without: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for tool in TOOLS.iter().filter(|t| t.name != without) {
        let file = dir.path().join(tool.name);
        std::fs::write(&file, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// The packages of the `packages=( ... )` list of the install script.
fn script_packages() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(INSTALL_SCRIPT);
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find("packages=(").expect("a packages=( list") + "packages=(".len();
    let end = start + text[start..].find("\n)").expect("the end of packages=(");
    text[start..end]
        .lines()
        .filter_map(|line| line.split('#').next())
        .flat_map(str::split_whitespace)
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_program_the_tests_run_is_installed() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing = missing_tools(&path);
    if missing.is_empty() {
        return;
    }
    // Only the tests that need root run these programs; unprivileged, outside CI, they skip.
    if !nix::unistd::Uid::effective().is_root() && std::env::var_os("CI").is_none() {
        eprintln!("skipping: not root, and missing:\n{}", missing.join("\n"));
        return;
    }
    panic!(
        "{} program(s) the tests run are missing:\n{}",
        missing.len(),
        missing.join("\n")
    );
}

#[test]
fn install_script_installs_exactly_the_packages_of_the_tools_the_tests_run() {
    let mut listed = script_packages();
    listed.sort();
    let mut wanted: Vec<String> = TOOLS.iter().map(|t| t.package.to_owned()).collect();
    wanted.sort();
    wanted.dedup();
    assert_eq!(listed, wanted, "{INSTALL_SCRIPT} against TOOLS");
}

#[test]
fn a_path_without_ping_names_ping_and_its_package() {
    let dir = path_without("ping");
    let path = OsString::from(dir.path());
    let missing = missing_tools(&path);
    assert_eq!(missing.len(), 1, "{missing:?}");
    let message = &missing[0];
    for part in [
        "`ping`",
        "not on PATH",
        "iputils-ping",
        "apt-get install iputils-ping",
        INSTALL_SCRIPT,
    ] {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
    // Control through the same lookup: the stand-ins are found, and so is ping once present.
    assert_eq!(check_tool("dig", &path), Ok(()));
    let full = path_without("no such tool");
    assert_eq!(missing_tools(full.path().as_os_str()), Vec::<String>::new());
}

#[test]
fn a_ping_that_cannot_be_executed_counts_as_missing() {
    let dir = path_without("ping");
    let ping = dir.path().join("ping");
    std::fs::write(&ping, "").unwrap();
    std::fs::set_permissions(&ping, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = check_tool("ping", dir.path().as_os_str()).unwrap_err();
    assert!(error.contains("iputils-ping"), "{error}");
}

#[test]
fn a_program_missing_from_the_list_is_refused() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let error = check_tool("curl", &path).unwrap_err();
    assert!(error.contains("not in TOOLS"), "{error}");
    // The binary under test, given by path, is not looked up.
    assert_eq!(check_tool(env!("CARGO_BIN_EXE_dnsfence"), &path), Ok(()));
}

/// Run as a child by [`a_test_run_without_ping_on_path_fails_naming_iputils_ping`]: the check
/// a test makes before it pings, with whatever `PATH` the parent gave.
#[test]
fn child_requires_ping() {
    if std::env::var_os(CHILD).is_some() {
        require_tool("ping");
        println!("CHILD: ping found");
    }
}

/// The real check in a real process whose `PATH` lacks `ping`: the test fails, and says which
/// package to install. The same child with a `ping` on its `PATH` passes (the control).
#[test]
fn a_test_run_without_ping_on_path_fails_naming_iputils_ping() {
    let run_child = |path: &Path| {
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_requires_ping", "--nocapture"])
            .env(CHILD, "1")
            .env("PATH", path)
            .output()
            .unwrap()
    };
    let without = path_without("ping");
    let out = run_child(without.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "passed without ping: {stdout}{stderr}"
    );
    assert!(
        stderr.contains("`ping`, which is not on PATH")
            && stderr.contains("apt-get install iputils-ping"),
        "no clear message: {stdout}{stderr}"
    );
    assert!(!stdout.contains("CHILD: ping found"), "{stdout}");

    let with = path_without("no such tool");
    let out = run_child(with.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("CHILD: ping found"),
        "control failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
