//! What the namespace-lab tests share beyond the lab itself (`netns.rs`): the policy they start
//! from, and how they talk to the dnsfence that runs in it (its control socket, its table, the
//! output of the programs they run there).
//!
//! Every lab policy has the same skeleton: dnsfence on some of the gateway's addresses, the
//! lab's upstream, a short upstream timeout, a few allowed names, the query log on stdout, and
//! the lab's own table (removed at exit, so a failed test leaves nothing behind). A test names
//! only what it is about ([`LabPolicy`]'s builder methods).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use super::BIN;
use super::netns::{Lab, addr};
use super::tools::require_tool;

/// A lab policy under construction; [`LabPolicy::yaml`] writes it.
#[derive(Debug, Clone)]
pub struct LabPolicy {
    listen: Vec<String>,
    upstream: String,
    allow: Vec<String>,
    top: String,
    control: Option<String>,
    table: String,
    firewall: String,
    tail: String,
}

impl LabPolicy {
    /// dnsfence on the gateway's address on agent1's link (`10.77.0.1:53`), the lab's
    /// upstream, nothing allowed yet, the lab's table on no hooks named yet.
    pub fn new(lab: &Lab) -> LabPolicy {
        LabPolicy {
            listen: vec!["10.77.0.1:53".to_owned()],
            upstream: addr::UPSTREAM.to_owned(),
            allow: Vec::new(),
            top: String::new(),
            control: None,
            table: lab.table(),
            firewall: String::new(),
            tail: String::new(),
        }
    }

    /// Listens on `addresses` instead.
    pub fn listen(mut self, addresses: &[&str]) -> LabPolicy {
        self.listen = addresses.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Allows `names` (rules, as `allow:` takes them).
    pub fn allow(mut self, names: &[&str]) -> LabPolicy {
        self.allow = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// Top-level lines (each ending in a newline): `qtypes`, `ttl`, `limits`, ...
    pub fn top(mut self, lines: &str) -> LabPolicy {
        self.top.push_str(lines);
        self
    }

    /// The control socket in the lab's directory ([`Lab::control_socket`]); `lines` go under
    /// `control:` after it (`  allow_uids: [0]\n`).
    pub fn control(mut self, lab: &Lab, lines: &str) -> LabPolicy {
        self.control = Some(format!(
            "  socket: \"{}\"\n{lines}",
            lab.control_socket().display()
        ));
        self
    }

    /// Lines under `firewall:` (indented by two, each ending in a newline): `hooks`,
    /// `contain`, `per_client`, ...
    pub fn firewall(mut self, lines: &str) -> LabPolicy {
        self.firewall.push_str(lines);
        self
    }

    /// Lines at the end, after `firewall` (other top-level sections).
    pub fn tail(mut self, lines: &str) -> LabPolicy {
        self.tail.push_str(lines);
        self
    }

    /// The policy file's text.
    pub fn yaml(&self) -> String {
        let quoted = |items: &[String]| -> Vec<String> {
            items.iter().map(|i| format!("\"{i}\"")).collect()
        };
        let allow: String = self
            .allow
            .iter()
            .map(|name| format!("  - \"{name}\"\n"))
            .collect();
        let allow = if allow.is_empty() {
            "allow: []\n".to_owned()
        } else {
            format!("allow:\n{allow}")
        };
        let control = self
            .control
            .as_ref()
            .map(|lines| format!("control:\n{lines}"))
            .unwrap_or_default();
        format!(
            "listen: [{listen}]\nupstreams: [\"{upstream}\"]\nupstream_timeout: 2s\n{allow}{top}\
             log: \"-\"\n{control}firewall:\n  table: {table}\n  on_exit: remove\n{firewall}{tail}",
            listen = quoted(&self.listen).join(", "),
            upstream = self.upstream,
            top = self.top,
            table = self.table,
            firewall = self.firewall,
            tail = self.tail,
        )
    }
}

/// A finished program's stdout and stderr, in that order, as text.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The addresses `dig +short` printed, or everything it said when it got no answer (it
/// prints `;;` lines then, and may still exit 0).
pub fn dig_addresses(out: &Output) -> Result<Vec<String>, String> {
    let said = output_text(out);
    if !out.status.success() || said.contains(";;") {
        return Err(said);
    }
    Ok(said.lines().map(str::to_owned).collect())
}

impl Lab {
    /// Where the lab policies put dnsfence's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Replaces the policy file the way editors and ConfigMaps do: write aside, rename over.
    pub fn write_policy(&self, text: &str) {
        let tmp = self.dir.path().join(".policy.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.policy_path()).unwrap();
    }

    /// `dnsfence ctl --socket <the lab's> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(["ctl", "--socket"])
            .arg(self.control_socket())
            .args(args)
            .output()
            .unwrap()
    }

    /// `nft -t list table inet <table>` in the gateway: the ruleset, without set elements.
    pub fn table_text(&self) -> String {
        require_tool("nft");
        let out = self.gw.exec(
            Duration::from_secs(10),
            &["nft", "-t", "list", "table", "inet", &self.table()],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
