//! Device twins and the query language over them, as Azure IoT Hub defines both.
//!
//! `document` holds the twin semantics: sections (tags, desired, reported), per-section
//! `$version`, `$metadata`, JSON merge patches where `null` deletes, and the size and depth
//! limits. `query` parses and evaluates the IoT Hub query language subset over twin JSON.
//! Pure functions of their inputs: this crate must never do I/O, read the clock (callers pass
//! timestamps in) or know about HTTP, MQTT or storage.
#![forbid(unsafe_code)]

pub mod document;
pub mod query;
