//! Placeholder: the randomids helper replaces this file.
