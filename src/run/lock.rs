//! One process at a time in a run folder: an advisory lock on `RUN/.lock`, which names the PID
//! that holds it.
//!
//! The lock is `flock(2)` on the file, so the kernel releases it when its holder dies however
//! it dies: a crashed run's lock is taken over by the next process without anyone deleting a
//! file. The file itself stays (deleting it would let two processes lock two different
//! inodes).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const LOCK: &str = ".lock";

/// The lock of one run folder, held until dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

impl RunLock {
    /// Lock `run_dir` for this process, or say which process has it.
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        let path = run_dir.join(LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::file(&path, format!("cannot open the run's lock file: {e}")))?;
        if !try_lock(&file) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
            return Err(Error::file(
                run_dir,
                format!("the run is in use by {who} (it holds {LOCK}); wait for it to finish or stop it, then try again"),
            ));
        }
        let pid = std::process::id().to_string();
        let written = file.set_len(0).and_then(|_| file.seek(SeekFrom::Start(0))).and_then(|_| file.write_all(pid.as_bytes()));
        written.map_err(|e| Error::file(&path, format!("cannot write the run's lock file: {e}")))?;
        Ok(RunLock { _file: file, path })
    }
}

#[cfg(unix)]
fn try_lock(file: &File) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid open descriptor; flock only reads its arguments.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(not(unix))]
fn try_lock(_: &File) -> bool {
    // No advisory locks here: a second process is not stopped.
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let run = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(run.path()).unwrap();
        let e = RunLock::acquire(run.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("in use by process {}", std::process::id())), "{e}");
        drop(first);
        RunLock::acquire(run.path()).unwrap();
    }
}
