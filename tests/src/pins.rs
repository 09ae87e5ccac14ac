//! A unique bpffs directory for one test's pinned maps.

use std::path::{Path, PathBuf};

use crate::netns::unique_name;

/// A directory under /sys/fs/bpf, removed with everything in it on drop.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// A fresh, not yet created, directory path.
    pub fn new(tag: &str) -> Self {
        Self { path: Path::new("/sys/fs/bpf").join(unique_name(&format!("ballast-{tag}"))) }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // bpffs supports unlink and rmdir but not recursive removal in one call.
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove(&e.path());
                    } else {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.path);
    }
}
