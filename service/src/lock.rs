//! One `zerotouch serve` per data dir.
//!
//! `serve` takes an exclusive OS lock (`flock`) on `{data_dir}/serve.lock` before it touches
//! anything else in the data dir, and writes its pid into the file. The lock belongs to the
//! open file, so it ends with the process however the process ends (a clean stop, a crash or
//! SIGKILL); the file itself stays, and its pid is only a hint for the message a second start
//! prints. Two servers on one data dir would share one SQLite database, one CA folder and one
//! TLS key while each thought it was alone.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The lock file's name in the data dir.
pub const LOCK_FILE: &str = "serve.lock";

/// The held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct DataDirLock {
    path: PathBuf,
    file: File,
}

impl Drop for DataDirLock {
    /// Unlocks explicitly before the file closes: a child process forked by another thread of
    /// this process (between its fork and its exec) holds a copy of the descriptor, which would
    /// keep an flock alive after our close, and a restart in this process would be refused.
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl DataDirLock {
    /// Locks `data_dir` (which must exist) for this process, or says who holds it.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
        let path = data_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "a process that is still starting".to_string(),
                };
                bail!(
                    "the data dir {} is in use by another zerotouch serve ({holder}; lock file \
                     {}): stop that server first, or give this one a data dir of its own \
                     (--data-dir or service.data_dir)",
                    data_dir.display(),
                    path.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        // Ours now: replace whatever pid an earlier holder left.
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(DataDirLock { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pid written in a data dir's lock file, if any.
    fn recorded_pid(data_dir: &Path) -> Option<u32> {
        std::fs::read_to_string(data_dir.join(LOCK_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_until_the_first_goes() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        assert_eq!(recorded_pid(dir.path()), Some(std::process::id()));
        // flock locks belong to the open file: a second open in the same process conflicts too.
        let err = format!("{:#}", DataDirLock::acquire(dir.path()).unwrap_err());
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("--data-dir"), "{err}");
        drop(first);
        let again = DataDirLock::acquire(dir.path()).unwrap();
        assert!(again.path().ends_with(LOCK_FILE));
    }

    #[test]
    fn a_copy_of_the_descriptor_does_not_outlive_the_lock() {
        // What a child forked by another thread holds between its fork and its exec.
        let dir = tempfile::tempdir().unwrap();
        let lock = DataDirLock::acquire(dir.path()).unwrap();
        let copy = lock.file.try_clone().unwrap();
        drop(lock);
        let again = DataDirLock::acquire(dir.path());
        drop(copy);
        assert!(again.is_ok(), "{:#}", again.unwrap_err());
    }
}
