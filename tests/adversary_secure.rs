//! Placeholder: the advsec helper replaces this file.
