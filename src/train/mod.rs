//! The built-in trainer (cargo feature `torch`): training in-process on libtorch through tch,
//! checkpointed through [`crate::storage`].
//!
//! Built so far (the foundation the loop builds on):
//! - [`ffi`]: the small C++ shim (`shim.cpp`, compiled by `build.rs`) for the libtorch calls tch
//!   does not expose: scalar-exact `add_`/`addcmul_`/`addcdiv_`, and the default generators'
//!   state (`get_rng_state`/`set_rng_state`).
//! - [`optim`]: SGD, Adam and AdamW over tch tensors, bit-exact with PyTorch 2.13's `torch.optim`
//!   (single-tensor code path), with explicit named state tensors and serde metadata.
//! - [`tensors`]: tch tensors to and from the store's safetensors ([`crate::storage::TensorData`]).
//!
//! Dependencies flow one way: train → storage; storage knows nothing of torch.

pub mod config;
pub mod data;
pub mod ffi;
pub mod models;
pub mod optim;
pub mod sched;
pub mod seeds;
pub mod tensors;
pub mod trainer;
