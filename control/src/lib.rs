//! Ember control plane. See README.

pub mod locks;
