//! The nftables side of dnsfence (placeholder until it lands).
