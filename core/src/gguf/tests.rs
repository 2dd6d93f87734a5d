//! Parser tests on GGUF files built byte by byte, including corrupt ones.

use super::test_writer::Writer;
use super::*;

fn every_value_type() -> Writer {
    let mut w = Writer::new(3, 0, 14);
    w.key("u8", 0).raw(&[200]);
    w.key("i8", 1).raw(&[0xff]);
    w.key("u16", 2).raw(&513u16.to_le_bytes());
    w.key("i16", 3).raw(&(-2i16).to_le_bytes());
    w.key("u32", 4).u32(70000);
    w.key("i32", 5).raw(&(-70000i32).to_le_bytes());
    w.key("f32", 6).raw(&1.5f32.to_le_bytes());
    w.key("bool", 7).raw(&[1]);
    w.key("str", 8).str("héllo");
    w.key("arr", 9).u32(8).u64(2).str("a b").str("c");
    w.key("nested", 9).u32(9).u64(1).u32(5).u64(2);
    w.raw(&(-1i32).to_le_bytes()).raw(&7i32.to_le_bytes());
    w.key("u64", 10).u64(1 << 40);
    w.key("i64", 11).raw(&(-5i64).to_le_bytes());
    w.key("f64", 12).raw(&0.25f64.to_le_bytes());
    w
}

#[test]
fn parses_every_value_type_including_nested_arrays() {
    let g = Gguf::from_bytes("t.gguf", every_value_type().bytes).unwrap();
    assert_eq!(g.version(), 3);
    let get = |k: &str| g.get(k).unwrap().clone();
    assert_eq!(get("u8"), Value::U8(200));
    assert_eq!(get("i8"), Value::I8(-1));
    assert_eq!(get("u16"), Value::U16(513));
    assert_eq!(get("i16"), Value::I16(-2));
    assert_eq!(get("u32"), Value::U32(70000));
    assert_eq!(get("i32"), Value::I32(-70000));
    assert_eq!(get("f32"), Value::F32(1.5));
    assert_eq!(get("bool"), Value::Bool(true));
    assert_eq!(g.get_str("str").unwrap(), Some("héllo"));
    assert_eq!(g.get_str_array("arr").unwrap(), Some(vec!["a b", "c"]));
    assert_eq!(
        get("nested"),
        Value::Array(vec![Value::Array(vec![Value::I32(-1), Value::I32(7)])])
    );
    assert_eq!(g.get_u64("u64").unwrap(), Some(1 << 40));
    assert_eq!(get("i64"), Value::I64(-5));
    assert_eq!(g.get_f64("f64").unwrap(), Some(0.25));
    assert_eq!(g.get_u32("u16").unwrap(), Some(513));
    assert_eq!(g.get_u32("absent").unwrap(), None);
    assert_eq!(g.require("u32", Gguf::get_u32).unwrap(), 70000);
    let msg = g.require("absent", Gguf::get_u32).unwrap_err().to_string();
    assert_eq!(msg, "t.gguf: metadata `absent` is missing");
    assert_eq!(g.header().alignment, DEFAULT_ALIGNMENT);
    let msg = g.get_u32("i32").unwrap_err().to_string();
    assert!(msg.contains("t.gguf") && msg.contains("`i32`"), "{msg}");
    let msg = g.get_str("u8").unwrap_err().to_string();
    assert!(msg.contains("should be a string, but is UINT8"), "{msg}");
}

#[test]
fn version_2_parses_and_others_are_refused() {
    let mut w = Writer::new(2, 0, 1);
    w.key("general.name", 8).str("v2");
    let g = Gguf::from_bytes("v2.gguf", w.bytes).unwrap();
    assert_eq!(
        (g.version(), g.get_str("general.name").unwrap()),
        (2, Some("v2"))
    );
    for (version, expect) in [
        (1u32, "version 1 is not supported"),
        (4, "version 4 is not supported"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let msg = parse_header("x.gguf", &Writer::new(version, 0, 0).bytes)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(expect), "{msg}");
    }
    let msg = parse_header("x.gguf", b"GGML\x03\0\0\0")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a GGUF file"), "{msg}");
}

/// Two tensors with `general.alignment` = 64: the data section starts at the next multiple of 64.
fn two_tensors() -> Vec<u8> {
    let mut w = Writer::new(3, 2, 1);
    w.key("general.alignment", 4).u32(64);
    w.tensor("a", &[4, 2], 0, 0); // F32 4x2 = 32 bytes
    w.tensor("b", &[64], 3, 64); // Q4_1, 2 blocks = 40 bytes
    w.pad_to(64);
    let data: Vec<u8> = (0..104u8).collect();
    w.raw(&data);
    w.bytes
}

#[test]
fn tensor_infos_and_data_ranges_follow_the_alignment() {
    let bytes = two_tensors();
    let g = Gguf::from_bytes("t.gguf", bytes.clone()).unwrap();
    let h = g.header();
    assert_eq!(h.alignment, 64);
    assert_eq!(h.data_offset % 64, 0);
    let a = g.tensor("a").unwrap();
    assert_eq!((a.ggml_type, a.dims.clone()), (GgmlType::F32, vec![4, 2]));
    assert_eq!(a.shape(), vec![2, 4]);
    assert_eq!(a.n_elements(), 8);
    let start = h.data_offset as usize;
    assert_eq!(g.tensor_data("a").unwrap(), &bytes[start..start + 32]);
    assert_eq!(g.tensor_data("b").unwrap(), &bytes[start + 64..start + 104]);
    let msg = g.tensor_data("c").unwrap_err().to_string();
    assert!(msg.contains("tensor `c`"), "{msg}");
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    for bytes in [every_value_type().bytes, two_tensors()] {
        for len in 0..bytes.len() {
            assert!(
                parse_header("cut.gguf", &bytes[..len]).is_err(),
                "truncated to {len} bytes still parsed"
            );
        }
    }
}

#[test]
fn lying_counts_are_rejected_before_allocation() {
    let msg = parse_header("x.gguf", &Writer::new(3, 0, u64::MAX).bytes)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("metadata count"), "{msg}");
    let msg = parse_header("x.gguf", &Writer::new(3, u64::MAX / 2, 0).bytes)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("tensor info count"), "{msg}");
    let mut w = Writer::new(3, 0, 1);
    w.key("tokens", 9).u32(8).u64(1 << 60);
    let msg = parse_header("x.gguf", &w.bytes).unwrap_err().to_string();
    assert!(msg.contains("`tokens` array count"), "{msg}");
    let mut w = Writer::new(3, 0, 1);
    w.key("name", 8).u64(u64::MAX);
    let msg = parse_header("x.gguf", &w.bytes).unwrap_err().to_string();
    assert!(msg.contains("only 0 remain"), "{msg}");
}

#[test]
fn bad_values_and_tensor_infos_are_named() {
    let cases: Vec<(Writer, &str)> = vec![
        {
            let mut w = Writer::new(3, 0, 1);
            w.key("k", 13).u32(0);
            (w, "unknown value type 13")
        },
        {
            let mut w = Writer::new(3, 0, 1);
            w.key("k", 7).raw(&[2]);
            (w, "bool byte is 2")
        },
        {
            let mut w = Writer::new(3, 0, 1);
            w.key("k", 8).u64(2).raw(&[0xff, 0xfe]);
            (w, "not valid UTF-8")
        },
        {
            let mut w = Writer::new(3, 0, 2);
            w.key("k", 4).u32(1).key("k", 4).u32(2);
            (w, "duplicate metadata key `k`")
        },
        {
            let mut w = Writer::new(3, 0, 1);
            w.key("general.alignment", 4).u32(48);
            (w, "power of two")
        },
        {
            let mut w = Writer::new(3, 1, 0);
            w.tensor("t", &[1, 1, 1, 1, 1], 0, 0);
            (w, "5 dimensions")
        },
        {
            let mut w = Writer::new(3, 1, 0);
            w.tensor("t", &[32], 4, 0);
            (w, "unknown ggml type 4")
        },
        {
            let mut w = Writer::new(3, 1, 0);
            w.tensor("t", &[33], 8, 0);
            (w, "not a whole number of Q8_0 blocks")
        },
        {
            let mut w = Writer::new(3, 1, 0);
            w.tensor("t", &[u64::MAX, 2], 0, 0);
            (w, "overflows")
        },
        {
            let mut w = Writer::new(3, 1, 0);
            w.tensor("t", &[1], 0, 8);
            (w, "not a multiple of the alignment")
        },
        {
            let mut w = Writer::new(3, 1, 0);
            w.tensor("t", &[1000], 0, 0);
            (w, "past the end")
        },
        {
            let mut w = Writer::new(3, 2, 0);
            w.tensor("t", &[0], 0, 0).tensor("t", &[0], 0, 0).pad_to(32);
            (w, "appears twice")
        },
    ];
    for (w, expect) in cases {
        let msg = parse_header("bad.gguf", &w.bytes).unwrap_err().to_string();
        assert!(
            msg.contains("bad.gguf") && msg.contains(expect),
            "want `{expect}`: {msg}"
        );
    }
}

#[test]
fn deeply_nested_arrays_are_refused() {
    let mut w = Writer::new(3, 0, 1);
    w.key("deep", 9);
    for _ in 0..20 {
        w.u32(9).u64(1);
    }
    w.u32(4).u64(0);
    let msg = parse_header("x.gguf", &w.bytes).unwrap_err().to_string();
    assert!(msg.contains("nested deeper"), "{msg}");
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn open_maps_a_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, two_tensors()).unwrap();
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.tensors().len(), 2);
    assert_eq!(g.name(), path.display().to_string());
    let missing = dir.path().join("missing.gguf");
    let msg = Gguf::open(&missing).unwrap_err().to_string();
    assert!(msg.contains("missing.gguf"), "{msg}");
}

#[test]
fn corrupting_any_byte_never_panics() {
    for bytes in [every_value_type().bytes, two_tensors()] {
        for at in 0..bytes.len() {
            for value in [0x00, 0x7f, 0xff] {
                let mut corrupt = bytes.clone();
                corrupt[at] = value;
                // Ok or Err are both fine; a panic or a huge allocation fails the test.
                let _ = parse_header("corrupt.gguf", &corrupt);
            }
        }
    }
}
