// libtorch's own collective engine, c10d::ProcessGroupGloo, for src/train/collective.rs: create a
// process group over a c10d store, all-reduce (sum) / broadcast CPU tensors in place, barrier,
// destroy. Nothing else: the smaller the surface, the less depends on the headers below.
//
// Build: compiled by build.rs with -DUSE_C10D_GLOO (without it ProcessGroupGloo.hpp declares
// nothing) and Gloo's headers from Debian's libgloo-dev (the torch wheel ships Gloo's code inside
// libtorch_cpu.so but not its headers). Those headers are older than the Gloo torch 2.13 was built
// with. That is safe only because nothing here depends on a Gloo type's layout or inline code:
// Gloo objects are held through std::shared_ptr created by libtorch itself (the device comes from
// ProcessGroupGloo::createDeviceFor*), and we call only out-of-line c10d functions (constructors,
// virtual collectives, Work::wait). Do not call the inline Gloo-touching members of
// ProcessGroupGloo.hpp (setTimeout, getContext, ...) from here.
//
// Error convention as in shim.cpp: every function returns NULL on success or a malloc'ed message
// (freed with hpc_ckpt_shim_free_error); no C++ exception crosses into Rust.
#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#ifndef USE_C10D_GLOO
#error "collective.cpp needs -DUSE_C10D_GLOO (build.rs sets it)"
#endif

#include "shim_error.hpp"

namespace {

template <typename F>
char *guarded(F f) {
    return hpc_ckpt_shim::guarded("collective shim", f);
}

struct Group {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

Group *check_group(void *g) {
    if (g == nullptr) {
        throw std::invalid_argument("null process group");
    }
    return static_cast<Group *>(g);
}

void check_tensor(const at::Tensor *t) {
    if (t == nullptr || !t->defined()) {
        throw std::invalid_argument("undefined tensor");
    }
    if (!t->device().is_cpu()) {
        throw std::invalid_argument("only CPU tensors are supported, found one on " +
                                    t->device().str());
    }
    if (!t->is_contiguous()) {
        throw std::invalid_argument("the tensor must be contiguous (a non-contiguous tensor "
                                    "would be reduced into a copy, not in place)");
    }
}

// Wait for a collective; Work::wait rethrows the collective's error (timeout, peer gone).
void finish(const c10::intrusive_ptr<c10d::Work> &work) {
    if (!work->wait()) {
        throw std::runtime_error("the collective did not complete");
    }
}

}  // namespace

extern "C" {

// Rendezvous: `file_path` non-NULL selects a c10d::FileStore at that path (shared file system,
// one fresh path per group); else a c10d::TCPStore at host:port, rank 0 its server (listening on
// `port`, waiting for all `size` ranks). `device_host` NULL: Gloo's default device (this
// machine's hostname, falling back to loopback); else bind to that hostname/address.
// `timeout_ms` bounds the store's connect, the rendezvous and every later collective.
char *hpc_ckpt_pg_new(const char *host, uint16_t port, const char *file_path,
                      const char *device_host, int rank, int size, int64_t timeout_ms,
                      void **out) {
    return guarded([&] {
        if (out == nullptr) {
            throw std::invalid_argument("null out pointer");
        }
        *out = nullptr;
        if (size < 1 || rank < 0 || rank >= size) {
            throw std::invalid_argument("rank " + std::to_string(rank) + " is not in [0, " +
                                        std::to_string(size) + ")");
        }
        const std::chrono::milliseconds timeout(timeout_ms);
        c10::intrusive_ptr<c10d::Store> store;
        if (file_path != nullptr) {
            store = c10::make_intrusive<c10d::FileStore>(std::string(file_path), size);
            store->setTimeout(timeout);
        } else {
            if (host == nullptr) {
                throw std::invalid_argument("no store host and no store file");
            }
            c10d::TCPStoreOptions opts;
            opts.port = port;
            opts.isServer = rank == 0;
            opts.numWorkers = static_cast<std::size_t>(size);
            opts.waitWorkers = true;
            opts.timeout = timeout;
            store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
        }
        auto options = c10d::ProcessGroupGloo::Options::create(timeout);
        options->devices.push_back(
            device_host == nullptr
                ? c10d::ProcessGroupGloo::createDefaultDevice()
                : c10d::ProcessGroupGloo::createDeviceForHostname(std::string(device_host)));
        auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
        *out = new Group{std::move(store), std::move(pg)};
    });
}

void hpc_ckpt_pg_free(void *g) {
    try {
        delete static_cast<Group *>(g);
    } catch (...) {
        // A destructor that throws (it should not) must not unwind into Rust.
    }
}

char *hpc_ckpt_pg_all_reduce_sum(void *g, at::Tensor *t) {
    return guarded([&] {
        Group *group = check_group(g);
        check_tensor(t);
        std::vector<at::Tensor> ts{*t};
        c10d::AllreduceOptions opts;
        opts.reduceOp = c10d::ReduceOp::SUM;
        finish(group->pg->allreduce(ts, opts));
    });
}

char *hpc_ckpt_pg_broadcast(void *g, at::Tensor *t, int root) {
    return guarded([&] {
        Group *group = check_group(g);
        check_tensor(t);
        if (root < 0 || root >= group->pg->getSize()) {
            throw std::invalid_argument("root " + std::to_string(root) + " is not a rank of " +
                                        std::to_string(group->pg->getSize()));
        }
        std::vector<at::Tensor> ts{*t};
        c10d::BroadcastOptions opts;
        opts.rootRank = root;
        opts.rootTensor = 0;
        finish(group->pg->broadcast(ts, opts));
    });
}

char *hpc_ckpt_pg_barrier(void *g) {
    return guarded([&] {
        Group *group = check_group(g);
        finish(group->pg->barrier(c10d::BarrierOptions()));
    });
}

}  // extern "C"
