//! Layers stack on top of another [`BlockDevice`](crate::BlockDevice) and are devices
//! themselves: `throttle → crypt → backend`.
//!
//! A layer's queue reports its inner queue's owner id, so the front end routes every CQE
//! of the stack to the top queue; a layer that pushes SQEs of its own (the throttle's
//! timer) marks their slot with [`throttle::LAYER_SLOT_BIT`] and forwards the rest down.

pub mod crypt;
pub mod throttle;
