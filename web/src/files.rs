//! What the loader gathers, whichever way the files come (file picker, drag and drop, URL): a
//! set of named files in memory, and the rules that decide which files to take. Pure, so that
//! the rules are tested natively; the browser side is `ui::loader`.

use std::collections::BTreeMap;

use qlora_core::checkpoint::CHECKPOINT_FILES;

/// The most a single file may hold: a wasm32 module addresses 4 GiB in all, and the page needs
/// room beside the file for its work.
pub const MAX_FILE_BYTES: u64 = 2 << 30;

/// The model's config, beside its checkpoint.
pub const CONFIG_FILE: &str = "config.json";

/// Files by name (no directories), as the user handed them over.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileSet {
    /// What the set is, for messages: a folder's name, a URL, or the first file's name.
    pub label: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl FileSet {
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.len() as u64).sum()
    }
}

/// The name a file is kept under: the last component of a path from a folder pick
/// (`model/config.json` → `config.json`).
pub fn base_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

/// Whether a file from a folder pick (`webkitRelativePath`, `folder/name`) sits directly in the
/// picked folder: files of subfolders (other checkpoints, caches) are left out, so that their
/// names cannot collide with the model's.
pub fn directly_in_folder(relative_path: &str) -> bool {
    relative_path.split('/').filter(|p| !p.is_empty()).count() <= 2
}

/// A file too big to hold gives this message instead of an allocation failure.
pub fn check_size(name: &str, bytes: u64) -> Result<(), String> {
    if bytes > MAX_FILE_BYTES {
        Err(format!(
            "{name}: {} is more than the browser app can hold in memory ({} per file)",
            human_bytes(bytes),
            human_bytes(MAX_FILE_BYTES)
        ))
    } else {
        Ok(())
    }
}

/// `532.5 KiB`, `1.20 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value < 10.0 { 2 } else { 1 };
    format!("{value:.digits$} {}", UNITS[unit])
}

/// What a `?model=` URL points at, and so which files to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelUrl {
    /// A directory (`…/tiny-bloom/` or `…/tiny-bloom`): `config.json`, then the first of
    /// [`CHECKPOINT_FILES`] that exists there, and the shards if it is an index.
    Directory { base: String },
    /// One checkpoint file (`*.safetensors`, `*.index.json`, `*.bin`): it, its shards if it is
    /// an index, and `config.json` beside it if there is one.
    File { base: String, name: String },
}

impl ModelUrl {
    /// `url` is absolute, without query or fragment.
    pub fn parse(url: &str) -> ModelUrl {
        let is_checkpoint_file = |name: &str| {
            [".safetensors", ".index.json", ".bin", ".pt", ".pth"]
                .iter()
                .any(|ext| name.ends_with(ext))
        };
        match url.rsplit_once('/') {
            Some((dir, name)) if is_checkpoint_file(name) => ModelUrl::File {
                base: format!("{dir}/"),
                name: name.to_string(),
            },
            _ => ModelUrl::Directory {
                base: if url.ends_with('/') {
                    url.to_string()
                } else {
                    format!("{url}/")
                },
            },
        }
    }

    /// The directory the files are in, ending in `/`.
    pub fn base(&self) -> &str {
        match self {
            ModelUrl::Directory { base } | ModelUrl::File { base, .. } => base,
        }
    }

    /// The checkpoint file names to try, in order, until one exists.
    pub fn checkpoint_candidates(&self) -> Vec<String> {
        match self {
            ModelUrl::Directory { .. } => CHECKPOINT_FILES.iter().map(|f| f.to_string()).collect(),
            ModelUrl::File { name, .. } => vec![name.clone()],
        }
    }

    /// The URL of `name` in [`Self::base`].
    pub fn file_url(&self, name: &str) -> String {
        format!("{}{name}", self.base())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_folder_picks() {
        assert_eq!(base_name("tiny-bloom/config.json"), "config.json");
        assert_eq!(base_name("model.safetensors"), "model.safetensors");
        assert!(directly_in_folder("tiny-bloom/model.safetensors"));
        assert!(!directly_in_folder(
            "tiny-bloom/checkpoint-10/model.safetensors"
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(535_032), "522.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
        assert!(check_size("a", MAX_FILE_BYTES).is_ok());
        let err = check_size("big.safetensors", MAX_FILE_BYTES + 1).unwrap_err();
        assert!(
            err.starts_with("big.safetensors: 2.00 GiB is more than"),
            "{err}"
        );
    }

    #[test]
    fn model_urls() {
        let dir = ModelUrl::parse("http://127.0.0.1:8080/models/tiny-bloom");
        assert_eq!(dir.base(), "http://127.0.0.1:8080/models/tiny-bloom/");
        assert_eq!(dir.checkpoint_candidates()[0], "model.safetensors");
        assert_eq!(
            dir.file_url(CONFIG_FILE),
            "http://127.0.0.1:8080/models/tiny-bloom/config.json"
        );
        assert_eq!(
            ModelUrl::parse("http://h/m/"),
            ModelUrl::Directory {
                base: "http://h/m/".into()
            }
        );

        let file = ModelUrl::parse("http://h/g/tiny_bloom_reference.safetensors");
        assert_eq!(
            file,
            ModelUrl::File {
                base: "http://h/g/".into(),
                name: "tiny_bloom_reference.safetensors".into()
            }
        );
        assert_eq!(
            file.checkpoint_candidates(),
            ["tiny_bloom_reference.safetensors"]
        );
        assert!(matches!(
            ModelUrl::parse("http://h/m/model.safetensors.index.json"),
            ModelUrl::File { .. }
        ));
    }
}
