//! Layers stack on top of another [`BlockDevice`](crate::BlockDevice) and are devices
//! themselves: `throttle → crypt → backend`. (crypt and throttle arrive with their issues.)

pub mod crypt;
