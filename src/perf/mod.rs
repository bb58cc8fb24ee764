//! Measuring speed: roofline floors from a configuration (`floors`), the end-to-end benchmark behind
//! `flamingo bench` (`bench`), and the per-op profiler behind `flamingo profile` (`profile`).

pub mod bench;
pub mod floors;
pub mod profile;
