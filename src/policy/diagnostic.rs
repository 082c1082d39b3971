//! Diagnostics: what is wrong with a policy file, where, and what would be right.
//!
//! An operator who fixes a policy one error per run wastes time and, under pressure, is tempted
//! to loosen the allowlist instead. So the loader never stops at the first problem: it collects
//! every error (and every lint warning) as a [`Diagnostic`] and prints them all, one per line,
//! in the `FILE:LINE:COLUMN: message` form that editors and CI annotate.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a policy file.
///
/// `message` reads "what is wrong; what would be right". Text taken from the file is quoted with
/// Rust's `Debug` escaping, so a hostile file cannot put control characters on a terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The policy file.
    pub file: PathBuf,
    /// 1-based line; 0 when the problem concerns the whole file (e.g. it cannot be read).
    pub line: usize,
    /// 1-based column in characters; 0 when unknown.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// A policy that cannot be used: every error found, in file order.
#[derive(Debug, Clone)]
pub struct PolicyError {
    /// The file that was being loaded.
    pub source: PathBuf,
    /// Every error found, sorted by position. Never empty.
    pub errors: Vec<Diagnostic>,
    /// Set when the file could not be read at all (then `errors` holds one diagnostic saying so).
    pub read_error: Option<std::io::ErrorKind>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

/// A 1-based position in the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub(crate) const START: Pos = Pos { line: 1, column: 1 };
}

/// Collects errors and warnings while a policy is checked.
#[derive(Debug)]
pub(crate) struct Report {
    file: PathBuf,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Report {
    pub(crate) fn new(file: &Path) -> Report {
        Report {
            file: file.to_path_buf(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn diagnostic(&self, pos: Pos, message: String) -> Diagnostic {
        Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            message,
        }
    }

    pub(crate) fn error(&mut self, pos: Pos, message: impl Into<String>) {
        let d = self.diagnostic(pos, message.into());
        self.errors.push(d);
    }

    pub(crate) fn warn(&mut self, pos: Pos, message: impl Into<String>) {
        let d = self.diagnostic(pos, message.into());
        self.warnings.push(d);
    }

    /// How many errors so far (a reader compares before and after to know it reported one).
    pub(crate) fn error_count(&self) -> usize {
        self.errors.len()
    }

    pub(crate) fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Errors and warnings, each sorted by position with exact repeats removed (a YAML alias
    /// expanded twice would otherwise report the same spot twice).
    pub(crate) fn finish(self) -> (Vec<Diagnostic>, Vec<Diagnostic>) {
        (tidy(self.errors), tidy(self.warnings))
    }
}

fn tidy(mut list: Vec<Diagnostic>) -> Vec<Diagnostic> {
    // A stable sort keeps several problems at one spot in the order they were found.
    list.sort_by_key(|d| (d.line, d.column));
    list.dedup();
    list
}

/// Quotes text from the policy file for a message (escapes control and odd characters).
pub(crate) fn quote(text: &str) -> String {
    format!("{text:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnostics_print_file_line_column_message() {
        let mut report = Report::new(Path::new("p.yaml"));
        report.error(Pos { line: 7, column: 5 }, "bad; good");
        report.error(Pos { line: 2, column: 1 }, "first; fix");
        let (errors, _) = report.finish();
        let err = PolicyError {
            source: "p.yaml".into(),
            errors,
            read_error: None,
        };
        assert_eq!(
            err.to_string(),
            "p.yaml:2:1: first; fix\np.yaml:7:5: bad; good"
        );
    }

    #[test]
    fn quoting_escapes_control_characters() {
        assert_eq!(quote("a\u{1b}[2Jb"), "\"a\\u{1b}[2Jb\"");
    }
}
