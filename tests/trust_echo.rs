//! (placeholder: filled by the work on issues 22/27)
