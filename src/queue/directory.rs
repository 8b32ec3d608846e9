//! The SQLite store's directory: the lock that keeps a second relay off it, and the space held
//! in reserve for a full disk.
//!
//! The lock is an OS lock (`flock`) on `relay.lock`, held for as long as the store is open; the
//! file also records the holder's pid, for the message a second relay prints, and whether a
//! database was ever created here, so that a database that went missing is not taken for a
//! first start.
//!
//! The reserve is a file of zeros. Recording that a delivery completed needs a little space
//! (SQLite writes the change to its write-ahead log first), so on a full disk nothing could
//! leave the queue. When a write fails, the store deletes the reserve, which gives completions
//! and checkpoints the room to free space; appends wait until the reserve can be made again.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

pub const LOCK_FILE: &str = "relay.lock";
pub const RESERVE_FILE: &str = "relay.reserve";

/// The largest reserve; on a small filesystem it is an eighth of the filesystem's size.
const MAX_RESERVE_BYTES: u64 = 4 * 1024 * 1024;

/// The marker line `relay.lock` carries once a database was created in the directory.
const DATABASE_CREATED: &str = "database created";

/// Holds the storage directory for this process; dropping it lets go.
pub struct StorageLock {
    file: File,
    path: PathBuf,
    /// A database was created in this directory before (by an earlier run).
    database_created: bool,
}

impl StorageLock {
    /// Takes the directory's lock, or fails at once naming the process that holds it.
    pub fn acquire(directory: &Path) -> anyhow::Result<StorageLock> {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("cannot create the storage directory {}", directory.display()))?;
        let path = directory.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the storage lock {}", path.display()))?;
        let mut contents = String::new();
        if let Err(err) = file.try_lock() {
            let _ = file.read_to_string(&mut contents);
            let holder = holder_pid(&contents).map_or_else(|| "unknown".to_owned(), |pid| pid.to_string());
            return Err(match err {
                std::fs::TryLockError::WouldBlock => anyhow::anyhow!(
                    "the storage directory {} is in use by another sse-relay (pid {holder}); two relays on one \
                     queue would deliver every event twice. Stop the other relay, or give this one its own \
                     storage.path",
                    directory.display()
                ),
                std::fs::TryLockError::Error(err) => {
                    anyhow::Error::new(err).context(format!("cannot lock the storage directory {}", path.display()))
                }
            });
        }
        file.read_to_string(&mut contents)
            .with_context(|| format!("cannot read the storage lock {}", path.display()))?;
        let database_created = contents.lines().any(|line| line == DATABASE_CREATED);
        let mut lock = StorageLock {
            file,
            path,
            database_created,
        };
        lock.write()?;
        Ok(lock)
    }

    /// Whether an earlier run created a database in this directory.
    pub fn database_created(&self) -> bool {
        self.database_created
    }

    /// Notes that the directory now holds a database.
    pub fn mark_database_created(&mut self) -> anyhow::Result<()> {
        if !self.database_created {
            self.database_created = true;
            self.write()?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self) -> anyhow::Result<()> {
        let mut contents = format!("pid {}\n", std::process::id());
        if self.database_created {
            contents.push_str(DATABASE_CREATED);
            contents.push('\n');
        }
        self.file
            .set_len(0)
            .and_then(|()| self.file.rewind())
            .and_then(|()| self.file.write_all(contents.as_bytes()))
            .and_then(|()| self.file.sync_all())
            .with_context(|| format!("cannot write the storage lock {}", self.path.display()))
    }
}

fn holder_pid(contents: &str) -> Option<u32> {
    contents
        .lines()
        .find_map(|line| line.strip_prefix("pid ")?.trim().parse().ok())
}

/// Space held back on the store's filesystem, given up when the disk is full.
#[derive(Clone)]
pub struct Reserve {
    path: PathBuf,
    n_bytes: u64,
    present: bool,
}

impl Reserve {
    /// The reserve of the store in `directory`: 4 MiB, or an eighth of a smaller filesystem.
    /// Made at once if there is room; otherwise it is missing until [`Reserve::restore`] can
    /// make it.
    pub fn new(directory: &Path) -> Reserve {
        let filesystem_bytes = rustix::fs::statvfs(directory)
            .map(|stats| stats.f_blocks.saturating_mul(stats.f_frsize))
            .unwrap_or(u64::MAX);
        let mut reserve = Reserve {
            path: directory.join(RESERVE_FILE),
            n_bytes: MAX_RESERVE_BYTES.min(filesystem_bytes / 8),
            present: false,
        };
        let _ = reserve.restore();
        reserve
    }

    pub fn n_bytes(&self) -> u64 {
        self.n_bytes
    }

    pub fn is_present(&self) -> bool {
        self.present
    }

    /// Gives the reserved space back to the filesystem; returns whether there was any.
    pub fn release(&mut self) -> bool {
        let released = self.present;
        self.present = false;
        let _ = std::fs::remove_file(&self.path);
        released
    }

    /// Makes the reserve again, if the filesystem has room for it.
    pub fn restore(&mut self) -> std::io::Result<()> {
        if self.present {
            return Ok(());
        }
        let made = self.write_zeros();
        if made.is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
        self.present = made.is_ok();
        made
    }

    /// Writes the whole file: a sparse file (`set_len`) would reserve nothing.
    fn write_zeros(&self) -> std::io::Result<()> {
        let mut file = File::create(&self.path)?;
        let zeros = vec![0u8; 64 * 1024];
        let mut remaining = self.n_bytes;
        while remaining > 0 {
            let n = remaining.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            remaining -= n as u64;
        }
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_the_first_marks_its_database() {
        let directory = tempfile::tempdir().unwrap();
        let mut first = StorageLock::acquire(directory.path()).unwrap();
        assert!(!first.database_created());
        let refused = StorageLock::acquire(directory.path()).err().unwrap().to_string();
        assert!(refused.contains(&directory.path().display().to_string()), "{refused}");
        assert!(refused.contains(&format!("pid {}", std::process::id())), "{refused}");
        first.mark_database_created().unwrap();
        drop(first);
        let second = StorageLock::acquire(directory.path()).unwrap();
        assert!(second.database_created());
    }

    #[test]
    fn the_reserve_is_made_released_and_made_again() {
        let directory = tempfile::tempdir().unwrap();
        let mut reserve = Reserve::new(directory.path());
        assert!(reserve.is_present());
        let path = directory.path().join(RESERVE_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), reserve.n_bytes);
        assert!(reserve.release());
        assert!(!path.exists());
        assert!(!reserve.release());
        reserve.restore().unwrap();
        assert!(reserve.is_present() && path.exists());
    }
}
