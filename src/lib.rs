//! dnsfence: a filtering DNS resolver that contains the network egress of AI agents.
//!
//! A query flows through these modules, in this order:
//!
//! 1. [`server`] receives it over UDP or TCP (hickory-server) and hands it to the pipeline.
//! 2. [`pipeline::request`] rejects what is not one plain `QUERY` for one `IN` question.
//! 3. [`pipeline::decision`] asks the [`policy`] whether the name and type may leave; a denied
//!    query is answered locally and never forwarded.
//! 4. [`pipeline::upstream`] forwards an allowed query, as a fresh message, to a trusted resolver.
//! 5. [`pipeline::answer_filter`] keeps only the records that belong to the question's name or its
//!    CNAME chain, and clamps their TTLs.
//! 6. [`firewall`] admits every address of that answer to the kernel's nftables sets, and the
//!    kernel acknowledges it, before the reply is sent (fail closed: SERVFAIL otherwise).
//! 7. [`querylog`] writes one JSON line per query.
//!
//! On top of these, [`adopt`] turns query logs into policy (audit mode, `suggest`, `replay`),
//! [`metrics`] exports counters and health, and [`health`] holds the readiness that the metrics
//! endpoint (and the control socket, and systemd) report.
//! [`explain`] reads the packets the firewall dropped (an NFLOG group) and explains each from
//! the admission history in the query log.
//! [`host_watch`] keeps the pipeline's list of this host's addresses current (a query from one
//! of them is the loopback client).
//! [`host_resolver`] tells at start whether a resolver on the host could carry a contained
//! agent's names out (`firewall.contain.host_dns`).
//! [`stage_times`] times each stage of a query when asked (`DNSFENCE_STAGE_TIMES=1`), to find
//! where a latency tail comes from.
//! [`control`] changes the policy while dnsfence runs (reload, revocation, temporary grants,
//! the control socket and `dnsfence ctl`).

pub mod adopt;
pub mod control;
pub mod explain;
pub mod firewall;
pub mod health;
pub mod host_resolver;
pub mod host_watch;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod querylog;
pub mod server;
pub mod service_manager;
pub mod sharded_map;
pub mod stage_times;
