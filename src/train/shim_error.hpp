// The error convention of hpc-ckpt's C++ shims (shim.cpp, collective.cpp): no C++ exception
// crosses the FFI boundary. `guarded` runs a body and returns nullptr on success, or the error
// message as a malloc'ed C string the Rust side reads and frees (src/train/ffi.rs, take_error).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace hpc_ckpt_shim {

// A malloc'ed copy of `what` (nullptr when out of memory).
inline char *dup_error(const char *what) {
    std::size_t n = std::strlen(what);
    char *out = static_cast<char *>(std::malloc(n + 1));
    if (out != nullptr) {
        std::memcpy(out, what, n + 1);
    }
    return out;
}

// Run `f`; nullptr, or the message of what it threw. `who` names the shim in the message of an
// exception that is not a std::exception.
template <typename F>
char *guarded(const char *who, F f) {
    try {
        f();
        return nullptr;
    } catch (const c10::Error &e) {
        // what_without_backtrace(): the message without libtorch's C++ stack dump.
        return dup_error(e.what_without_backtrace());
    } catch (const std::exception &e) {
        return dup_error(e.what());
    } catch (...) {
        std::string m = std::string("unknown C++ exception in hpc-ckpt's ") + who;
        return dup_error(m.c_str());
    }
}

}  // namespace hpc_ckpt_shim
