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
//!
//! The two C++ files take ~25 CPU-s to compile, and cargo reruns this script whenever their
//! mtime changes, i.e. in every fresh clone (CI's: `tests/ci.sh` shares one target dir between
//! clones), and once for `cargo check`/`clippy` and once more for `cargo build`/`test` (each has
//! its own OUT_DIR). So each compiled library is also kept in `<target>/cxx-cache/`, named by a
//! hash of everything its object code depends on (the sources' bytes, the flags, the compiler,
//! libtorch's and Gloo's headers' identity), and a run that finds it copies it instead of
//! compiling.

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
        // What the object code depends on besides the sources: the headers' identity (their
        // dirs, and libtorch's version header's bytes: a torch upgrade in place keeps the
        // path), the ABI flag.
        let version_h = std::fs::read(include.join("torch").join("version.h")).unwrap_or_default();
        let mut key = vec![
            include.display().to_string().into_bytes(),
            version_h,
            abi.clone().into_bytes(),
        ];
        let mut shim = libtorch_cpp();
        shim.file("src/train/shim.cpp");
        compile_cached(
            shim,
            "hpc_ckpt_shim",
            &["src/train/shim.cpp", "src/train/shim_error.hpp"],
            &key,
        );

        let gloo = gloo_include();
        let mut collective = libtorch_cpp();
        collective.define("USE_C10D_GLOO", None);
        if let Some(dir) = &gloo {
            collective.include(dir);
            key.push(dir.display().to_string().into_bytes());
        }
        key.push(gloo_identity(gloo.as_deref()));
        collective.file("src/train/collective.cpp");
        compile_cached(
            collective,
            "hpc_ckpt_collective",
            &["src/train/collective.cpp", "src/train/shim_error.hpp"],
            &key,
        );
    }

    /// Compile `build` into the static library `lib{name}.a` in OUT_DIR and link it, unless
    /// `<target>/cxx-cache/` holds the library of the same inputs (`sources`' bytes, `key`, the
    /// compiler and its flags): then that copy is linked. A cache that cannot be read or written
    /// only costs the compile.
    fn compile_cached(mut build: cc::Build, name: &str, sources: &[&str], key: &[Vec<u8>]) {
        use std::hash::{Hash, Hasher};
        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let file = format!("lib{name}.a");
        build.cargo_metadata(false);
        let compiler = build.get_compiler();
        // SipHash with fixed keys: stable for one build script binary, which is all a cache
        // needs (another toolchain misses and compiles).
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        for s in sources {
            std::fs::read(s)
                .unwrap_or_else(|e| panic!("cannot read {s}: {e}"))
                .hash(&mut h);
        }
        key.hash(&mut h);
        compiler.path().hash(&mut h);
        compiler.args().hash(&mut h);
        // The compiler's identity: its version banner (a new g++ at the same path misses).
        std::process::Command::new(compiler.path())
            .arg("--version")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default()
            .hash(&mut h);
        // <target>/<profile>/build/<pkg>-<hash>/out: four levels below the target dir.
        let cached = out.ancestors().nth(4).map(|t| {
            t.join("cxx-cache")
                .join(format!("{name}-{:016x}", h.finish()))
        });
        let hit = cached
            .as_ref()
            .is_some_and(|c| std::fs::copy(c.join(&file), out.join(&file)).is_ok());
        if !hit {
            build.compile(name);
            if let Some(c) = &cached {
                // Into a temporary name, then renamed: a concurrent build never sees half.
                let tmp = c.with_extension(format!("tmp{}", std::process::id()));
                let stored = std::fs::create_dir_all(&tmp)
                    .and_then(|_| std::fs::copy(out.join(&file), tmp.join(&file)))
                    .and_then(|_| std::fs::rename(&tmp, c));
                if stored.is_err() {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
            }
        }
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static={name}");
        println!("cargo:rustc-link-lib=stdc++");
    }

    /// What identifies the Gloo headers collective.cpp compiles against: the bytes of Gloo's
    /// `config.h` (it holds the version; a libgloo-dev upgrade changes it), else of the probe
    /// header.
    fn gloo_identity(dir: Option<&std::path::Path>) -> Vec<u8> {
        let dir = dir.unwrap_or(std::path::Path::new("/usr/include"));
        std::fs::read(dir.join("gloo").join("config.h"))
            .or_else(|_| std::fs::read(dir.join(GLOO_PROBE)))
            .unwrap_or_default()
    }

    /// One header ProcessGroupGloo.hpp includes.
    const GLOO_PROBE: &str = "gloo/rendezvous/store.h";

    /// Gloo's headers: `GLOO_INCLUDE` (a dir holding `gloo/`), else the system include dir
    /// (`None`: the compiler's default path has them). Panics, naming the fix, when absent.
    fn gloo_include() -> Option<PathBuf> {
        println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
        if let Ok(dir) = env::var("GLOO_INCLUDE") {
            let dir = PathBuf::from(dir);
            assert!(
                dir.join(GLOO_PROBE).exists(),
                "GLOO_INCLUDE={} has no {GLOO_PROBE}: point it at the dir that holds gloo/",
                dir.display()
            );
            return Some(dir);
        }
        let system = std::path::Path::new("/usr/include");
        if system.join(GLOO_PROBE).exists() {
            println!(
                "cargo:rerun-if-changed={}",
                system.join(GLOO_PROBE).display()
            );
            return None;
        }
        panic!(
            "Gloo's headers are missing (no /usr/include/{GLOO_PROBE}). The trainer's collectives \
             (src/train/collective.cpp, libtorch's c10d ProcessGroupGloo) compile against them; \
             the torch wheel does not ship them. Run `tests/setup.sh --torch` (installs Debian's \
             libgloo-dev), or `apt-get install libgloo-dev`, or set GLOO_INCLUDE to a dir holding \
             gloo/. Or build without the trainer: --no-default-features."
        );
    }
}
