//! Placeholder: the embed2 helper replaces this file.
