//! The query pipeline (placeholder).
