//! The built-in trainer (cargo feature `torch`): training in-process on libtorch through tch,
//! checkpointed through [`crate::storage`].
//!
//! - [`config`]: the trainer's view of the job config, whose types live in
//!   [`crate::config::trainer`] (parsed once with the file, no torch); here only what needs
//!   torch.
//! - [`data`]: in-memory datasets and a loader whose whole state is a position (epoch, batch).
//! - [`models`]: mlp, cnn and a small gpt over `tch::nn`.
//! - [`optim`] and [`sched`]: SGD, Adam and AdamW (bit-exact with PyTorch 2.13's `torch.optim`,
//!   single-tensor code path) and the lr schedules, with explicit serializable state.
//! - [`seeds`]: every random stream, derived from the job's seed in one place.
//! - [`trainer`]: the loop — resume (falling back past checkpoints that do not restore), train,
//!   evaluate, commit.
//! - [`tensors`]: tch tensors to and from the store's safetensors ([`crate::storage::TensorData`]).
//! - [`pinned`]: a save's copies of CUDA tensors staged in pinned host memory (never run on a GPU).
//! - [`ffi`]: the small C++ shim (`shim.cpp`, compiled by `build.rs`) for the libtorch calls tch
//!   does not expose: scalar-exact `add_`/`addcmul_`/`addcdiv_`, the default generators' state
//!   (`get_rng_state`/`set_rng_state`), deterministic algorithms, `.grad` assignment.
//! - [`collective`]: libtorch's own collective engine (c10d `ProcessGroupGloo`, through
//!   `collective.cpp`): all-reduce, broadcast and barrier of CPU tensors across ranks.
//!
//! Dependencies flow one way: train → storage; storage knows nothing of torch.

pub mod amp;
pub mod collective;
pub mod config;
pub mod data;
pub mod ffi;
pub mod models;
pub mod optim;
pub mod pinned;
pub mod sched;
pub mod seeds;
pub mod tensors;
pub mod trainer;
