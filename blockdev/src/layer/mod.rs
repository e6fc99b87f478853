//! Layers stack on top of another [`BlockDevice`](crate::BlockDevice) and are devices
//! themselves: `throttle → crypt → gate → backend` ([`crate::stack`] assembles them).
//!
//! A layer's queue reports its inner queue's owner id, so the front end routes every CQE
//! of the stack to the top queue; a layer that pushes SQEs of its own (the throttle's
//! and the gate's timers) marks their slot with [`throttle::LAYER_SLOT_BIT`] (the gate:
//! [`gate::GATE_SLOT`]) and forwards the rest down.
//!
//! - [`crypt`]: LUKS plaintext view; [`throttle`]: QoS; [`gate`]: pause writes for a
//!   point-in-time copy.

pub mod crypt;
pub mod gate;
pub mod throttle;
