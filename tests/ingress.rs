//! Placeholder: the ingress helper replaces this file.
