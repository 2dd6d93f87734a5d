//! Writing outputs so that a crash or an error never leaves a half-written file or directory at
//! the target path: everything goes to a temporary sibling, renamed into place at the end.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The directory that holds `target` (`.` for a bare file name) and `target`'s file name.
fn parent_and_name(target: &Path) -> Result<(PathBuf, String)> {
    let name = target
        .file_name()
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: not a file or directory name",
                target.display()
            ))
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// A file written under a temporary name beside its target and renamed onto it by
/// [`AtomicFile::commit`]; dropped without commit, the temporary file is deleted.
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
}

impl AtomicFile {
    pub fn create(target: &Path) -> Result<AtomicFile> {
        let (parent, name) = parent_and_name(target)?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .tempfile_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        Ok(AtomicFile {
            tmp,
            target: target.to_path_buf(),
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flushes the data to disk and renames the file onto the target (replacing a file there).
    pub fn commit(mut self) -> Result<()> {
        self.tmp.flush().map_err(|e| Error::io(&self.target, e))?;
        // Temporary files are created private (0600); the output is an ordinary file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            self.tmp
                .as_file()
                .set_permissions(fs::Permissions::from_mode(0o644))
                .map_err(|e| Error::io(&self.target, e))?;
        }
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| Error::io(&self.target, e))?;
        self.tmp
            .persist(&self.target)
            .map_err(|e| Error::io(&self.target, e.error))?;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tmp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tmp.flush()
    }
}

impl Seek for AtomicFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.tmp.seek(pos)
    }
}

/// An output directory built as `<target>.tmp-<pid>` beside the target and renamed onto it by
/// [`AtomicDir::commit`]; dropped without commit, the temporary directory is removed.
pub struct AtomicDir {
    tmp: PathBuf,
    target: PathBuf,
    overwrite: bool,
    committed: bool,
}

impl AtomicDir {
    /// Starts an output directory. Fails at once if `target` is a non-empty directory and
    /// `overwrite` is false, or is something other than a directory, so no work is wasted.
    pub fn create(target: &Path, overwrite: bool) -> Result<AtomicDir> {
        check_target(target, overwrite)?;
        let (parent, name) = parent_and_name(target)?;
        let tmp = parent.join(format!("{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            // Left by an earlier run that had this process id and was killed.
            fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicDir {
            tmp,
            target: target.to_path_buf(),
            overwrite,
            committed: false,
        })
    }

    /// The temporary directory to write files into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// `path().join(name)`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.tmp.join(name)
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the temporary directory onto the target. An existing empty target directory is
    /// replaced; a non-empty one only with `overwrite` (it is moved aside first and deleted once
    /// the new directory is in place).
    pub fn commit(mut self) -> Result<PathBuf> {
        check_target(&self.target, self.overwrite)?;
        let mut old = None;
        if self.target.exists() {
            if is_empty_dir(&self.target)? {
                fs::remove_dir(&self.target).map_err(|e| Error::io(&self.target, e))?;
            } else {
                let (parent, name) = parent_and_name(&self.target)?;
                let aside = parent.join(format!("{name}.old-{}", std::process::id()));
                fs::rename(&self.target, &aside).map_err(|e| Error::io(&self.target, e))?;
                old = Some(aside);
            }
        }
        fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        if let Some(aside) = old {
            fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
        }
        Ok(self.target.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: an error here cannot be reported, and the name is clearly temporary.
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn is_empty_dir(path: &Path) -> Result<bool> {
    let mut entries = fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    Ok(entries.next().is_none())
}

fn check_target(target: &Path, overwrite: bool) -> Result<()> {
    match fs::metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(target, e)),
        Ok(m) if !m.is_dir() => Err(Error::Invalid(format!(
            "{}: exists and is not a directory",
            target.display()
        ))),
        Ok(_) if overwrite || is_empty_dir(target)? => Ok(()),
        Ok(_) => Err(Error::Invalid(format!(
            "{}: exists and is not empty (pass the overwrite flag to replace it)",
            target.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_commit_drop_and_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");

        let dir = AtomicDir::create(&target, false).unwrap();
        fs::write(dir.join("a.txt"), "one").unwrap();
        assert!(!target.exists());
        let tmp = dir.path().to_path_buf();
        dir.commit().unwrap();
        assert_eq!(fs::read_to_string(target.join("a.txt")).unwrap(), "one");
        assert!(!tmp.exists());

        let err = AtomicDir::create(&target, false).err().unwrap().to_string();
        assert!(err.contains("not empty") && err.contains("out"), "{err}");

        let dir = AtomicDir::create(&target, true).unwrap();
        fs::write(dir.join("b.txt"), "two").unwrap();
        let tmp = dir.path().to_path_buf();
        drop(dir);
        assert!(!tmp.exists());
        assert!(target.join("a.txt").exists());

        let dir = AtomicDir::create(&target, true).unwrap();
        fs::write(dir.join("b.txt"), "two").unwrap();
        dir.commit().unwrap();
        assert!(!target.join("a.txt").exists());
        assert_eq!(fs::read_to_string(target.join("b.txt")).unwrap(), "two");
        let names: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out"]);
    }

    #[test]
    fn empty_target_dir_is_replaced_and_a_file_target_refused() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("empty");
        fs::create_dir(&target).unwrap();
        let dir = AtomicDir::create(&target, false).unwrap();
        fs::write(dir.join("x"), "x").unwrap();
        dir.commit().unwrap();
        assert!(target.join("x").exists());

        let file = root.path().join("file");
        fs::write(&file, "f").unwrap();
        assert!(AtomicDir::create(&file, true).is_err());
    }

    #[test]
    fn atomic_file_appears_only_on_commit() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("f.bin");
        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(b"hello").unwrap();
        assert!(!target.exists());
        f.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello");

        let mut f = AtomicFile::create(&target).unwrap();
        f.write_all(b"other").unwrap();
        drop(f);
        assert_eq!(fs::read(&target).unwrap(), b"hello");
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
    }
}
