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
//! - [`Autocast`]: `torch.autocast(device_type, dtype)` as an RAII guard, per device type (tch's
//!   own `autocast` only knows CUDA): its `__enter__`/`__exit__`, step for step.
//! - [`amp_foreach_unscale_`]: `torch._amp_foreach_non_finite_check_and_unscale_`, the op
//!   `torch.amp.GradScaler.unscale_` runs, so our loss scaler's arithmetic is torch's own.
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
    fn hpc_ckpt_autocast_enter(
        device_type: i32,
        dtype: i32,
        prev_enabled: *mut bool,
        prev_dtype: *mut i32,
        prev_cache: *mut bool,
    ) -> *mut c_char;
    fn hpc_ckpt_autocast_exit(
        device_type: i32,
        prev_enabled: bool,
        prev_dtype: i32,
        prev_cache: bool,
    ) -> *mut c_char;
    fn hpc_ckpt_autocast_enabled(device_type: i32) -> bool;
    fn hpc_ckpt_amp_foreach_unscale_(
        grads: *const *mut C_tensor,
        n: i64,
        found_inf: *mut C_tensor,
        inv_scale: *const C_tensor,
    ) -> *mut c_char;
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

/// The device type autocast applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutocastDevice {
    Cpu,
    Cuda,
}

impl AutocastDevice {
    /// The device type of `device` (autocast on CUDA for any CUDA device, else the CPU's).
    pub fn of(device: tch::Device) -> AutocastDevice {
        if device.is_cuda() {
            AutocastDevice::Cuda
        } else {
            AutocastDevice::Cpu
        }
    }

    fn code(self) -> i32 {
        match self {
            AutocastDevice::Cpu => 0,
            AutocastDevice::Cuda => 1,
        }
    }
}

/// `with torch.autocast(device_type, dtype=dtype):` for as long as the guard lives, on this
/// thread (autocast state is thread-local in libtorch). Entering saves the previous enabled
/// flag, dtype and cache flag of the device type and increments the nesting; dropping
/// decrements it, clears the cast cache when the outermost guard ends, and puts the previous
/// state back — what `torch.autocast.__enter__`/`__exit__` do. Guards nest.
#[must_use = "autocast ends when the guard is dropped"]
#[derive(Debug)]
pub struct Autocast {
    device: AutocastDevice,
    prev_enabled: bool,
    prev_dtype: i32,
    prev_cache: bool,
}

impl Autocast {
    /// Enter autocast for `device` with `dtype` (`Kind::BFloat16` or `Kind::Half`; anything
    /// else is refused by the shim).
    pub fn enter(device: AutocastDevice, dtype: tch::Kind) -> Result<Autocast, ShimError> {
        // at::ScalarType's codes (c10/core/ScalarType.h): Half 5, BFloat16 15; the shim refuses
        // any other, so an unsupported kind maps to Float (6) to be refused there.
        let code = match dtype {
            tch::Kind::Half => 5,
            tch::Kind::BFloat16 => 15,
            _ => 6,
        };
        let (mut prev_enabled, mut prev_dtype, mut prev_cache) = (false, 0i32, true);
        // SAFETY: the three out-pointers are valid locals for the duration of the call.
        let err = unsafe {
            hpc_ckpt_autocast_enter(
                device.code(),
                code,
                &mut prev_enabled,
                &mut prev_dtype,
                &mut prev_cache,
            )
        };
        take_error("autocast enter", err)?;
        Ok(Autocast {
            device,
            prev_enabled,
            prev_dtype,
            prev_cache,
        })
    }

    /// Whether autocast is on for `device` on this thread.
    pub fn is_enabled(device: AutocastDevice) -> bool {
        // SAFETY: a flag query; no pointers.
        unsafe { hpc_ckpt_autocast_enabled(device.code()) }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: plain values; the shim restores the state saved by `enter`.
        let err = unsafe {
            hpc_ckpt_autocast_exit(
                self.device.code(),
                self.prev_enabled,
                self.prev_dtype,
                self.prev_cache,
            )
        };
        if let Err(e) = take_error("autocast exit", err) {
            // Restoring three flags cannot fail short of a broken libtorch; say so, do not panic
            // in a destructor.
            tracing::error!(error = %e, "leaving autocast failed");
        }
    }
}

/// `torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)`: every tensor
/// of `grads` (one dtype, one device) is multiplied in place by `inv_scale` (a 1-element f32
/// tensor), and `found_inf` (a 1-element f32 tensor) is set to 1.0 when any element is inf or
/// NaN (it is never reset to 0 here).
pub fn amp_foreach_unscale_(
    grads: &mut [Tensor],
    found_inf: &mut Tensor,
    inv_scale: &Tensor,
) -> Result<(), ShimError> {
    let ptrs: Vec<*mut C_tensor> = grads.iter_mut().map(|g| g.as_mut_ptr()).collect();
    // SAFETY: see the module doc; `ptrs` holds `grads.len()` valid tensor pointers that outlive
    // the call (the shim copies the handles, which share the grads' storage).
    let err = unsafe {
        hpc_ckpt_amp_foreach_unscale_(
            ptrs.as_ptr(),
            ptrs.len() as i64,
            found_inf.as_mut_ptr(),
            inv_scale.as_ptr(),
        )
    };
    take_error("_amp_foreach_non_finite_check_and_unscale_", err)
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
    fn autocast_guard_casts_nests_and_restores() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        assert!(!Autocast::is_enabled(AutocastDevice::Cpu));
        {
            let _outer = Autocast::enter(AutocastDevice::Cpu, Kind::BFloat16).unwrap();
            assert!(Autocast::is_enabled(AutocastDevice::Cpu));
            assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
            {
                let _inner = Autocast::enter(AutocastDevice::Cpu, Kind::Half).unwrap();
                assert_eq!(a.matmul(&a).kind(), Kind::Half);
            }
            assert_eq!(
                a.matmul(&a).kind(),
                Kind::BFloat16,
                "the outer dtype is back"
            );
        }
        assert!(!Autocast::is_enabled(AutocastDevice::Cpu));
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
        let e = Autocast::enter(AutocastDevice::Cpu, Kind::Double).unwrap_err();
        assert!(e.message.contains("neither bfloat16 nor float16"), "{e}");
    }

    #[test]
    fn foreach_unscale_multiplies_and_flags_non_finite() {
        let inv = Tensor::from_slice(&[0.25f32]).reshape([]);
        let mut found = Tensor::zeros([], (Kind::Float, Device::Cpu));
        let mut grads = vec![
            Tensor::from_slice(&[4.0f32, 8.0]),
            Tensor::from_slice(&[2.0f32]),
        ];
        amp_foreach_unscale_(&mut grads, &mut found, &inv).unwrap();
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), vec![1.0, 2.0]);
        assert_eq!(found.double_value(&[]), 0.0);
        let mut bad = vec![Tensor::from_slice(&[1.0f32, f32::INFINITY])];
        amp_foreach_unscale_(&mut bad, &mut found, &inv).unwrap();
        assert_eq!(found.double_value(&[]), 1.0);
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
