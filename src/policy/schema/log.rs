//! `log`: where the query log goes.

use std::path::PathBuf;

use super::super::LogTarget;
use super::super::diagnostic::Report;
use super::super::raw::Node;
use super::super::read;

pub(super) fn target(r: &mut Report, node: Option<&Node>) -> LogTarget {
    let Some(node) = node else {
        return LogTarget::Stdout;
    };
    match read::text(r, node, "log") {
        Some("-") | None => LogTarget::Stdout,
        Some("") => {
            r.error(
                node.pos,
                "log is empty; write \"-\" for standard output or a file path",
            );
            LogTarget::Stdout
        }
        Some(path) => LogTarget::File(PathBuf::from(path)),
    }
}
