//! Placeholder: the envelope helper replaces this file.
