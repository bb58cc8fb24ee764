//! The models, one folder per family, names mirroring transformers': `idefics` (IDEFICS 9B/80B and their
//! instruct models). `layers` holds what families share (weight loading, linear, norm and MLP layers), `sampling`
//! the token-choice rules the runtime applies to every family's logits.
//!
//! Everything is computed through the [`Backend`](crate::backend::Backend) trait; a model never names a backend.

pub mod idefics;
pub mod layers;
pub mod sampling;
