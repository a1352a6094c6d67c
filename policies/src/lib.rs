//! Where a device goes: hub allocation policies (static, hashed, geo-latency, custom webhook).
//!
//! Pure, synchronous functions of an attested device and the candidate hubs; the webhook policy
//! will be the one async exception, in its own module. This crate must never touch storage or
//! the network outside that module. It is filled by the allocation issue; today it is empty.
#![forbid(unsafe_code)]
