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
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>

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

// torch.use_deterministic_algorithms(on) and torch.backends.cudnn.deterministic = on.
char *hpc_ckpt_set_deterministic(bool on) {
    return guarded([&] {
        at::globalContext().setDeterministicAlgorithms(on, /*warn_only=*/false);
        at::globalContext().setDeterministicCuDNN(on);
    });
}

}  // extern "C"
