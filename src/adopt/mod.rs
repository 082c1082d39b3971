//! Adopting dnsfence: writing a policy from what an agent really does, and reviewing changes.
//!
//! The path a team takes from "we do not know what the agent needs" to an enforced policy:
//!
//! ```text
//! serve --mode audit ─► query log ─► suggest ─► edit policy ─► replay ─► serve (enforce)
//!  (denials forwarded,   (JSON lines)  (YAML of     (review)      (what would change
//!   logged audit:true)                 additions)                  against past traffic)
//! ```
//!
//! `why` reads the same logs to answer the operator's other question: why may (or may not) a
//! client reach this address?
//!
//! Everything here sits on top: it reads query logs and calls down into the policy and the
//! pipeline's decision stage, the same code `serve` and `explain` run.

pub mod audit;
pub mod logfile;
pub mod replay;
pub mod suggest;
pub mod why;
