//! The one-command demo (being written).
