//! Arbitrary bytes as a whole safetensors file. On success the header must describe tensors that
//! tile the data region exactly, each sized by its dtype × shape.
#![no_main]

use hpc_ckpt::storage::safetensors::{byte_len, parse_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = parse_bytes(data) else { return };
    let file_size = data.len() as u64;
    let n = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert_eq!(h.data_start, 8 + n, "data_start is 8 + header length");
    assert!(
        h.data_start <= file_size,
        "data_start past the end of the file"
    );
    let data_len = file_size - h.data_start;
    let mut expected = 0u64;
    for (i, t) in h.tensors.iter().enumerate() {
        if i > 0 {
            assert!(
                h.tensors[i - 1].begin <= t.begin,
                "tensors not sorted by begin"
            );
        }
        assert_eq!(
            t.begin, expected,
            "tensor {:?} leaves a hole or overlaps",
            t.name
        );
        assert!(
            t.end >= t.begin,
            "tensor {:?} ends before it begins",
            t.name
        );
        let len = byte_len(t.dtype, &t.shape).expect("accepted shape overflows");
        assert_eq!(
            len,
            t.end - t.begin,
            "tensor {:?}: dtype × shape != end - begin",
            t.name
        );
        assert_ne!(t.name, "__metadata__");
        expected = t.end;
    }
    assert_eq!(
        expected, data_len,
        "tensors do not cover the data region exactly"
    );
});
