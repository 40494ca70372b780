//! Fuzz `Manifest::parse`: it must never panic; whatever it accepts lists only valid file names,
//! and survives `to_json()` → `parse()` exactly (serde_json's `float_roundtrip` keeps every f64;
//! without it some floats came back 1 ULP off — found by this target, seed `float_1ulp.json`).
#![no_main]

use hpc_ckpt::storage::manifest::{check_file_name, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::parse(data) else { return };
    for f in &m.files {
        if let Err(e) = check_file_name(&f.name) {
            panic!("accepted manifest lists a bad file name {:?}: {e}", f.name);
        }
    }
    let json = m.to_json();
    let again = match Manifest::parse(&json) {
        Ok(a) => a,
        Err(e) => panic!(
            "re-serialized manifest does not parse: {e}\n{}",
            String::from_utf8_lossy(&json)
        ),
    };
    assert!(
        again == m,
        "manifest changed across to_json/parse:\n  parsed:   {m:?}\n  reparsed: {again:?}\n  json: {}",
        String::from_utf8_lossy(&json)
    );
});
