//! Sealed shares written as files (`--out-dir`), so that no share the server handed out is
//! ever lost to the client's file system.
//!
//! The server makes shares once: an init (or a rekey) whose shares the CLI then fails to
//! write is a keyring no one can unseal. So everything the files need is checked and taken
//! *before* the call that makes the shares: the directory (made 0700 if missing), and one
//! reserved file per share (`.share-<i>.age.part`, a block written and synced), so a
//! read-only or full file system refuses the ceremony before the server does anything. The
//! shares are then written into the files already reserved and renamed into place. If
//! writing still fails, every sealed share is printed (they are age-encrypted: safe on a
//! terminal), with what was written where, and the command fails.

use std::fs::{File, OpenOptions};
use std::io::{Seek as _, Write};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::BoxError;

/// What each reserved file holds until its share replaces it: one block of a file system,
/// more than a sealed share takes (an age header and a share, armored: under 1 KiB).
const RESERVED_BYTES: usize = 4096;

/// `DIR/share-<i>.age`, i from 1.
pub fn share_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("share-{i}.age"))
}

fn part_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!(".share-{i}.age.part"))
}

/// The files reserved for `count` sealed shares in a directory. Dropped unused (the server
/// refused the call), it removes what it reserved.
#[derive(Debug)]
pub struct ShareDir {
    dir: PathBuf,
    reserved: Vec<(File, PathBuf)>,
}

impl ShareDir {
    /// Checks and takes what writing `count` shares into `dir` needs: the directory (made,
    /// mode 0700, if missing), no `share-<i>.age` there already, and a reserved, synced
    /// file for each share.
    pub fn prepare(dir: &Path, count: usize) -> Result<Self, BoxError> {
        Self::reserve(dir, count).map_err(|e| {
            format!("{e} (nothing was done: the server was not asked to make shares)").into()
        })
    }

    fn reserve(dir: &Path, count: usize) -> Result<Self, String> {
        let shown = dir.display();
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create the directory {shown} for the shares: {e}"))?;
        }
        // Only its owner may write in it: anyone else could swap a file between the moment
        // it is written and the moment it is handed to a custodian.
        let meta = std::fs::metadata(dir).map_err(|e| format!("--out-dir {shown}: {e}"))?;
        if !meta.is_dir() {
            return Err(format!("--out-dir {shown} is not a directory"));
        }
        if meta.uid() != rustix::process::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
            return Err(format!(
                "--out-dir {shown} can be written by others than you (owner uid {}, mode {:o}): give a directory only you can write, or one that does not exist yet",
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
        for i in 1..=count {
            let path = share_path(dir, i);
            if path.symlink_metadata().is_ok() {
                return Err(format!(
                    "{} already exists: give a directory without shares in it",
                    path.display()
                ));
            }
        }
        let mut made = Self {
            dir: dir.to_owned(),
            reserved: Vec::with_capacity(count),
        };
        for i in 1..=count {
            let path = part_path(dir, i);
            // A new file, never one that is there (a link would be followed).
            let reserve = || -> std::io::Result<File> {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                f.write_all(&[0u8; RESERVED_BYTES])?;
                f.sync_all()?;
                Ok(f)
            };
            match reserve() {
                Ok(f) => made.reserved.push((f, path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(format!(
                        "{} exists (left by an earlier run?): remove it, or give another directory",
                        path.display()
                    ));
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(format!("cannot write the shares into {shown}: {e}"));
                }
            }
        }
        sync_dir(dir).map_err(|e| format!("cannot write the shares into {shown}: {e}"))?;
        Ok(made)
    }

    /// Writes share i into `DIR/share-<i>.age`. On the first failure, writes every share to
    /// `out` (which files hold which share, and the sealed text of all of them) and fails.
    pub fn save(
        mut self,
        shares: &[String],
        out: &mut dyn Write,
    ) -> Result<Vec<PathBuf>, BoxError> {
        let reserved = std::mem::take(&mut self.reserved);
        let mut written = Vec::with_capacity(shares.len());
        let mut failure = None;
        if reserved.len() != shares.len() {
            failure = Some(format!(
                "{} files were reserved for {} shares",
                reserved.len(),
                shares.len()
            ));
        }
        let mut pending = reserved.into_iter().zip(shares).enumerate();
        if failure.is_none() {
            for (i, ((file, part), share)) in pending.by_ref() {
                let path = share_path(&self.dir, i + 1);
                match fill(&file, share.as_bytes())
                    .and_then(|()| std::fs::rename(&part, &path))
                    .and_then(|()| same_file(&file, &path))
                {
                    Ok(()) => written.push(path),
                    Err(e) => {
                        let _ = std::fs::remove_file(&part);
                        failure = Some(format!("cannot write {}: {e}", path.display()));
                        break;
                    }
                }
            }
        }
        for (_, ((_, part), _)) in pending {
            let _ = std::fs::remove_file(part);
        }
        let synced = sync_dir(&self.dir);
        let failure = failure.or_else(|| {
            synced
                .err()
                .map(|e| format!("cannot sync the directory {}: {e}", self.dir.display()))
        });
        let Some(failure) = failure else {
            return Ok(written);
        };
        // Nothing may be lost: the shares are sealed to their custodians, so printing them
        // is safe, and it is the last copy there is.
        writeln!(out, "{failure}.")?;
        writeln!(
            out,
            "The server made these shares and keeps no copy. Written: {}. Every sealed share \
             follows: save each into its own file now (they are encrypted to their \
             custodians' age keys).\n",
            if written.is_empty() {
                "none".to_owned()
            } else {
                written
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )?;
        for (i, share) in shares.iter().enumerate() {
            writeln!(out, "Share {}:\n{share}", i + 1)?;
        }
        out.flush()?;
        Err(format!("{failure}: every share was printed instead, save them now").into())
    }
}

impl Drop for ShareDir {
    fn drop(&mut self) {
        for (_, part) in self.reserved.drain(..) {
            let _ = std::fs::remove_file(part);
        }
    }
}

/// Replaces a reserved file's content with `bytes`, durably.
fn fill(mut file: &File, bytes: &[u8]) -> std::io::Result<()> {
    file.rewind()?;
    file.write_all(bytes)?;
    file.set_len(bytes.len() as u64)?;
    file.sync_all()
}

/// Checks that `path` is the file written through `file`: a file swapped in under the
/// reserved name would otherwise be renamed into place instead of the share.
fn same_file(file: &File, path: &Path) -> std::io::Result<()> {
    let written = file.metadata()?;
    let there = path.symlink_metadata()?;
    if written.dev() == there.dev() && written.ino() == there.ino() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "another file was put in its place while the server answered",
        ))
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn shares(n: usize) -> Vec<String> {
        (1..=n)
            .map(|i| format!("-----BEGIN AGE ENCRYPTED FILE-----\nshare {i}\n-----END AGE ENCRYPTED FILE-----\n"))
            .collect()
    }

    #[test]
    fn a_missing_directory_is_made_0700_and_every_share_lands() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a").join("shares");
        let reserved = ShareDir::prepare(&dir, 3).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&dir.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700);
        let mut out = Vec::new();
        let written = reserved.save(&shares(3), &mut out).unwrap();
        assert_eq!(written.len(), 3);
        assert!(out.is_empty());
        for (i, s) in shares(3).iter().enumerate() {
            let path = share_path(&dir, i + 1);
            assert_eq!(&std::fs::read_to_string(&path).unwrap(), s);
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&path.metadata().unwrap().permissions());
            assert_eq!(mode & 0o777, 0o600);
        }
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 3, "no reserved file is left behind");
    }

    #[test]
    fn an_existing_share_file_refuses_before_anything_is_reserved() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(share_path(tmp.path(), 2), "old").unwrap();
        let err = ShareDir::prepare(tmp.path(), 3).unwrap_err().to_string();
        assert!(err.contains("share-2.age already exists"), "{err}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        assert_eq!(
            std::fs::read_to_string(share_path(tmp.path(), 2)).unwrap(),
            "old"
        );
    }

    #[test]
    fn unused_reservations_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        drop(ShareDir::prepare(tmp.path(), 4).unwrap());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_write_that_fails_after_the_call_prints_every_share() {
        let tmp = tempfile::tempdir().unwrap();
        let reserved = ShareDir::prepare(tmp.path(), 3).unwrap();
        // The second reserved file disappears under the CLI: its rename fails.
        std::fs::remove_file(part_path(tmp.path(), 2)).unwrap();
        let mut out = Vec::new();
        let err = reserved.save(&shares(3), &mut out).unwrap_err().to_string();
        assert!(err.contains("share-2.age"), "{err}");
        let out = String::from_utf8(out).unwrap();
        for (i, s) in shares(3).iter().enumerate() {
            assert!(out.contains(&format!("Share {}:\n{s}", i + 1)), "{out}");
        }
        assert!(
            out.contains("share-1.age"),
            "says which file was written: {out}"
        );
        assert!(share_path(tmp.path(), 1).exists());
        assert!(!share_path(tmp.path(), 3).exists());
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "no reserved file is left behind"
        );
    }

    #[test]
    fn a_link_planted_for_a_reserved_file_is_refused_and_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, part_path(tmp.path(), 1)).unwrap();
        let err = ShareDir::prepare(tmp.path(), 2).unwrap_err().to_string();
        assert!(err.contains(".share-1.age.part exists"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn a_file_swapped_in_while_the_server_answers_is_not_taken_for_a_share() {
        let tmp = tempfile::tempdir().unwrap();
        let reserved = ShareDir::prepare(tmp.path(), 3).unwrap();
        std::fs::remove_file(part_path(tmp.path(), 2)).unwrap();
        std::fs::write(part_path(tmp.path(), 2), "ATTACKER").unwrap();
        let mut out = Vec::new();
        let err = reserved.save(&shares(3), &mut out).unwrap_err().to_string();
        assert!(
            err.contains("share-2.age") && err.contains("put in its place"),
            "{err}"
        );
        let out = String::from_utf8(out).unwrap();
        for (i, s) in shares(3).iter().enumerate() {
            assert!(out.contains(&format!("Share {}:\n{s}", i + 1)), "{out}");
        }
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
        let err = ShareDir::prepare(tmp.path(), 2).unwrap_err().to_string();
        assert!(err.contains("can be written by others than you"), "{err}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
