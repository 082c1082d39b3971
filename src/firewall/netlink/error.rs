//! What a netlink operation was doing ([`Op`]) and how it failed ([`NlError`]).

use std::fmt;

use nix::errno::Errno;

/// What a message of a batch does, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Batch,
    NewTable,
    DelTable,
    NewSet(&'static str),
    NewChain(&'static str),
    NewRule {
        chain: &'static str,
        index: usize,
    },
    NewElems {
        set: &'static str,
        count: usize,
    },
    DelElems {
        set: &'static str,
        count: usize,
    },
    Dump(&'static str),
    Socket(&'static str),
    /// One of the above, on the `bridge` table of the same name.
    Bridge(Box<Op>),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Batch => write!(f, "committing the batch"),
            Op::NewTable => write!(f, "creating the table"),
            Op::DelTable => write!(f, "deleting the table"),
            Op::NewSet(s) => write!(f, "creating set {s}"),
            Op::NewChain(c) => write!(f, "creating chain {c}"),
            Op::NewRule { chain, index } => write!(f, "adding rule {} of chain {chain}", index + 1),
            Op::NewElems { set, count } => write!(f, "adding {count} element(s) to set {set}"),
            Op::DelElems { set, count } => {
                write!(f, "deleting {count} element(s) from set {set}")
            }
            Op::Dump(what) => write!(f, "listing {what}"),
            Op::Socket(what) => write!(f, "{what}"),
            Op::Bridge(op) => write!(f, "{op} (table bridge)"),
        }
    }
}

/// A netlink failure.
#[derive(Debug)]
pub(crate) enum NlError {
    /// The socket itself failed.
    Io { op: Op, errno: Errno },
    /// The kernel refused a message.
    Kernel {
        op: Op,
        errno: Errno,
        /// The kernel's extended acknowledgement message, if any.
        detail: Option<String>,
    },
    /// Missing or malformed replies.
    Protocol(String),
}

impl NlError {
    pub(crate) fn errno(&self) -> Option<Errno> {
        match self {
            NlError::Io { errno, .. } | NlError::Kernel { errno, .. } => Some(*errno),
            NlError::Protocol(_) => None,
        }
    }

    pub(crate) fn op(&self) -> Option<&Op> {
        match self {
            NlError::Io { op, .. } | NlError::Kernel { op, .. } => Some(op),
            NlError::Protocol(_) => None,
        }
    }

    /// Whether the kernel refused the content (as opposed to the socket or protocol failing).
    pub(crate) fn is_kernel(&self) -> bool {
        matches!(self, NlError::Kernel { .. })
    }

    pub(crate) fn is_permission(&self) -> bool {
        matches!(self.errno(), Some(Errno::EPERM | Errno::EACCES))
    }
}

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NlError::Io { op, errno } => write!(f, "{op}: {} ({errno:?})", errno.desc()),
            NlError::Kernel { op, errno, detail } => {
                write!(f, "{op}: {} ({errno:?})", errno.desc())?;
                if let Some(d) = detail {
                    write!(f, ": {d}")?;
                }
                Ok(())
            }
            NlError::Protocol(m) => write!(f, "{m}"),
        }
    }
}

pub(super) fn io_err(op: Op, e: Errno) -> NlError {
    NlError::Io { op, errno: e }
}
