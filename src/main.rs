//! The `dnsfence` command line: `serve`, `check`, `explain`, `ruleset`, `firewall` and `ctl`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hickory_proto::rr::{Name, RecordType};

use dnsfence::adopt::{audit, logfile, replay, suggest, why};
use dnsfence::control::socket::ControlSocket;
use dnsfence::control::source::{Overrides, PolicySource};
use dnsfence::control::{self, Control, Trigger};
use dnsfence::explain::{DropExplainer, Explainer};
use dnsfence::firewall::{self, Firewall};
use dnsfence::health::Readiness;
use dnsfence::metrics::{Metrics, serve_metrics};
use dnsfence::pipeline::decision::{Decision, decide};
use dnsfence::pipeline::upstream::Upstreams;
use dnsfence::pipeline::{Generation, Pipeline};
use dnsfence::policy::{DEFAULT_CONTROL_SOCKET, Mode, Policy};
use dnsfence::querylog::QueryLog;
use dnsfence::server;
use dnsfence::service_manager;

/// A filtering DNS resolver that contains the network egress of AI agents.
///
/// dnsfence answers only names on a policy's allowlist, by forwarding them to a trusted
/// upstream, answers everything else locally without forwarding it, and admits every address it
/// hands out to an nftables set before the answer leaves, so a default-drop firewall lets
/// agents reach exactly what dnsfence resolved for them.
#[derive(Parser)]
#[command(name = "dnsfence", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the resolver (UDP and TCP on every listen address) until SIGTERM or SIGINT.
    #[command(after_help = "Examples:
  dnsfence serve --policy policy/default.yaml
  dnsfence serve --policy /etc/dnsfence/agent.yaml --listen 127.0.0.1:53 --listen [::1]:53
  dnsfence serve --policy policy/default.yaml --log /var/log/dnsfence/queries.jsonl
  dnsfence serve --policy policy/default.yaml --mode audit --audit-for 24h
  dnsfence serve --policy /etc/dnsfence/agent.yaml --watch

Change the policy while it runs: edit the file, then `kill -HUP <pid>` or `dnsfence ctl reload`
(or run with --watch); see `dnsfence ctl --help`.

The query log has one JSON object per line; see the deny decisions with:
  dnsfence serve --policy policy/default.yaml | jq 'select(.decision==\"deny\")'

Operational messages go to stderr; set DNSFENCE_LOG (e.g. DNSFENCE_LOG=debug) to change their level.")]
    Serve {
        /// Policy file (YAML).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// Address to serve on, UDP and TCP; repeat for several. Overrides the policy's `listen`.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Vec<SocketAddr>,
        /// Query log: a file path to append to, or - for stdout. Overrides the policy's `log`.
        #[arg(long, value_name = "PATH|-")]
        log: Option<String>,
        /// enforce, or audit: forward and admit what the policy denies (for `policy`, `qtype`
        /// or `exfiltration-budget`), logged as `"decision":"deny","audit":true`. Audit needs
        /// an end: the policy's `audit.until` or --audit-for. Overrides the policy's `mode`.
        #[arg(long, value_enum)]
        mode: Option<CliMode>,
        /// Audit for this long from now (e.g. 30m, 24h, 7d), then enforce without a restart.
        /// Implies --mode audit.
        #[arg(long, value_name = "DURATION", value_parser = parse_cli_duration)]
        audit_for: Option<std::time::Duration>,
        /// Reload the policy whenever the file's content changes (checked every second; works
        /// with editors that replace the file and with Kubernetes ConfigMap symlink swaps).
        #[arg(long)]
        watch: bool,
    },
    /// Validate a policy file: exit 0 when valid, 1 with every error (file:line:column) when not.
    #[command(after_help = "Examples:
  dnsfence check --policy policy/default.yaml
  dnsfence check --policy new.yaml && sudo systemctl restart dnsfence")]
    Check {
        /// Policy file (YAML).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
    },
    /// Print the decision the server would take for one query: allow (with the rule) or deny
    /// (with the reason). Exit 0 for allow, 1 for deny, 2 for an error.
    #[command(after_help = "Examples:
  dnsfence explain --policy policy/default.yaml pypi.org
  dnsfence explain --policy policy/research-agent.yaml --client 10.200.0.7 api.openai.com AAAA
  dnsfence explain --policy policy/default.yaml example.com TXT")]
    Explain {
        /// Policy file (YAML).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// Source address of the client asking (selects its client group).
        #[arg(long, value_name = "IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
        client: IpAddr,
        /// The name asked for (Unicode names are converted to A-labels).
        name: String,
        /// The query type.
        #[arg(default_value = "A")]
        qtype: String,
    },
    /// Why may (or may not) a client reach an address? Which names resolved to it, for whom,
    /// when, and until when the firewall admitted it: from the running server (its control
    /// socket), or offline from query logs (--log). Exit 0 when some name resolved to it, 1
    /// when none did (a hard-coded address), 2 for an error.
    #[command(after_help = "Examples:
  dnsfence why 198.51.100.20
  dnsfence why 198.51.100.20 --client 10.200.0.7 --policy /etc/dnsfence/agent.yaml
  dnsfence why 198.51.100.20 --log /var/log/dnsfence/queries.jsonl
  dnsfence why 198.51.100.20 --client 10.200.0.7 --log queries.jsonl --policy agent.yaml

Without --log the running server answers, over --socket PATH, else the policy's
control.socket (--policy FILE), else /run/dnsfence/control.sock; it also says how a dropped
packet to the address would be explained (never-resolved, expired, revoked, other-client).")]
    Why {
        /// The destination address in question.
        ip: IpAddr,
        /// Only answers given to this client.
        #[arg(long, value_name = "IP")]
        client: Option<IpAddr>,
        /// Query log to read instead of asking the server; repeat for several.
        #[arg(long, value_name = "FILE", conflicts_with = "socket")]
        log: Vec<PathBuf>,
        /// The running server's control socket.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// With --log: the policy in force, for the firewall's lifetimes (ttl.min, ttl.max,
        /// ttl.grace). Without: take the socket path from its control.socket.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
    /// Print the allow rules a query log asks for, as a YAML fragment to review and merge into
    /// the policy: per client group, each rule with its evidence, names that look like data or
    /// exceed the exfiltration limits listed as not suggested.
    #[command(after_help = "Examples:
  dnsfence suggest --log /var/log/dnsfence/queries.jsonl
  dnsfence suggest --log queries.jsonl --log queries.jsonl.1 --policy agent.yaml --since 7d

Exact names by default; `*.parent` only for 3 or more names one label below a parent that is
not a public suffix nor a multi-tenant one; never `**.`. Then review the change with replay.")]
    Suggest {
        /// Query log to read (JSON lines, from audit or enforce mode); repeat for several.
        #[arg(long, value_name = "FILE", required = true)]
        log: Vec<PathBuf>,
        /// The policy in force: names it allows are left out, groups and limits come from it.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Only queries this recent (e.g. 12h, 7d).
        #[arg(long, value_name = "DURATION", value_parser = parse_cli_duration)]
        since: Option<std::time::Duration>,
    },
    /// Run the queries of a log through a policy, with the decision code `serve` and `explain`
    /// use, and print every name whose decision would change. Exit 0 when nothing allowed
    /// would be denied, 1 when something would, 2 for an error.
    #[command(after_help = "Examples:
  dnsfence replay --log /var/log/dnsfence/queries.jsonl --policy new.yaml
  dnsfence replay --log queries.jsonl --policy new.yaml && sudo systemctl reload dnsfence")]
    Replay {
        /// Query log to read; repeat for several.
        #[arg(long, value_name = "FILE", required = true)]
        log: Vec<PathBuf>,
        /// The policy to judge the past queries by.
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
    },
    /// Print, as an nft script, the ruleset `serve` installs for this policy (review it, diff it,
    /// or load it yourself with `nft -f`).
    #[command(after_help = "Examples:
  dnsfence ruleset --policy policy/research-agent.yaml
  dnsfence ruleset --policy policy/research-agent.yaml | nft -c -f -")]
    Ruleset {
        /// Policy file (YAML).
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
    },
    /// Inspect or remove the nftables table dnsfence installed (in this network namespace).
    Firewall {
        #[command(subcommand)]
        action: FirewallAction,
    },
    /// Talk to a running dnsfence over its control socket: status, readiness, reload,
    /// temporary grants. Exit 0 when done, 1 when refused or failed (or not ready), 2 when the
    /// socket cannot be reached.
    #[command(after_help = "Examples:
  dnsfence ctl status
  dnsfence ctl ready && echo serving
  dnsfence ctl --policy /etc/dnsfence/agent.yaml reload
  dnsfence ctl grant files.pythonhosted.org --ttl 30s --reason \"pip install for task 42\"
  dnsfence ctl grant '*.s3.amazonaws.com' --ttl 5m --group builders --reason \"artifact upload\" --force
  dnsfence ctl grants
  dnsfence ctl revoke g3
  curl --unix-socket /run/dnsfence/control.sock http://dnsfence/v1/status

The socket is --socket PATH, else the policy's control.socket (--policy FILE), else
/run/dnsfence/control.sock.")]
    Ctl {
        /// The control socket.
        #[arg(long, value_name = "PATH", conflicts_with = "policy")]
        socket: Option<PathBuf>,
        /// Take the socket path from this policy's `control.socket`.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Print the server's JSON answer as it is.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum FirewallAction {
    /// Show the table: its default-drop hooks, its sets with their element counts and sizes
    /// (read over netlink: fast even on sets `nft list` takes minutes to print), and whether a
    /// `dnsfence serve` is running. Exit 0 when the table is installed, 1 when not, 2 on error.
    #[command(after_help = "Examples:
  dnsfence firewall status
  dnsfence firewall status --policy /etc/dnsfence/agent.yaml
  sudo ip netns exec gw dnsfence firewall status --table dnsfence")]
    Status {
        #[command(flatten)]
        table: TableArg,
    },
    /// Delete the table (and its `bridge` companion of `firewall.bind`): every default-drop
    /// chain, binding and admitted address go with it, and the host's egress is open again. Exit 0 when removed, 1 when there was none, 2 on error.
    #[command(after_help = "Examples:
  dnsfence firewall remove
  dnsfence firewall remove --policy /etc/dnsfence/agent.yaml
  dnsfence firewall remove --table dnsfence_test")]
    Remove {
        #[command(flatten)]
        table: TableArg,
    },
    /// Ask this kernel whether re-adding a set element refreshes its timeout (Linux 6.12 and
    /// later) and try both refresh paths through the admission thread, in scratch tables
    /// without chains that are deleted afterwards. Exit 0 when the path dnsfence chooses
    /// extends a lifetime here, 1 when it does not, 2 on error. Used by tests/old_kernel.rs.
    #[command(hide = true)]
    Probe,
}

/// Which table: the policy's `firewall.table`, a name, or the default `dnsfence`.
#[derive(clap::Args)]
struct TableArg {
    /// Policy file whose `firewall.table` to use.
    #[arg(long, value_name = "FILE", conflicts_with = "table")]
    policy: Option<PathBuf>,
    /// Table name (`table inet NAME`); the default is `dnsfence`.
    #[arg(long, value_name = "NAME")]
    table: Option<String>,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// The server's state: policy, readiness, reloads, grants.
    Status,
    /// Exit 0 when the server is ready (policy loaded, ruleset installed, listeners bound),
    /// 1 when not.
    Ready,
    /// Reload the policy file; exit 1 with every error (FILE:LINE:COLUMN) if it is invalid or
    /// changes keys that need a restart (the running policy keeps serving).
    Reload,
    /// Allow NAME for a while on top of the policy; prints the grant's id and expiry.
    Grant {
        /// A rule in the policy's grammar: `name`, `*.name` or `**.name`.
        name: String,
        /// How long, e.g. 30s, 5m (at most the policy's grants.max_ttl).
        #[arg(long)]
        ttl: String,
        /// Only for this client address.
        #[arg(long, value_name = "IP", conflicts_with = "group")]
        client: Option<IpAddr>,
        /// Only for this client group.
        #[arg(long, value_name = "G")]
        group: Option<String>,
        /// Why (goes to the query log).
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// Accept a `**.` rule or a wildcard over a multi-tenant suffix.
        #[arg(long)]
        force: bool,
    },
    /// List the active grants.
    Grants,
    /// End a grant now (its name is denied again, the addresses only it justified revoked).
    Revoke {
        /// The grant's id, as `grant` printed it (g12).
        id: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CliMode {
    Enforce,
    Audit,
}

fn parse_cli_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text)
        .map_err(|error| format!("{error}; write a duration such as 30m, 24h or 7d"))
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            policy,
            listen,
            log,
            mode,
            audit_for,
            watch,
        } => exit_with(serve(&policy, listen, log, mode, audit_for, watch)),
        Command::Ctl {
            socket,
            policy,
            json,
            command,
        } => ctl(socket, policy, json, command),
        Command::Check { policy } => check(&policy),
        Command::Explain {
            policy,
            client,
            name,
            qtype,
        } => explain(&policy, client, &name, &qtype),
        Command::Suggest { log, policy, since } => {
            exit_with(suggest(&log, policy.as_deref(), since))
        }
        Command::Replay { log, policy } => replay(&log, &policy),
        Command::Why {
            ip,
            client,
            log,
            socket,
            policy,
        } => {
            if log.is_empty() {
                why_live(ip, client, socket, policy)
            } else {
                why_reachable(ip, client, &log, policy.as_deref())
            }
        }
        Command::Ruleset { policy } => match load_policy(&policy) {
            Ok(policy) => {
                print!("{}", firewall::render_nft(&policy));
                ExitCode::SUCCESS
            }
            Err(message) => exit_with(Err(message)),
        },
        Command::Firewall { action } => firewall_command(action),
    }
}

fn table_name(arg: &TableArg) -> Result<String, String> {
    let name = match (&arg.policy, &arg.table) {
        (Some(policy), _) => load_policy(policy)?.firewall.table,
        (None, Some(table)) => table.clone(),
        (None, None) => dnsfence::policy::FirewallPolicy::default().table,
    };
    firewall::check_table_name(&name)?;
    Ok(name)
}

fn firewall_command(action: FirewallAction) -> ExitCode {
    let (arg, remove) = match &action {
        FirewallAction::Status { table } => (table, false),
        FirewallAction::Remove { table } => (table, true),
        FirewallAction::Probe => return firewall_probe(),
    };
    let table = match table_name(arg) {
        Ok(table) => table,
        Err(message) => return exit_with(Err(message)),
    };
    let running = firewall::running_servers();
    let running_text = if running.is_empty() {
        "no dnsfence serve is running in this network namespace".to_string()
    } else {
        let pids: Vec<String> = running.iter().map(u32::to_string).collect();
        format!("dnsfence serve is running (pid {})", pids.join(", "))
    };
    if remove {
        return match firewall::remove_table(&table) {
            Ok(true) => {
                println!(
                    "removed table inet {table} (and table bridge {table}, if it was there): \
                     egress is no longer filtered by dnsfence"
                );
                if !running.is_empty() {
                    eprintln!(
                        "warning: {running_text}: it can no longer admit addresses and answers \
                         SERVFAIL until it is restarted"
                    );
                }
                ExitCode::SUCCESS
            }
            Ok(false) => {
                println!("table inet {table} is not installed: nothing to remove");
                ExitCode::FAILURE
            }
            Err(error) => exit_with(Err(error.to_string())),
        };
    }
    match firewall::table_status(&table) {
        Ok(Some(status)) => {
            println!("table inet {table}: installed");
            let drops = status.drop_hooks();
            if drops.is_empty() {
                println!("  default drop: no hook");
            } else {
                println!("  default drop: {}", drops.join(", "));
            }
            for chain in status.chains.iter().filter(|c| !c.drops) {
                println!(
                    "  also: chain {} on {} (policy accept)",
                    chain.name, chain.hook
                );
            }
            for set in &status.sets {
                let size = set
                    .size
                    .map_or_else(|| "no size".to_string(), |s| s.to_string());
                println!(
                    "  set {}: {} elements (size {size})",
                    set.name, set.elements
                );
            }
            match firewall::bridge_status(&table) {
                Ok(Some((ports, rules))) => println!(
                    "table bridge {table}: installed (firewall.bind): {} bound to their \
                     sources ({rules} rules): {}",
                    if ports.len() == 1 { "1 port" } else { "ports" },
                    ports.join(", ")
                ),
                Ok(None) => println!(
                    "table bridge {table}: not installed (no firewall.bind: no bridge port is \
                     bound to its sources)"
                ),
                Err(error) => println!("table bridge {table}: cannot be read: {error}"),
            }
            println!("  {running_text}");
            println!("  remove it with: dnsfence firewall remove --table {table}");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            println!("table inet {table}: not installed ({running_text})");
            ExitCode::FAILURE
        }
        Err(error) => exit_with(Err(error.to_string())),
    }
}

/// `dnsfence firewall probe`: one `key: value` line per finding, for people and for the
/// old-kernel test, which parses them from a guest's serial console.
fn firewall_probe() -> ExitCode {
    let probe = match firewall::probe_kernel() {
        Ok(probe) => probe,
        Err(error) => return exit_with(Err(error.to_string())),
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_string(), |r| r.trim().to_string());
    let seconds = |d: Option<std::time::Duration>| {
        d.map_or_else(|| "none".to_string(), |d| d.as_secs().to_string())
    };
    println!("kernel: {kernel}");
    println!(
        "readd refreshes timeout: {}",
        if probe.readd_refreshes_timeout {
            "yes"
        } else {
            "no"
        }
    );
    println!("chosen refresh: {}", probe.chosen.name());
    let mut chosen_extends = false;
    for check in &probe.checks {
        println!(
            "refresh {}: admitted {} s then {} s: timeout {} s, expires in {} s: {}",
            check.path.name(),
            firewall::CHECK_FIRST.as_secs(),
            firewall::CHECK_LONGER.as_secs(),
            seconds(check.timeout),
            seconds(check.expires_in),
            if check.extended() {
                "extended"
            } else {
                "not extended"
            }
        );
        if check.path == probe.chosen {
            chosen_extends = check.extended();
        }
    }
    if chosen_extends {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "dnsfence: on this kernel the {} path does not extend an element's lifetime",
            probe.chosen.name()
        );
        ExitCode::FAILURE
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DNSFENCE_LOG").unwrap_or_else(|_| {
        // hickory logs a line or two per request at info: keep those out of operations logs.
        tracing_subscriber::EnvFilter::new(
            "info,hickory_server=warn,hickory_net=warn,hickory_proto=warn",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn exit_with(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("dnsfence: {message}");
            ExitCode::from(2)
        }
    }
}

fn load_policy(path: &Path) -> Result<Policy, String> {
    let policy = Policy::load(path).map_err(|error| error.to_string())?;
    for warning in &policy.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(policy)
}

fn check(path: &Path) -> ExitCode {
    match Policy::load(path) {
        Ok(policy) => {
            for warning in &policy.warnings {
                eprintln!("warning: {warning}");
            }
            let mut host_warnings = dnsfence::firewall::shared_link::warnings(&policy);
            // This host's side of firewall.contain, decided as serve decides it.
            match dnsfence::firewall::contain_host_warnings(&policy) {
                Ok(warnings) => host_warnings.extend(warnings),
                Err(error) => {
                    eprintln!("{}: {error}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            for warning in &host_warnings {
                eprintln!("warning: {warning}");
            }
            let rules: usize = std::iter::once(&policy.default_group)
                .chain(&policy.clients)
                .map(|group| group.rules.len())
                .sum();
            println!(
                "{}: valid ({rules} rules, {} client groups, {} warnings)",
                path.display(),
                policy.clients.len(),
                policy.warnings.len() + host_warnings.len()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn suggest(
    logs: &[PathBuf],
    policy: Option<&Path>,
    since: Option<std::time::Duration>,
) -> Result<(), String> {
    let policy = policy.map(load_policy).transpose()?;
    let since = since.and_then(|d| std::time::SystemTime::now().checked_sub(d));
    let read = logfile::read_logs(logs, since)?;
    let suggestion = suggest::suggest(&read.queries, policy.as_ref());
    let shown: Vec<String> = logs.iter().map(|l| l.display().to_string()).collect();
    let mut header = format!(
        "dnsfence suggest: additions from {} queries in {}",
        read.queries.len(),
        shown.join(", ")
    );
    if let Some(policy) = &policy {
        header.push_str(&format!(
            "\nnames {} already allows are left out",
            policy.source.display()
        ));
    }
    header.push_str(
        "\nmerge each list into the same list of your policy, review every name (each one can \
         receive data from the agent),\nthen check the result with `dnsfence replay --policy NEW`",
    );
    print!("{}", suggestion.to_yaml(&header));
    if read.skipped > 0 {
        eprintln!(
            "suggest: {} lines were not query records and were skipped",
            read.skipped
        );
    }
    Ok(())
}

fn replay(logs: &[PathBuf], path: &Path) -> ExitCode {
    let policy = match load_policy(path) {
        Ok(policy) => policy,
        Err(message) => return exit_with(Err(message)),
    };
    let read = match logfile::read_logs(logs, None) {
        Ok(read) => read,
        Err(message) => return exit_with(Err(message)),
    };
    let replayed = replay::replay(&read.queries, &policy);
    print!("{}", replayed.report(&policy));
    if replayed.newly_denied() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The control socket a client command talks to: `--socket`, else the policy's
/// `control.socket`, else the default. `None` (after saying why) when the policy cannot be read:
/// exit 2, like an unreachable socket.
fn control_socket_path(
    command: &str,
    socket: Option<PathBuf>,
    policy: Option<PathBuf>,
) -> Option<PathBuf> {
    match (socket, policy) {
        (Some(socket), _) => Some(socket),
        (None, Some(policy)) => match Policy::load(&policy) {
            Ok(policy) => Some(policy.control.socket),
            Err(error) => {
                eprintln!(
                    "dnsfence {command}: cannot take the socket path from the policy:\n{error}"
                );
                None
            }
        },
        (None, None) => Some(PathBuf::from(DEFAULT_CONTROL_SOCKET)),
    }
}

/// `why` answered by the running server.
fn why_live(
    ip: IpAddr,
    client: Option<IpAddr>,
    socket: Option<PathBuf>,
    policy: Option<PathBuf>,
) -> ExitCode {
    let Some(socket) = control_socket_path("why", socket, policy) else {
        return ExitCode::from(2);
    };
    let path = match client {
        Some(client) => format!("/v1/why/{ip}/{client}"),
        None => format!("/v1/why/{ip}"),
    };
    let answer = match control::client::call(&socket, "GET", &path, None) {
        control::client::Answer::Done(answer) => answer,
        control::client::Answer::Refused(status, body) => {
            eprintln!(
                "dnsfence why: {} (HTTP {status})",
                body["error"].as_str().unwrap_or("request failed")
            );
            return ExitCode::from(2);
        }
        control::client::Answer::Unreachable(message) => {
            eprintln!("dnsfence why: {message}; or read query logs with --log FILE");
            return ExitCode::from(2);
        }
    };
    print!("{}", why::report_live(&answer));
    let known = answer["admissions"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
        || answer["revoked"].as_array().is_some_and(|a| !a.is_empty());
    if known {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn why_reachable(
    ip: IpAddr,
    client: Option<IpAddr>,
    logs: &[PathBuf],
    policy: Option<&Path>,
) -> ExitCode {
    let policy = match policy.map(load_policy).transpose() {
        Ok(policy) => policy,
        Err(message) => return exit_with(Err(message)),
    };
    let read = match logfile::read_logs(logs, None) {
        Ok(read) => read,
        Err(message) => return exit_with(Err(message)),
    };
    let found = why::why(&read.queries, ip, client, policy.as_ref().map(|p| &p.ttl));
    print!(
        "{}",
        why::report(
            ip,
            client,
            &found,
            std::time::SystemTime::now(),
            policy.is_some()
        )
    );
    if found.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn explain(path: &Path, client: IpAddr, name: &str, qtype: &str) -> ExitCode {
    let policy = match load_policy(path) {
        Ok(policy) => policy,
        Err(message) => return exit_with(Err(message)),
    };
    let mut qname = match Name::from_utf8(name) {
        Ok(qname) => qname,
        Err(error) => return exit_with(Err(format!("{name:?} is not a domain name: {error}"))),
    };
    qname.set_fqdn(true);
    let qtype = match RecordType::from_str(&qtype.to_ascii_uppercase()) {
        Ok(qtype) => qtype,
        Err(_) => {
            return exit_with(Err(format!(
                "{qtype:?} is not a query type; write one such as A, AAAA, HTTPS or TXT"
            )));
        }
    };
    match decide(&policy, client, &qname, qtype) {
        Decision::Allow { group, rule } => {
            println!(
                "allow {qname} {qtype} from {client}: group {group}, rule {} ({}:{})",
                rule.pattern,
                policy.source.display(),
                rule.line
            );
            ExitCode::SUCCESS
        }
        Decision::Deny(reason) => {
            let group = &policy.group_for(client).name;
            println!("deny {qname} {qtype} from {client}: {reason} (group {group})");
            ExitCode::FAILURE
        }
    }
}

/// The mode `serve` runs in: the policy's, unless the command line says otherwise.
fn serve_mode(
    policy: Mode,
    cli: Option<CliMode>,
    audit_for: Option<std::time::Duration>,
) -> Result<Mode, String> {
    match (cli, audit_for) {
        (Some(CliMode::Enforce), Some(_)) => {
            Err("--audit-for needs audit mode; drop --mode enforce".into())
        }
        (Some(CliMode::Enforce), None) => Ok(Mode::Enforce),
        (_, Some(length)) => std::time::SystemTime::now()
            .checked_add(length)
            .map(|until| Mode::Audit { until })
            .ok_or_else(|| "--audit-for is too long".to_owned()),
        (Some(CliMode::Audit), None) => match policy {
            Mode::Audit { .. } => Ok(policy),
            Mode::Enforce => Err("audit mode must end: add --audit-for 24h (or the policy's \
                                  audit: {until: <RFC 3339 time>})"
                .into()),
        },
        (None, None) => Ok(policy),
    }
}

fn serve(
    path: &Path,
    listen: Vec<SocketAddr>,
    log: Option<String>,
    mode: Option<CliMode>,
    audit_for: Option<std::time::Duration>,
    watch: bool,
) -> Result<(), String> {
    let readiness = Readiness::new();
    let mut source = PolicySource {
        path: path.to_path_buf(),
        overrides: Overrides {
            listen,
            log,
            mode: None,
        },
    };
    let mut loaded = source.load().map_err(|invalid| invalid.error.to_string())?;
    if mode.is_some() || audit_for.is_some() {
        // Fixed for this run: a reload keeps the command line's mode.
        let mode = serve_mode(loaded.policy.mode, mode, audit_for)?;
        loaded.policy.mode = mode;
        source.overrides.mode = Some(mode);
    }
    for warning in &loaded.policy.warnings {
        eprintln!("warning: {warning}");
    }
    // This host's side of firewall.contain, decided as check decides it (the firewall logs
    // missing cgroups again as they come and go).
    let contain_warnings = dnsfence::firewall::contain_host_warnings(&loaded.policy)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    for warning in dnsfence::firewall::shared_link::warnings(&loaded.policy)
        .into_iter()
        .chain(contain_warnings)
    {
        eprintln!("warning: {warning}");
    }
    let digest = loaded.digest;
    let policy = Arc::new(loaded.policy);
    readiness.set_policy_loaded();

    let (mut log, writer) = QueryLog::open(&policy.log)
        .map_err(|error| format!("cannot open the query log: {error}"))?;
    // The endpoint comes up first, so that `/readyz` says "not ready" while the rest starts.
    let metrics = policy.metrics.map(|config| {
        let metrics = Arc::new(Metrics::new(
            &policy,
            readiness.clone(),
            Some(log.dropped()),
            policy.firewall.enabled,
        ));
        (config, metrics)
    });
    let _metrics_server = match &metrics {
        Some((config, metrics)) => {
            let server = serve_metrics(config.listen, Arc::clone(metrics))
                .map_err(|error| format!("metrics: {error}"))?;
            tracing::info!(addr = %server.addr, "metrics on /metrics, /healthz, /readyz");
            let counting = Arc::clone(metrics);
            log.observe(Arc::new(move |record| counting.observe(record)));
            Some(server)
        }
        None => None,
    };

    // Bound before the ruleset logs to it; in this thread's (dnsfence's) network namespace.
    let drop_reader = match policy.firewall.nflog_group {
        Some(group) if policy.firewall.enabled => Some(
            DropExplainer::open(group)
                .map_err(|error| format!("firewall.log_denied: nflog: {error}"))?,
        ),
        _ => None,
    };
    let mut drop_explainer: Option<DropExplainer> = None;

    // The firewall goes up before the first query can be answered.
    let firewall = if policy.firewall.enabled {
        let firewall = Firewall::install(&policy).map_err(|error| format!("firewall: {error}"))?;
        // One line a person sees even with logging turned down: this host's egress changed.
        eprintln!(
            "dnsfence: firewall: table inet {table} installed, default drop on {hooks} for \
             {contained}: only addresses dnsfence answers are reachable (see `dnsfence firewall \
             status`; remove with `dnsfence firewall remove --table {table}`)",
            table = firewall.table(),
            hooks = firewall.drop_hooks().join(", "),
            contained = firewall.contained(),
        );
        if !policy.firewall.bind.is_empty() {
            let ports: Vec<&str> = policy
                .firewall
                .bind
                .iter()
                .map(|b| b.port.as_str())
                .collect();
            eprintln!(
                "dnsfence: firewall: table bridge {table} installed: bridge ports {ports} send \
                 only from their own addresses (firewall.bind); ports not listed are not bound",
                table = firewall.table(),
                ports = ports.join(", "),
            );
        }
        for note in dnsfence::host_resolver::startup_notes(&policy, Path::new("/")) {
            eprintln!("dnsfence: {note}");
        }
        readiness.set_firewall_installed();
        Some(firewall)
    } else {
        tracing::warn!(
            "firewall.enabled is false: dnsfence filters DNS only and admits nothing to nftables; \
             agents can still reach any address they know"
        );
        readiness.set_firewall_disabled();
        None
    };
    let mark = if firewall.is_some() {
        policy.firewall.mark
    } else {
        0
    };

    // One worker per core this process may run on (its CPU affinity counts, so `taskset -c 0`
    // gives one); each worker also reads the UDP sockets (`server` module). Set here rather
    // than left to tokio, which would read TOKIO_WORKER_THREADS and panic on a bad value.
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the runtime: {error}"))?;
    let result = runtime.block_on(async {
        // Before anything else: SIGHUP's default action would end the process.
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|error| format!("cannot listen for SIGHUP: {error}"))?;
        let upstreams = Upstreams::new(
            &policy.upstreams,
            &policy.upstream_options,
            policy.upstream_timeout,
            mark,
        )
        .map_err(|error| format!("upstreams: {error}"))?;
        let admitter = firewall.as_ref().map(Firewall::admitter);
        if let Some((_, metrics)) = &metrics {
            tokio::spawn(heartbeats(Arc::clone(metrics), admitter.clone()));
        }
        if dnsfence::stage_times::enabled() {
            tokio::spawn(report_stage_times_on_usr1());
        }
        let generation = Generation::new(policy.clone(), &digest);
        let pipeline = Arc::new(Pipeline::new(generation, upstreams, admitter));
        dnsfence::host_watch::watch(pipeline.host_addresses())
            .map_err(|error| format!("cannot start the host address watcher: {error}"))?;
        let control = Arc::new(Control::new(
            pipeline.clone(),
            readiness.clone(),
            log.clone(),
            source,
        ));
        if let Some((_, metrics)) = &metrics {
            metrics.attach_control(control.clone());
        }
        if let Some(reader) = drop_reader {
            let explainer =
                Explainer::new(pipeline.clone(), log.clone(), policy.firewall.per_client);
            if let Some((_, metrics)) = &metrics {
                metrics.attach_drops(explainer.counts());
            }
            drop_explainer = Some(
                DropExplainer::start(reader, explainer)
                    .map_err(|error| format!("cannot start the drop reader: {error}"))?,
            );
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        match ControlSocket::bind(&policy.control) {
            Ok(socket) => {
                tracing::info!(socket = %socket.path().display(), "control socket listening");
                tokio::spawn(socket.serve(control.clone(), until_stopped()));
            }
            Err(error) => tracing::error!(
                "{error}; serving without a control socket (reload with SIGHUP{})",
                if watch { " or --watch" } else { "" }
            ),
        }
        tokio::spawn({
            let control = control.clone();
            let stop = until_stopped();
            async move { control.run_expiry(stop).await }
        });
        tokio::spawn(reload_on_hangup(control.clone(), hangups, until_stopped()));
        if watch {
            tokio::spawn({
                let control = control.clone();
                let stop = until_stopped();
                async move { control.run_watch(stop).await }
            });
        }
        tracing::info!(policy = %path.display(), sha256 = %digest, "dnsfence starting");
        tokio::spawn(audit::audit_clock(policy.mode, log.clone()));
        tokio::spawn(service_manager::announce_ready(readiness.clone()));
        if let Some(interval) = service_manager::watchdog_interval() {
            tokio::spawn(service_manager::run_watchdog(interval));
        }
        let served = server::serve(
            pipeline,
            log,
            &policy.listen,
            tcp_limits(&policy),
            &readiness,
            service_manager::stopping_after(shutdown_signal()),
        )
        .await
        .map_err(|error| error.to_string());
        readiness.set_stopping();
        let _ = stop.send(true);
        served
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    if let Some(explainer) = drop_explainer {
        explainer.stop();
    }
    writer.finish();
    if let Some(table) = dnsfence::stage_times::report() {
        eprint!("dnsfence: stage times since the last report, at exit:\n{table}");
    }
    if let Some(firewall) = firewall {
        let kept = firewall.keeps_table().then(|| {
            (
                firewall.table().to_string(),
                firewall.drop_hooks().join(", "),
            )
        });
        firewall
            .shutdown()
            .map_err(|error| format!("firewall: {error}"))?;
        if let Some((table, hooks)) = kept {
            eprintln!(
                "dnsfence: firewall: table inet {table} stays (on_exit: keep): default drop on \
                 {hooks} remains, only addresses already admitted are reachable until dnsfence \
                 runs again; remove it with: dnsfence firewall remove --table {table}"
            );
        }
    }
    tracing::info!("dnsfence stopped");
    result
}

/// Tells the metrics' health check, every second, that the event loop and the firewall's
/// admission thread still answer.
async fn heartbeats(metrics: Arc<Metrics>, admitter: Option<firewall::Admitter>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        metrics.event_loop_answered();
        if let Some(admitter) = &admitter {
            let asked =
                tokio::time::timeout(std::time::Duration::from_secs(2), admitter.live_elements());
            if let Ok(Some(live)) = asked.await {
                metrics.firewall_elements(live);
            }
        }
    }
}

/// Prints the stage times (and starts them afresh) on every SIGUSR1 (`DNSFENCE_STAGE_TIMES=1`).
async fn report_stage_times_on_usr1() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        tracing::warn!("cannot listen for SIGUSR1: no stage time reports until exit");
        return;
    };
    while usr1.recv().await.is_some() {
        if let Some(table) = dnsfence::stage_times::report() {
            eprint!("dnsfence: stage times since the last report:\n{table}");
        }
    }
}

/// Reloads on every SIGHUP until `stop` completes.
async fn reload_on_hangup(
    control: Arc<Control>,
    mut hangups: tokio::signal::unix::Signal,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                // Failures are logged (every error, FILE:LINE:COLUMN) and in the query log;
                // `reload` tells the service manager (RELOADING=1 .. READY=1).
                let _ = control.reload(Trigger::Signal).await;
            }
        }
    }
}

fn ctl(
    socket: Option<PathBuf>,
    policy: Option<PathBuf>,
    json: bool,
    command: CtlCommand,
) -> ExitCode {
    let Some(socket) = control_socket_path("ctl", socket, policy) else {
        return ExitCode::from(2);
    };
    let command = match command {
        CtlCommand::Status => control::client::Command::Status,
        CtlCommand::Ready => control::client::Command::Ready,
        CtlCommand::Reload => control::client::Command::Reload,
        CtlCommand::Grants => control::client::Command::Grants,
        CtlCommand::Revoke { id } => control::client::Command::Revoke { id },
        CtlCommand::Grant {
            name,
            ttl,
            client,
            group,
            reason,
            force,
        } => control::client::Command::Grant {
            name,
            ttl,
            client,
            group,
            reason,
            force,
        },
    };
    control::client::run(&socket, json, command)
}

fn tcp_limits(policy: &Policy) -> server::TcpLimits {
    server::TcpLimits {
        max_connections: policy.limits.tcp_connections,
        max_connections_per_client: policy.limits.tcp_connections_per_client,
        idle_timeout: policy.limits.tcp_idle_timeout,
    }
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
