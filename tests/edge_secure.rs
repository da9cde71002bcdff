//! Placeholder: the edgesec helper replaces this file.
