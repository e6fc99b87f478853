//! Ember control plane. See README.
