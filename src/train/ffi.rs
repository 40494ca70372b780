//! Safe Rust over `src/train/shim.cpp`: the libtorch calls tch 0.26 does not expose.
//!
//! - [`add_`], [`add`], [`addcmul_`], [`addcdiv_`]: the real libtorch overloads *with* their
//!   `alpha`/`value` scalar. tch's generated API drops these scalars; emulating them with a
//!   separate multiply rounds twice and drifts ~1 ulp from `torch.optim`. With these, the
//!   optimizers in [`super::optim`] are bit-exact with PyTorch's.
//! - [`rng_state`] / [`set_rng_state`]: the default CPU (or CUDA) generator's state, as
//!   `torch.get_rng_state()` / `torch.set_rng_state()` (and `torch.cuda.*`) see it: a CPU `uint8`
//!   tensor (5,056 bytes for the CPU generator in libtorch 2.13). Restoring it reproduces the
//!   following draws exactly.
//! - [`set_grad`]: assign or clear (`None`, like `zero_grad(set_to_none=True)`) a tensor's
//!   `.grad`, which tch cannot do.
//!
//! Guarantees: a libtorch error (bad shapes, dtypes, undefined tensors, no CUDA) comes back as
//! [`ShimError`]; no C++ exception crosses the FFI boundary (the shim catches everything), so
//! nothing here aborts the process.
//!
//! Safety argument (the only `unsafe` of the trainer): tch's `C_tensor` is `torch::Tensor*`
//! (torch-sys's `libtch/torch_api.h`); `Tensor::as_ptr`/`as_mut_ptr` hand out that pointer, which
//! stays valid while the borrowed `Tensor` lives, and the shim neither stores nor frees it. A
//! tensor the shim returns was allocated with `new torch::Tensor` like libtch's own, so
//! `Tensor::from_ptr` takes sole ownership. The error string is `malloc`ed by the shim and freed
//! by it ([`take_error`]). The in-place functions take `&mut Tensor`, so Rust's aliasing rules
//! hold for the handle (libtorch itself allows the operands to share storage).

use std::ffi::{c_char, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

/// A libtorch error raised inside the shim.
#[derive(Debug, thiserror::Error)]
#[error("libtorch {op} failed: {message}")]
pub struct ShimError {
    /// The operation, e.g. `addcdiv_`.
    pub op: &'static str,
    pub message: String,
}

extern "C" {
    fn hpc_ckpt_shim_free_error(err: *mut c_char);
    fn hpc_ckpt_set_deterministic(on: bool) -> *mut c_char;
    fn hpc_ckpt_add_(this: *mut C_tensor, other: *const C_tensor, alpha: f64) -> *mut c_char;
    fn hpc_ckpt_add(
        this: *const C_tensor,
        other: *const C_tensor,
        alpha: f64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn hpc_ckpt_addcmul_(
        this: *mut C_tensor,
        t1: *const C_tensor,
        t2: *const C_tensor,
        value: f64,
    ) -> *mut c_char;
    fn hpc_ckpt_addcdiv_(
        this: *mut C_tensor,
        t1: *const C_tensor,
        t2: *const C_tensor,
        value: f64,
    ) -> *mut c_char;
    fn hpc_ckpt_set_grad(this: *mut C_tensor, grad: *const C_tensor) -> *mut c_char;
    fn hpc_ckpt_rng_get_state(cuda_device: i64, out: *mut *mut C_tensor) -> *mut c_char;
    fn hpc_ckpt_rng_set_state(cuda_device: i64, state: *const C_tensor) -> *mut c_char;
}

/// Turn the shim's return value into a `Result`, freeing the error string.
fn take_error(op: &'static str, err: *mut c_char) -> Result<(), ShimError> {
    match take_message(err) {
        None => Ok(()),
        Some(message) => Err(ShimError { op, message }),
    }
}

/// The message of a shim function's return value (`None`: success), freeing the string. Shared
/// with [`super::collective`], whose C++ follows the same convention.
pub(crate) fn take_message(err: *mut c_char) -> Option<String> {
    if err.is_null() {
        return None;
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'ed by the shim, not yet freed;
    // we copy it, then hand it back to the shim's free exactly once.
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { hpc_ckpt_shim_free_error(err) };
    Some(message)
}

/// Wrap a tensor the shim allocated (after a successful call).
fn own(op: &'static str, ptr: *mut C_tensor) -> Result<Tensor, ShimError> {
    if ptr.is_null() {
        return Err(ShimError {
            op,
            message: "the shim returned no tensor".into(),
        });
    }
    // SAFETY: `ptr` was allocated by `new torch::Tensor` in the shim and is owned by no one else.
    Ok(unsafe { Tensor::from_ptr(ptr) })
}

/// `this.add_(other, alpha=alpha)`: `this += alpha * other`, rounded once, as libtorch does.
pub fn add_(this: &mut Tensor, other: &Tensor, alpha: f64) -> Result<(), ShimError> {
    // SAFETY: see the module doc; both pointers are valid for the duration of the call.
    let err = unsafe { hpc_ckpt_add_(this.as_mut_ptr(), other.as_ptr(), alpha) };
    take_error("add_", err)
}

/// `this.add(other, alpha=alpha)`: a new tensor.
pub fn add(this: &Tensor, other: &Tensor, alpha: f64) -> Result<Tensor, ShimError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: see the module doc; `out` is a valid place for the result pointer.
    let err = unsafe { hpc_ckpt_add(this.as_ptr(), other.as_ptr(), alpha, &mut out) };
    take_error("add", err)?;
    own("add", out)
}

/// `this.addcmul_(t1, t2, value=value)`: `this += value * t1 * t2`.
pub fn addcmul_(this: &mut Tensor, t1: &Tensor, t2: &Tensor, value: f64) -> Result<(), ShimError> {
    // SAFETY: see the module doc.
    let err = unsafe { hpc_ckpt_addcmul_(this.as_mut_ptr(), t1.as_ptr(), t2.as_ptr(), value) };
    take_error("addcmul_", err)
}

/// `this.addcdiv_(t1, t2, value=value)`: `this += value * t1 / t2`.
pub fn addcdiv_(this: &mut Tensor, t1: &Tensor, t2: &Tensor, value: f64) -> Result<(), ShimError> {
    // SAFETY: see the module doc.
    let err = unsafe { hpc_ckpt_addcdiv_(this.as_mut_ptr(), t1.as_ptr(), t2.as_ptr(), value) };
    take_error("addcdiv_", err)
}

/// `this.grad = grad` (`None`: `this.grad = None`). The gradient is shared, not copied, as in
/// Python; it must have the parameter's dtype, device and size.
pub fn set_grad(this: &mut Tensor, grad: Option<&Tensor>) -> Result<(), ShimError> {
    let g = grad.map_or(std::ptr::null(), |g| g.as_ptr());
    // SAFETY: see the module doc; a null `grad` means None.
    let err = unsafe { hpc_ckpt_set_grad(this.as_mut_ptr(), g) };
    take_error("set_grad", err)
}

/// `torch.use_deterministic_algorithms(on)` plus `torch.backends.cudnn.deterministic = on`:
/// ops without a deterministic implementation then fail loudly instead of varying (CPU ops used
/// here are deterministic anyway; the cost is on CUDA).
pub fn set_deterministic(on: bool) -> Result<(), ShimError> {
    // SAFETY: plain flag setters on libtorch's global context; no pointers.
    let err = unsafe { hpc_ckpt_set_deterministic(on) };
    take_error("set_deterministic", err)
}

/// Which default generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    Cpu,
    /// The default generator of CUDA device `n` (fails unless CUDA is available).
    Cuda(usize),
}

impl Generator {
    fn index(self) -> i64 {
        match self {
            Generator::Cpu => -1,
            Generator::Cuda(n) => n as i64,
        }
    }
}

/// The generator's state: a CPU `uint8` tensor (`torch.get_rng_state()` for the CPU generator,
/// `torch.cuda.get_rng_state(n)` for CUDA device `n`).
pub fn rng_state(gen: Generator) -> Result<Tensor, ShimError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `out` is a valid place for the result pointer.
    let err = unsafe { hpc_ckpt_rng_get_state(gen.index(), &mut out) };
    take_error("get_rng_state", err)?;
    own("get_rng_state", out)
}

/// Restore a state from [`rng_state`]. libtorch refuses (an error here) a tensor of the wrong
/// dtype or size.
pub fn set_rng_state(gen: Generator, state: &Tensor) -> Result<(), ShimError> {
    // SAFETY: see the module doc.
    let err = unsafe { hpc_ckpt_rng_set_state(gen.index(), state.as_ptr()) };
    take_error("set_rng_state", err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn add_keeps_alpha_in_one_rounding() {
        let mut a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let b = Tensor::from_slice(&[10.0f32, 20.0, 30.0]);
        add_(&mut a, &b, 0.5).unwrap();
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), vec![6.0, 12.0, 18.0]);
        let c = add(&a, &b, -1.0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&c).unwrap(), vec![-4.0, -8.0, -12.0]);
        addcmul_(&mut a, &b, &b, 0.01).unwrap();
        addcdiv_(&mut a, &b, &b, 2.0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), vec![9.0, 18.0, 29.0]);
    }

    #[test]
    fn libtorch_errors_come_back_as_errors() {
        let mut a = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let e = add_(&mut a, &b, 1.0).unwrap_err();
        assert_eq!(e.op, "add_");
        assert!(e.message.contains("size"), "{e}");
        assert!(!e.message.contains("frame #"), "no C++ backtrace: {e}");
        let e = addcdiv_(&mut a, &b, &b, 1.0).unwrap_err();
        assert!(e.to_string().starts_with("libtorch addcdiv_ failed"), "{e}");
        let bad = Tensor::zeros([7], (Kind::Uint8, Device::Cpu));
        assert!(set_rng_state(Generator::Cpu, &bad).is_err());
        if !tch::Cuda::is_available() {
            assert!(rng_state(Generator::Cuda(0)).is_err());
        }
    }

    #[test]
    fn set_grad_assigns_checks_and_clears() {
        let mut p = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(!p.grad().defined());
        let g = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        set_grad(&mut p, Some(&g)).unwrap();
        assert!(p.grad().equal(&g));
        let e = set_grad(&mut p, Some(&Tensor::ones([3], (Kind::Float, Device::Cpu)))).unwrap_err();
        assert!(e.message.contains("does not match the parameter's"), "{e}");
        let e = set_grad(&mut p, Some(&g.to_kind(Kind::Double))).unwrap_err();
        assert!(e.message.contains("dtype"), "{e}");
        set_grad(&mut p, None).unwrap();
        assert!(!p.grad().defined());
    }

    #[test]
    fn cpu_rng_state_round_trips_and_reproduces_draws() {
        let state = rng_state(Generator::Cpu).unwrap();
        assert_eq!(state.kind(), Kind::Uint8);
        assert_eq!(state.numel(), 5056);
        let first = Tensor::randn([64], (Kind::Float, Device::Cpu));
        let other = Tensor::randn([64], (Kind::Float, Device::Cpu));
        assert!(!first.equal(&other));
        set_rng_state(Generator::Cpu, &state).unwrap();
        let again = Tensor::randn([64], (Kind::Float, Device::Cpu));
        assert!(first.equal(&again));
    }
}
