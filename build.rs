//! Build script. Without the `torch` feature it does nothing (the login-node build needs no
//! libtorch and no C++ compiler).
//!
//! With `torch`:
//! - compiles `src/train/shim.cpp` (the few libtorch calls tch does not expose, see
//!   `src/train/ffi.rs`) against the headers of the same libtorch torch-sys links, with the flags
//!   torch-sys uses (`-std=c++17`, `-D_GLIBCXX_USE_CXX11_ABI=1`);
//! - compiles `src/train/collective.cpp` (libtorch's c10d `ProcessGroupGloo`, see
//!   `src/train/collective.rs`) the same way plus `-DUSE_C10D_GLOO` and Gloo's headers, which the
//!   torch wheel lacks: Debian's `libgloo-dev` (`tests/setup.sh --torch` installs it) in
//!   `/usr/include`, or the dir in `GLOO_INCLUDE`. Without them the build stops and says so;
//! - adds an rpath to libtorch's lib dir to every binary of this package (the CLI, test binaries,
//!   examples), so they run without `LD_LIBRARY_PATH`. The dir comes from torch-sys's `links`
//!   metadata (`DEP_TCH_LIBTORCH_LIB`), i.e. exactly the libtorch torch-sys found via `LIBTORCH`;
//! - keeps `libtorch_cuda.so` linked (into `hpc-ckpt-core`, tests, examples, benches; never into
//!   the launcher `hpc-ckpt`) when that libtorch has it: rustc links with `--as-needed` and
//!   no Rust code references a libtorch_cuda symbol, so the linker would drop it and CUDA would
//!   never be available at run time (tch-rs issues 907 and 980). Linking it costs every start
//!   ~0.6 s and ~400 MB on a CPU-only machine, so by default it is linked only when the build
//!   machine has an NVIDIA driver (`/proc/driver/nvidia` or `/dev/nvidiactl`);
//!   `HPC_CKPT_LINK_CUDA=1` forces it (a GPU build made on a CPU login node), `=0` refuses it.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "torch")]
    torch::main();
}

#[cfg(feature = "torch")]
mod torch {
    use std::env;
    use std::path::PathBuf;

    pub fn main() {
        println!("cargo:rerun-if-changed=src/train/shim.cpp");
        println!("cargo:rerun-if-changed=src/train/collective.cpp");
        println!("cargo:rerun-if-changed=src/train/shim_error.hpp");
        // torch-sys (`links = "tch"`) prints `cargo:libtorch_lib=DIR` on Linux and macOS.
        let lib = env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_else(|_| {
            panic!(
                "DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not report libtorch's lib dir \
                 (set LIBTORCH, e.g. run tests/setup.sh --torch)"
            )
        });
        let lib = PathBuf::from(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

        println!("cargo:rerun-if-env-changed=HPC_CKPT_LINK_CUDA");
        let want_cuda = match env::var("HPC_CKPT_LINK_CUDA").as_deref() {
            Ok("1") => true,
            Ok(_) => false,
            Err(_) => {
                std::path::Path::new("/proc/driver/nvidia").exists()
                    || std::path::Path::new("/dev/nvidiactl").exists()
            }
        };
        if want_cuda && lib.join("libtorch_cuda.so").exists() {
            // Not for the launcher `hpc-ckpt` (no libtorch; it must start in ~1 ms).
            let arg = "-Wl,--no-as-needed,-ltorch_cuda,--as-needed";
            println!("cargo:rustc-link-arg-bin=hpc-ckpt-core={arg}");
            for kind in ["tests", "examples", "benches"] {
                println!("cargo:rustc-link-arg-{kind}={arg}");
            }
        }

        // Headers: LIBTORCH_INCLUDE when given (as torch-sys reads it), else next to lib/.
        println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
        let root = match env::var("LIBTORCH_INCLUDE") {
            Ok(p) => PathBuf::from(p),
            Err(_) => lib
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("libtorch lib dir {} has no parent", lib.display())),
        };
        let include = root.join("include");
        assert!(
            include.join("ATen").join("ATen.h").exists(),
            "libtorch headers not found: {} has no ATen/ATen.h",
            include.display()
        );
        println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
        let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
        let libtorch_cpp = || {
            let mut b = cc::Build::new();
            b.cpp(true)
                .pic(true)
                .warnings(false)
                .include(&include)
                .include(
                    include
                        .join("torch")
                        .join("csrc")
                        .join("api")
                        .join("include"),
                )
                .flag("-std=c++17")
                .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
                .flag("-DGLOG_USE_GLOG_EXPORT");
            b
        };
        libtorch_cpp()
            .file("src/train/shim.cpp")
            .compile("hpc_ckpt_shim");

        let gloo = gloo_include();
        let mut collective = libtorch_cpp();
        collective.define("USE_C10D_GLOO", None);
        if let Some(dir) = &gloo {
            collective.include(dir);
        }
        collective
            .file("src/train/collective.cpp")
            .compile("hpc_ckpt_collective");
    }

    /// Gloo's headers: `GLOO_INCLUDE` (a dir holding `gloo/`), else the system include dir
    /// (`None`: the compiler's default path has them). Panics, naming the fix, when absent.
    fn gloo_include() -> Option<PathBuf> {
        // One header ProcessGroupGloo.hpp includes.
        const PROBE: &str = "gloo/rendezvous/store.h";
        println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
        if let Ok(dir) = env::var("GLOO_INCLUDE") {
            let dir = PathBuf::from(dir);
            assert!(
                dir.join(PROBE).exists(),
                "GLOO_INCLUDE={} has no {PROBE}: point it at the dir that holds gloo/",
                dir.display()
            );
            return Some(dir);
        }
        let system = std::path::Path::new("/usr/include");
        if system.join(PROBE).exists() {
            println!("cargo:rerun-if-changed={}", system.join(PROBE).display());
            return None;
        }
        panic!(
            "Gloo's headers are missing (no /usr/include/{PROBE}). The trainer's collectives \
             (src/train/collective.cpp, libtorch's c10d ProcessGroupGloo) compile against them; \
             the torch wheel does not ship them. Run `tests/setup.sh --torch` (installs Debian's \
             libgloo-dev), or `apt-get install libgloo-dev`, or set GLOO_INCLUDE to a dir holding \
             gloo/. Or build without the trainer: --no-default-features."
        );
    }
}
