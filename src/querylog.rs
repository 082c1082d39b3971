//! Query log (placeholder).
