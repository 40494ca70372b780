//! Pinned host staging for a save's copies of CUDA tensors.
//!
//! A copy from a CUDA device into pageable memory (the persister's `Vec<u8>` buffers) is
//! synchronous and goes through the driver's bounce buffer at pageable speed. A save on CUDA
//! instead enqueues a non-blocking copy of each tensor into a page-locked (pinned) host tensor of
//! its size, kept and reused from save to save, waits once for the device, and then copies the
//! pinned tensors into the persister's buffers on the host ([`super::tensors::copy_tensor`]).
//!
//! Guarantees: [`PinnedStaging::stage`] returns host tensors whose content is complete (it
//! synchronizes the device before returning) and equal to the device tensors' (a plain copy, no
//! conversion); CPU tensors are returned as they are, so the CPU path is unchanged. Costs: one
//! more host copy of the state, pinned, held for the run.
//!
//! Limits, said plainly: **this path has never run on a GPU** (written and compiled on a machine
//! without one; the CPU tests cannot reach it). tch exposes no CUDA stream API, so the copies run
//! on the device's current stream: they queue behind the kernels already issued instead of
//! overlapping them on a side stream; the copy thread overlaps the training thread's *host* work.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use super::tensors::{torch_message, TensorError};

/// Pinned host tensors by key (file and tensor name), reused across saves.
#[derive(Debug, Default)]
pub struct PinnedStaging {
    by_key: HashMap<String, Tensor>,
}

impl PinnedStaging {
    /// Host copies of `tensors` (`(key, tensor)`; keys unique), complete when this returns:
    /// those on a CUDA device through pinned memory and non-blocking copies, one device
    /// synchronization for all; CPU tensors as they are (shallow clones).
    pub fn stage(&mut self, tensors: &[(String, &Tensor)]) -> Result<Vec<Tensor>, TensorError> {
        let mut out = Vec::with_capacity(tensors.len());
        let mut devices = Vec::new();
        for (key, t) in tensors {
            let Device::Cuda(index) = t.device() else {
                out.push(t.shallow_clone());
                continue;
            };
            let pinned = self.pinned_for(key, t, index)?;
            let src = t.f_contiguous().map_err(|e| torch(key, &e))?;
            // `_copy_from(src, dst, non_blocking)`: what `dst.copy_(src, non_blocking=True)` calls.
            src.f_internal_copy_from(&pinned, true)
                .map(drop)
                .map_err(|e| torch(key, &e))?;
            if !devices.contains(&index) {
                devices.push(index);
            }
            out.push(pinned);
        }
        for index in devices {
            tch::Cuda::synchronize(index as i64);
        }
        Ok(out)
    }

    /// The pinned host tensor of `key`, of `t`'s shape and dtype (allocated at the first save,
    /// or when they changed).
    fn pinned_for(&mut self, key: &str, t: &Tensor, index: usize) -> Result<Tensor, TensorError> {
        let (size, kind): (Vec<i64>, Kind) = (t.size(), t.kind());
        if let Some(p) = self.by_key.get(key) {
            if p.size() == size && p.kind() == kind {
                return Ok(p.shallow_clone());
            }
        }
        let p = Tensor::f_empty(size.as_slice(), (kind, Device::Cpu))
            .and_then(|h| h.f_pin_memory(Device::Cuda(index)))
            .map_err(|e| torch(key, &e))?;
        self.by_key.insert(key.to_owned(), p.shallow_clone());
        Ok(p)
    }
}

fn torch(key: &str, e: &tch::TchError) -> TensorError {
    TensorError::Torch {
        name: key.to_owned(),
        message: format!("staging in pinned host memory: {}", torch_message(e)),
    }
}
