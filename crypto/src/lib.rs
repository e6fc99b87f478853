//! Ember crypto (LUKS, XTS). See README.
