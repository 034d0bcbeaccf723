//! libhdf5 can crash (SIGSEGV) on corrupt metadata instead of returning an error, and a crash
//! takes the whole process down: every good episode of `dataset info`, a training run, the
//! trainer node. So each file is first checked in a forked child; only a file whose check
//! came back clean is opened in-process. The verdict is cached by path, size and mtime, so a
//! file costs one fork per process (≈ 1–3 ms) until it changes.
//!
//! Fork without exec, because every caller (CLI, tests, nodes) can then check without
//! locating a helper executable. The child only runs the format checks, writes JSON to a
//! pipe and `_exit`s; see the SAFETY comment on the fork for why that is sound here.

use super::reader::check_in_process;
use super::Defect;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::SystemTime;

/// A child still busy after this long (libhdf5 looping on corrupt metadata) is killed.
const CHILD_TIMEOUT_S: u32 = 120;

/// How much of a file the check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Depth {
    /// Structure, attributes, actions, events, and the first and last frame (which walks the
    /// chunk index): what opening and training read.
    Structure,
    /// Also decompresses every frame.
    EveryFrame,
}

#[derive(PartialEq, Eq, Hash)]
struct Key {
    path: PathBuf,
    len: u64,
    mtime: Option<SystemTime>,
    depth: Depth,
}

static VERDICTS: LazyLock<Mutex<HashMap<Key, Vec<Defect>>>> = LazyLock::new(Default::default);
/// One child at a time: a second child forked meanwhile would inherit the first one's pipe
/// and hold its end open until it exits.
static FORK: Mutex<()> = Mutex::new(());

/// Every defect of `path` (empty when valid), checked in a child process so that a libhdf5
/// crash becomes a defect (`file: reading it crashed libhdf5 …`) instead of killing the
/// caller. Verdicts are cached by path, size and mtime.
pub fn validate_file(path: &Path, depth: Depth) -> Vec<Defect> {
    let key = match std::fs::metadata(path) {
        Ok(m) => Key {
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            len: m.len(),
            mtime: m.modified().ok(),
            depth,
        },
        Err(e) => return vec![Defect::new("file", format!("cannot read: {e}"))],
    };
    let cached = VERDICTS.lock().ok().and_then(|v| v.get(&key).cloned());
    if let Some(defects) = cached {
        return defects;
    }
    // A corrupt file crashes its check every time; a check that fails for another reason (a
    // child that inherited a lock or state mid-change from a parent thread at the fork) does not
    // repeat: one more try before any such outcome counts.
    let first = run_child(path, depth);
    let settled = matches!(&first, Ok(d) if !d.iter().any(|d| d.field == "file"));
    let defects = match if settled {
        first
    } else {
        run_child(path, depth)
    } {
        Ok(d) => d,
        // Not a verdict on the file: not cached.
        Err(e) => {
            return vec![Defect::new(
                "file",
                format!("cannot check it in a child process: {e}"),
            )]
        }
    };
    if let Ok(mut v) = VERDICTS.lock() {
        v.insert(key, defects.clone());
    }
    defects
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn run_child(path: &Path, depth: Depth) -> Result<Vec<Defect>, String> {
    let _one = FORK.lock().unwrap_or_else(|p| p.into_inner());
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("pipe"));
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    // SAFETY: fork in a multi-threaded process is sound when the child touches only state
    // that no other thread can hold locked at the fork. The child uses (1) libhdf5, whose
    // every call goes through hdf5-metno's process-wide reentrant lock, held here across the
    // fork and never released in the child, which runs and exits inside this closure: no other
    // thread is inside libhdf5, and the child (same thread, same thread-local owner id) only
    // re-enters the lock. Releasing it in the child would deadlock when parent threads were
    // parked on it at the fork: parking_lot hands the lock to a waiter the child does not
    // have. (2) malloc, which glibc makes fork-safe with its atfork handlers; (3) the pipe, its
    // own. It logs nothing and leaves with `_exit`, so no atexit handler or destructor
    // (libhdf5 closing the parent's open files) runs in it. A child that does block anyway is
    // ended by its alarm.
    let pid = hdf5::sync::sync(|| {
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see above; this is the child, which never returns from this block.
            unsafe {
                libc::close(read_fd);
                // Drop every other inherited descriptor: one of a file another thread is
                // writing would keep its HDF5 lock held while this child lives, and a check of
                // that file then fails with "unable to lock file". (Only the copies close; the
                // parent's descriptors and locks are untouched. Older kernels: best effort.)
                let fd = write_fd as libc::c_uint;
                libc::syscall(libc::SYS_close_range, 3, fd - 1, 0);
                libc::syscall(libc::SYS_close_range, fd + 1, libc::c_uint::MAX, 0);
                libc::alarm(CHILD_TIMEOUT_S);
                let verdict = std::panic::catch_unwind(|| check_in_process(path, depth));
                let code = match verdict {
                    Ok(defects) => {
                        let pairs: Vec<(&str, &str)> = defects
                            .iter()
                            .map(|d| (d.field.as_str(), d.problem.as_str()))
                            .collect();
                        let json = serde_json::to_vec(&pairs).unwrap_or_default();
                        let mut out = std::fs::File::from_raw_fd(write_fd);
                        i32::from(out.write_all(&json).is_err())
                    }
                    Err(_) => 2,
                };
                libc::_exit(code);
            }
        }
        pid
    });
    // SAFETY: the parent's copy of the write end; closing it lets the read see EOF when the
    // child exits.
    unsafe { libc::close(write_fd) };
    if pid < 0 {
        // SAFETY: our own read end, not used after this.
        unsafe { libc::close(read_fd) };
        return Err(os_err("fork"));
    }
    // SAFETY: `read_fd` is ours alone from here on; the File closes it.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(read_fd) };
    let mut out = Vec::new();
    let read = pipe.read_to_end(&mut out);
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(os_err("waitpid"));
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        if sig == libc::SIGALRM {
            // libhdf5 looping on the file, or (rarely) the child stuck on a lock another
            // thread held at the fork: not a verdict, so not cached.
            return Err(format!(
                "the check was still running after {CHILD_TIMEOUT_S} s"
            ));
        }
        let why = format!("reading it crashed libhdf5 (signal {sig}): corrupt HDF5 metadata");
        return Ok(vec![Defect::new("file", why)]);
    }
    read.map_err(|e| format!("reading the check's result: {e}"))?;
    match (
        libc::WEXITSTATUS(status),
        serde_json::from_slice::<Vec<(String, String)>>(&out),
    ) {
        (0, Ok(pairs)) => Ok(pairs
            .into_iter()
            .map(|(field, problem)| Defect::new(field, problem))
            .collect()),
        (code, _) => Err(format!(
            "the check exited with status {code} without a result"
        )),
    }
}
