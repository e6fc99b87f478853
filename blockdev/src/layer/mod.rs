//! Layers stack on top of another [`BlockDevice`](crate::BlockDevice) and are devices
//! themselves: `throttle → crypt → gate → backend` ([`crate::stack`] assembles them).
//!
//! A layer's queue reports its inner queue's owner id, so the front end routes every CQE
//! of the stack to the top queue; a layer that pushes SQEs of its own (the throttle's
//! and the gate's timers) tags them with its reserved kind ([`Kind::THROTTLE`],
//! [`Kind::GATE`]) and forwards the rest down. A layer that re-tags the requests it
//! passes down (crypt, gate) keeps the caller's tag in a [`Slots`](crate::slots::Slots)
//! entry and gives the inner queue that entry's [`Tag`](crate::tag::Tag).
//!
//! [`Kind::THROTTLE`]: crate::tag::Kind::THROTTLE
//! [`Kind::GATE`]: crate::tag::Kind::GATE
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
