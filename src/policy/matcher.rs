//! Name matching on wire labels (placeholder until the matcher lands).

use super::Rule;

/// The rules of one group, indexed for matching.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}
