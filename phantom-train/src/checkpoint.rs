//! Checkpoints written atomically, and finding the latest complete one to resume from.
//!
//! A checkpoint `k` is three Burn records — `model-k.bpk`, `optim-k.bpk` and `scheduler-k.bpk`
//! — each written to a temporary name and renamed into place, so a crash never leaves a
//! truncated file under a final name. It counts as complete only when all three exist.

use std::path::{Path, PathBuf};

use burn::train::checkpoint::{Checkpoint, Checkpointer, CheckpointerError};

/// The three record kinds of a checkpoint, in the order they are named on disk.
pub const KINDS: [&str; 3] = ["model", "optim", "scheduler"];

/// Saves one kind of record per checkpoint under `dir/{name}-{k}.bpk`.
pub struct AtomicFileCheckpointer {
    dir: PathBuf,
    name: String,
}

impl AtomicFileCheckpointer {
    /// A checkpointer for records called `name` in `dir` (created if missing).
    pub fn new(dir: &Path, name: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        })
    }

    fn path(&self, epoch: usize) -> PathBuf {
        record_path(&self.dir, &self.name, epoch)
    }
}

/// Where the record `name` of checkpoint `epoch` lives.
pub fn record_path(dir: &Path, name: &str, epoch: usize) -> PathBuf {
    dir.join(format!("{name}-{epoch}.bpk"))
}

impl<R: Checkpoint> Checkpointer<R> for AtomicFileCheckpointer {
    fn save(&self, epoch: usize, record: R) -> Result<(), CheckpointerError> {
        let path = self.path(epoch);
        let tmp = self.dir.join(format!(".{}-{epoch}.bpk.tmp", self.name));
        record.save(tmp.clone())?;
        std::fs::rename(&tmp, &path).map_err(CheckpointerError::IOError)
    }

    fn restore(&self, epoch: usize) -> Result<R, CheckpointerError> {
        R::load(self.path(epoch))
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        let path = self.path(epoch);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CheckpointerError::IOError(e)),
        }
    }
}

/// The highest checkpoint number in `dir` whose three records all exist.
pub fn latest_complete(dir: &Path) -> Option<usize> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix("model-")?.strip_suffix(".bpk")?;
            rest.parse::<usize>().ok()
        })
        .filter(|&k| KINDS.iter().all(|kind| record_path(dir, kind, k).exists()))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_checkpoints_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let touch = |name: &str| std::fs::write(dir.path().join(name), b"x").expect("write");
        assert_eq!(latest_complete(dir.path()), None);
        for kind in KINDS {
            touch(&format!("{kind}-1.bpk"));
        }
        touch("model-2.bpk");
        touch("optim-2.bpk");
        touch(".scheduler-2.bpk.tmp");
        assert_eq!(latest_complete(dir.path()), Some(1));
        touch("scheduler-2.bpk");
        assert_eq!(latest_complete(dir.path()), Some(2));
    }
}
