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

/// `info`, `block_status` and `resize` of a layer that changes neither the geometry
/// nor the allocation map of the device below it (`self.inner`).
macro_rules! pass_down_geometry {
    () => {
        fn info(&self) -> crate::request::DeviceInfo {
            self.inner.info()
        }

        fn block_status(
            &self,
            offset: u64,
            len: u64,
        ) -> crate::error::Result<Vec<crate::request::Extent>> {
            self.inner.block_status(offset, len)
        }

        fn resize(&self, new_size: u64) -> crate::error::Result<()> {
            self.inner.resize(new_size)
        }
    };
}
pub(crate) use pass_down_geometry;
