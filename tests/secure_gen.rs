//! Placeholder: the secgen helper replaces this file.
