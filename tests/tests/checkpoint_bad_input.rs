//! Broken checkpoints, made from the good fixtures: each must give an error (never a panic)
//! that names the file and, where the problem is in one tensor, that tensor.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use qlora_core::checkpoint::{
    open_checkpoint, open_file, SafetensorsFile, SafetensorsWriter, TensorSource, TorchFile,
};
use qlora_tests::fixtures;
use tempfile::TempDir;

fn golden_safetensors() -> Vec<u8> {
    std::fs::read(fixtures().join("golden/tiny-bloom/model.safetensors")).unwrap()
}

fn torch_fixture(name: &str) -> PathBuf {
    fixtures().join("torch").join(name)
}

/// Writes `bytes` as `name` in a fresh temporary directory.
fn write_temp(name: &str, bytes: &[u8]) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// Opens `path` (and reads every tensor), expecting an error; returns its message.
fn open_err(path: &Path) -> String {
    let result = open_checkpoint(path).and_then(|src| {
        for info in src.tensor_infos() {
            src.read(&info.name)?;
        }
        Ok(())
    });
    match result {
        Ok(()) => panic!("{} opened without error", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_names(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "`{part}` missing from the error: {err}");
    }
}

/// The golden file with its header rewritten by `edit` (the data section unchanged).
fn with_header(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
    let bytes = golden_safetensors();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

const LN: &str = "transformer.ln_f.weight";
const LN_BIAS: &str = "transformer.ln_f.bias";

fn offsets(header: &serde_json::Map<String, serde_json::Value>, name: &str) -> (u64, u64) {
    let o = &header[name]["data_offsets"];
    (o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
}

#[test]
fn truncated_safetensors() {
    let bytes = golden_safetensors();
    let (_d, path) = write_temp("cut.safetensors", &bytes[..bytes.len() / 2]);
    let err = open_err(&path);
    assert_names(
        &err,
        &["cut.safetensors", "tensor `", "do not fit the data section"],
    );

    let (_d, path) = write_temp("tiny.safetensors", &bytes[..5]);
    assert_names(&open_err(&path), &["tiny.safetensors", "truncated"]);
}

#[test]
fn header_length_larger_than_file() {
    let mut bytes = golden_safetensors();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    let (_d, path) = write_temp("long.safetensors", &bytes);
    assert_names(
        &open_err(&path),
        &["long.safetensors", "header length", "exceeds the file"],
    );
}

#[test]
fn data_offsets_that_lie() {
    let bytes = with_header(|h| {
        let (s, e) = offsets(h, LN);
        h[LN]["data_offsets"] = serde_json::json!([s, e - 4]);
    });
    let (_d, path) = write_temp("lie.safetensors", &bytes);
    assert_names(
        &open_err(&path),
        &[
            "lie.safetensors",
            &format!("`{LN}`"),
            "needs 256 bytes",
            "cover 252",
        ],
    );
}

#[test]
fn data_offsets_that_overlap() {
    let bytes = with_header(|h| {
        let o = h[LN]["data_offsets"].clone();
        h[LN_BIAS]["data_offsets"] = o;
    });
    let (_d, path) = write_temp("overlap.safetensors", &bytes);
    let err = open_err(&path);
    assert_names(&err, &["overlap.safetensors", "overlap those of tensor"]);
    assert!(err.contains(LN) && err.contains(LN_BIAS), "{err}");
}

#[test]
fn data_offsets_beyond_the_file() {
    let bytes = with_header(|h| {
        let (s, e) = offsets(h, LN);
        h[LN]["data_offsets"] = serde_json::json!([s + 10_000_000, e + 10_000_000]);
    });
    let (_d, path) = write_temp("beyond.safetensors", &bytes);
    assert_names(
        &open_err(&path),
        &[
            "beyond.safetensors",
            &format!("`{LN}`"),
            "do not fit the data section",
        ],
    );
}

#[test]
fn wrong_dtype_string() {
    let bytes = with_header(|h| h[LN]["dtype"] = "F33".into());
    let (_d, path) = write_temp("dtype.safetensors", &bytes);
    assert_names(
        &open_err(&path),
        &[
            "dtype.safetensors",
            &format!("`{LN}`"),
            "unknown or unsupported dtype `F33`",
        ],
    );
}

#[test]
fn shape_times_dtype_differs_from_byte_range() {
    let bytes = with_header(|h| h[LN]["shape"] = serde_json::json!([65]));
    let (_d, path) = write_temp("shape.safetensors", &bytes);
    assert_names(
        &open_err(&path),
        &[
            "shape.safetensors",
            &format!("`{LN}`"),
            "shape [65]",
            "needs 260 bytes",
        ],
    );

    // A shape whose byte size overflows must be refused, not multiplied blindly.
    let bytes = with_header(|h| h[LN]["shape"] = serde_json::json!([u64::MAX, 4]));
    let (_d, path) = write_temp("huge.safetensors", &bytes);
    assert_names(
        &open_err(&path),
        &["huge.safetensors", &format!("`{LN}`"), "more than 2^64"],
    );
}

/// A copy of the f16 sharded fixture in a temporary directory.
fn sharded_copy() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(torch_fixture("st-sharded-f16")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn missing_shard() {
    let dir = sharded_copy();
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    assert_names(
        &open_err(dir.path()),
        &[
            "model.safetensors.index.json",
            "shard `model-00002-of-00003.safetensors`",
            "missing",
        ],
    );
}

#[test]
fn index_names_a_tensor_absent_from_its_shard() {
    let dir = sharded_copy();
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]["transformer.ghost.weight"] = "model-00001-of-00003.safetensors".into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    assert_names(
        &open_err(dir.path()),
        &[
            "model.safetensors.index.json",
            "`transformer.ghost.weight`",
            "model-00001-of-00003.safetensors",
            "does not hold it",
        ],
    );
}

#[test]
fn empty_directory_says_what_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    assert_names(
        &open_err(dir.path()),
        &["model.safetensors, model.safetensors.index.json, pytorch_model.bin"],
    );
}

fn views_bin() -> Vec<u8> {
    std::fs::read(torch_fixture("views.bin")).unwrap()
}

/// `bytes` with the one occurrence of `from` replaced by `to`.
fn patch(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    let hits: Vec<usize> = bytes
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "{from:?} occurs {} times", hits.len());
    bytes.splice(hits[0]..hits[0] + from.len(), to.iter().copied());
    bytes
}

#[test]
fn corrupt_zip() {
    // The end-of-central-directory record lost: no zip at all.
    let mut bytes = views_bin();
    let len = bytes.len();
    bytes.truncate(len - 30);
    let (_d, path) = write_temp("cut.bin", &bytes);
    assert_names(&open_err(&path), &["cut.bin", "not a zip archive"]);

    // A central directory offset that points past the end.
    let mut bytes = views_bin();
    let eocd = bytes
        .windows(4)
        .rposition(|w| w == [0x50, 0x4b, 0x05, 0x06])
        .unwrap();
    let zip64 = bytes
        .windows(4)
        .rposition(|w| w == [0x50, 0x4b, 0x06, 0x06]);
    match zip64 {
        Some(z) => bytes[z + 48..z + 56].copy_from_slice(&u64::MAX.to_le_bytes()),
        None => bytes[eocd + 16..eocd + 20].copy_from_slice(&u32::MAX.to_le_bytes()),
    }
    let (_d, path) = write_temp("cd.bin", &bytes);
    assert_names(&open_err(&path), &["cd.bin", "central directory offset"]);
}

#[test]
fn corrupt_pickle() {
    // The state dict's first opcode (EMPTY_DICT after PROTO 2) made an opcode pickle lacks.
    let bytes = patch(views_bin(), b"\x80\x02}q\x00(X", b"\x80\x02\xffq\x00(X");
    let (_d, path) = write_temp("pickle.bin", &bytes);
    assert_names(
        &open_err(&path),
        &[
            "pickle.bin",
            "views/data.pkl",
            "unsupported pickle opcode 0xff at byte 2",
        ],
    );

    // A callable torch.save never emits.
    let bytes = patch(
        views_bin(),
        b"_rebuild_tensor_v2\n",
        b"_rebuild_tensor_v9\n",
    );
    let (_d, path) = write_temp("callable.bin", &bytes);
    assert_names(
        &open_err(&path),
        &[
            "callable.bin",
            "unsupported pickle callable torch._utils._rebuild_tensor_v9",
        ],
    );

    // The pickle cut short: the zip entry is intact but its program ends early.
    let bytes = patch(
        views_bin(),
        b"X\x06\x00\x00\x00scalar",
        b"X\xff\xff\x00\x00scalar",
    );
    let (_d, path) = write_temp("short.bin", &bytes);
    assert_names(
        &open_err(&path),
        &[
            "short.bin",
            "views/data.pkl",
            "pickle truncated: 65535 bytes wanted",
        ],
    );
}

/// `views.bin` with the central-directory method of `entry` set to deflate.
fn mark_compressed(mut bytes: Vec<u8>, entry: &str) -> Vec<u8> {
    let at = (0..bytes.len() - 46)
        .find(|&i| {
            bytes[i..i + 4] == [0x50, 0x4b, 0x01, 0x02]
                && bytes[i + 46..].starts_with(entry.as_bytes())
                && bytes[i + 46 + entry.len()..].first() != Some(&b'/')
        })
        .filter(|&i| u16::from_le_bytes([bytes[i + 28], bytes[i + 29]]) as usize == entry.len())
        .unwrap();
    bytes[at + 10..at + 12].copy_from_slice(&8u16.to_le_bytes());
    bytes
}

#[test]
fn compressed_entry() {
    let (_d, path) = write_temp(
        "deflated.bin",
        &mark_compressed(views_bin(), "views/data/0"),
    );
    assert_names(
        &open_err(&path),
        &[
            "deflated.bin",
            "tensor `base`",
            "`views/data/0` is compressed",
        ],
    );

    let (_d, path) = write_temp("pkl.bin", &mark_compressed(views_bin(), "views/data.pkl"));
    assert_names(
        &open_err(&path),
        &["pkl.bin", "`views/data.pkl` is compressed"],
    );
}

#[test]
fn legacy_format() {
    let err = open_err(&torch_fixture("legacy.bin"));
    assert_names(&err, &["legacy.bin", "legacy", "re-save"]);
}

#[test]
fn unknown_storage_type() {
    let bytes = patch(
        views_bin(),
        b"torch\nHalfStorage\n",
        b"torch\nHalfStorXge\n",
    );
    let (_d, path) = write_temp("storage.bin", &bytes);
    assert_names(
        &open_err(&path),
        &[
            "storage.bin",
            "tensor `f16`",
            "unknown storage type torch.HalfStorXge",
        ],
    );
}

#[test]
fn storage_and_views_checked_against_the_entry() {
    // Storage 0 claims 64 elements; its entry holds 48 f32.
    let bytes = patch(
        views_bin(),
        b"X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K0t",
        b"X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K@t",
    );
    let (_d, path) = write_temp("numel.bin", &bytes);
    assert_names(
        &open_err(&path),
        &[
            "numel.bin",
            "tensor `base`",
            "needs 256 bytes but its entry holds 192",
        ],
    );

    // row_slice moved to offset 32: its last row falls outside the 48-element storage.
    let bytes = patch(
        views_bin(),
        b"QK\x10K\x03K\x08\x86",
        b"QK\x20K\x03K\x08\x86",
    );
    let (_d, path) = write_temp("view.bin", &bytes);
    assert_names(
        &open_err(&path),
        &[
            "view.bin",
            "tensor `row_slice`",
            "reaches element 55",
            "which has 48",
        ],
    );
}

#[test]
fn index_json_opened_as_a_file() {
    // Opening the index file itself works like opening its directory.
    let src = open_file(&torch_fixture(
        "bin-sharded-bf16/pytorch_model.bin.index.json",
    ))
    .unwrap();
    assert_eq!(src.tensor_infos().len(), 29);
}

/// Opens and reads every tensor of in-memory bytes, returning whether it worked; a panic fails
/// the test.
fn read_all(src: qlora_core::Result<impl TensorSource>) -> bool {
    src.and_then(|s| {
        s.tensor_infos()
            .iter()
            .try_for_each(|i| s.read(&i.name).map(drop))
    })
    .is_ok()
}

/// Every single-byte change of a torch file and of a safetensors file, and every truncation of the
/// torch file, gives a result or an error, never a panic.
#[test]
fn no_panic_on_any_single_byte_change_or_truncation() {
    let views = views_bin();
    for at in 0..views.len() {
        for byte in [0x00, 0xff, views[at] ^ 0x01] {
            let mut bad = views.clone();
            bad[at] = byte;
            read_all(TorchFile::from_bytes("views.bin", bad));
        }
        assert!(!read_all(TorchFile::from_bytes(
            "views.bin",
            views[..at].to_vec()
        )));
    }
    // A small safetensors file of mixed dtypes: the tensors of views.bin.
    let torch = TorchFile::from_bytes("views.bin", views).unwrap();
    let plan = torch.tensor_infos();
    let mut writer =
        SafetensorsWriter::new(Cursor::new(Vec::new()), "views.safetensors", &plan).unwrap();
    for info in &plan {
        writer
            .write_tensor(&info.name, &torch.read(&info.name).unwrap().data)
            .unwrap();
    }
    let st = writer.finish().unwrap().into_inner();
    assert!(read_all(SafetensorsFile::from_bytes(
        "views.safetensors",
        st.clone()
    )));
    for at in 0..st.len() {
        for byte in [0x00, 0xff, st[at] ^ 0x01] {
            let mut bad = st.clone();
            bad[at] = byte;
            read_all(SafetensorsFile::from_bytes("views.safetensors", bad));
        }
    }
}
