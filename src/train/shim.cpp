// The few libtorch calls tch 0.26 does not expose, as extern "C" functions for src/train/ffi.rs.
//
// Tensors are passed as tch's `C_tensor` pointers, which are `torch::Tensor*` (see torch-sys's
// libtch/torch_api.h: `typedef torch::Tensor *tensor;`). A returned tensor is allocated with
// `new torch::Tensor(...)`, exactly as libtch does, so tch's `Tensor::from_ptr` takes ownership and
// frees it with libtch's `at_free` (`delete`).
//
// Error convention: every function returns NULL on success, or a heap string (malloc) describing
// the failure, which the caller frees with hpc_ckpt_shim_free_error. No C++ exception ever
// crosses into Rust (that would abort the process).
//
// Why: (1) tch's generated `add_`, `addcmul_`, `addcdiv_` drop the alpha/value scalar, and
// emulating it with a separate multiply rounds twice, drifting ~1 ulp from torch.optim; calling
// the real overloads keeps our optimizers bit-exact. (2) tch exposes only manual_seed, not the
// generator state a complete checkpoint needs. (3) tch cannot assign or clear a `.grad`.
// (4) tch's autocast is CUDA-only (the legacy device-less setter); torch.autocast works per
// device type, CPU included. (5) tch lacks the foreach unscale GradScaler uses.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "shim_error.hpp"

namespace {

template <typename F>
char *guarded(F f) {
    return hpc_ckpt_shim::guarded("libtorch shim", f);
}

void check_ptr(const void *p, const char *what) {
    if (p == nullptr) {
        throw std::invalid_argument(std::string("null tensor pointer: ") + what);
    }
}

at::Generator default_generator(int64_t cuda_device) {
    if (cuda_device < 0) {
        return at::detail::getDefaultCPUGenerator();
    }
    if (!at::hasCUDA()) {
        throw std::runtime_error("CUDA is not available (no GPU, or libtorch_cuda not loaded)");
    }
    return at::globalContext().defaultGenerator(
        c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(cuda_device)));
}

}  // namespace

extern "C" {

void hpc_ckpt_shim_free_error(char *err) { std::free(err); }

// self.add_(other, alpha=alpha)
char *hpc_ckpt_add_(at::Tensor *self, const at::Tensor *other, double alpha) {
    return guarded([&] {
        check_ptr(self, "self");
        check_ptr(other, "other");
        self->add_(*other, alpha);
    });
}

// *out = self.add(other, alpha=alpha) (a new tensor)
char *hpc_ckpt_add(const at::Tensor *self, const at::Tensor *other, double alpha,
                   at::Tensor **out) {
    return guarded([&] {
        check_ptr(self, "self");
        check_ptr(other, "other");
        check_ptr(out, "out");
        *out = new at::Tensor(self->add(*other, alpha));
    });
}

// self.addcmul_(t1, t2, value=value)
char *hpc_ckpt_addcmul_(at::Tensor *self, const at::Tensor *t1, const at::Tensor *t2,
                        double value) {
    return guarded([&] {
        check_ptr(self, "self");
        check_ptr(t1, "tensor1");
        check_ptr(t2, "tensor2");
        self->addcmul_(*t1, *t2, value);
    });
}

// self.addcdiv_(t1, t2, value=value)
char *hpc_ckpt_addcdiv_(at::Tensor *self, const at::Tensor *t1, const at::Tensor *t2,
                        double value) {
    return guarded([&] {
        check_ptr(self, "self");
        check_ptr(t1, "tensor1");
        check_ptr(t2, "tensor2");
        self->addcdiv_(*t1, *t2, value);
    });
}

// self.grad = grad (grad == NULL: self.grad = None, as zero_grad(set_to_none=True) does).
// Checks what Python's `p.grad = g` setter checks: same dtype, device and size.
char *hpc_ckpt_set_grad(at::Tensor *self, const at::Tensor *grad) {
    return guarded([&] {
        check_ptr(self, "self");
        if (grad == nullptr || !grad->defined()) {
            self->mutable_grad() = at::Tensor();
            return;
        }
        TORCH_CHECK(grad->scalar_type() == self->scalar_type(), "grad dtype ",
                    grad->scalar_type(), " does not match the parameter's ", self->scalar_type());
        TORCH_CHECK(grad->device() == self->device(), "grad device ", grad->device(),
                    " does not match the parameter's ", self->device());
        TORCH_CHECK(grad->sizes() == self->sizes(), "grad size ", grad->sizes(),
                    " does not match the parameter's ", self->sizes());
        self->mutable_grad() = *grad;
    });
}

// *out = the default generator's state (torch.get_rng_state() for cuda_device < 0, else
// torch.cuda.get_rng_state(cuda_device)): a CPU uint8 tensor.
char *hpc_ckpt_rng_get_state(int64_t cuda_device, at::Tensor **out) {
    return guarded([&] {
        check_ptr(out, "out");
        at::Generator gen = default_generator(cuda_device);
        // See libtorch's Note [Acquire lock when using random generators].
        std::lock_guard<std::mutex> lock(gen.mutex());
        *out = new at::Tensor(gen.get_state());
    });
}

// The default generator's state = state (torch.set_rng_state / torch.cuda.set_rng_state).
// libtorch checks the state's dtype and size and throws on a mismatch.
char *hpc_ckpt_rng_set_state(int64_t cuda_device, const at::Tensor *state) {
    return guarded([&] {
        check_ptr(state, "state");
        at::Generator gen = default_generator(cuda_device);
        std::lock_guard<std::mutex> lock(gen.mutex());
        gen.set_state(*state);
    });
}

// torch.autocast(device_type, dtype).__enter__: remember the previous state in *prev_enabled,
// *prev_dtype (an at::ScalarType) and *prev_cache, enable autocast for the device type with
// `dtype`, increment the nesting, enable the cast cache. device_type: 0 CPU, 1 CUDA.
char *hpc_ckpt_autocast_enter(int device_type, int dtype, bool *prev_enabled, int *prev_dtype,
                              bool *prev_cache) {
    return guarded([&] {
        check_ptr(prev_enabled, "prev_enabled");
        check_ptr(prev_dtype, "prev_dtype");
        check_ptr(prev_cache, "prev_cache");
        TORCH_CHECK(device_type == 0 || device_type == 1, "autocast device type ", device_type,
                    " is neither CPU (0) nor CUDA (1)");
        const auto dev = device_type == 0 ? at::kCPU : at::kCUDA;
        const auto fast = static_cast<at::ScalarType>(dtype);
        TORCH_CHECK(fast == at::kBFloat16 || fast == at::kHalf, "autocast dtype ", fast,
                    " is neither bfloat16 nor float16");
        *prev_cache = at::autocast::is_autocast_cache_enabled();
        *prev_enabled = at::autocast::is_autocast_enabled(dev);
        *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(dev));
        at::autocast::set_autocast_enabled(dev, true);
        at::autocast::set_autocast_dtype(dev, fast);
        at::autocast::increment_nesting();
        at::autocast::set_autocast_cache_enabled(true);
    });
}

// torch.autocast.__exit__: decrement the nesting (clear the cast cache when it reaches 0), then
// put back the state hpc_ckpt_autocast_enter saved.
char *hpc_ckpt_autocast_exit(int device_type, bool prev_enabled, int prev_dtype,
                             bool prev_cache) {
    return guarded([&] {
        const auto dev = device_type == 0 ? at::kCPU : at::kCUDA;
        if (at::autocast::decrement_nesting() == 0) {
            at::autocast::clear_cache();
        }
        at::autocast::set_autocast_enabled(dev, prev_enabled);
        at::autocast::set_autocast_dtype(dev, static_cast<at::ScalarType>(prev_dtype));
        at::autocast::set_autocast_cache_enabled(prev_cache);
    });
}

// Whether autocast is enabled for the device type (0 CPU, 1 CUDA) on this thread.
bool hpc_ckpt_autocast_enabled(int device_type) {
    try {
        return at::autocast::is_autocast_enabled(device_type == 0 ? at::kCPU : at::kCUDA);
    } catch (...) {
        return false;
    }
}

// torch._amp_foreach_non_finite_check_and_unscale_(grads[0..n], found_inf, inv_scale): every
// grad *= inv_scale in place; found_inf = 1.0 when any element of any grad is inf or NaN.
char *hpc_ckpt_amp_foreach_unscale_(at::Tensor **grads, int64_t n, at::Tensor *found_inf,
                                   const at::Tensor *inv_scale) {
    return guarded([&] {
        check_ptr(found_inf, "found_inf");
        check_ptr(inv_scale, "inv_scale");
        std::vector<at::Tensor> list;
        list.reserve(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) {
            check_ptr(grads == nullptr ? nullptr : grads[i], "grad");
            list.push_back(*grads[i]);
        }
        at::_amp_foreach_non_finite_check_and_unscale_(list, *found_inf, *inv_scale);
    });
}

// torch.use_deterministic_algorithms(on) and torch.backends.cudnn.deterministic = on.
char *hpc_ckpt_set_deterministic(bool on) {
    return guarded([&] {
        at::globalContext().setDeterministicAlgorithms(on, /*warn_only=*/false);
        at::globalContext().setDeterministicCuDNN(on);
    });
}

}  // extern "C"
