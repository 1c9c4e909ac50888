//! The process's limits, set before a server starts: the open-file limit raised, core dumps
//! and tracing off ([`disable_core_dumps`]).
//!
//! The open-file limit:
//! Every client connection is an open file, and so are the store, the HSM module's files and
//! the database connections. Service managers start processes with a low soft limit (1024
//! under systemd) and a high hard one; a server that stayed at the soft limit would fail to
//! `accept`, to open its store and to reach its HSM long before its connection limits
//! (`[limits]`, which the library derives from the limit it finds) come into play. So the
//! soft limit is raised to the hard limit first thing, as nginx and HAProxy do.

use rustix::process::{
    DumpableBehavior, Resource, Rlimit, getrlimit, set_dumpable_behavior, setrlimit,
};

/// The soft limit set when the hard one is unlimited (Linux refuses an unlimited soft
/// limit on open files: `fs.nr_open`, 1,048,576 by default, is the real ceiling).
const WHEN_UNLIMITED: u64 = 1 << 20;

/// Raises the soft open-file limit to the hard limit, and says so in the log (call it once
/// logging is set up, before the server starts).
pub fn raise_open_file_limit() {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let target = maximum.unwrap_or(WHEN_UNLIMITED);
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    if current.is_some_and(|soft| soft >= target) || current.is_none() {
        tracing::info!(
            soft = show(current),
            hard = show(maximum),
            "open-file limit"
        );
        return;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum,
        },
    ) {
        Ok(()) => tracing::info!(
            from = show(current),
            to = target,
            hard = show(maximum),
            "open-file limit raised to the hard limit"
        ),
        Err(e) => tracing::warn!(
            soft = show(current),
            hard = show(maximum),
            error = %e,
            "cannot raise the open-file limit: the connection limits are derived from the soft limit"
        ),
    }
}

/// Turns core dumps off and makes the process not dumpable, and says so in the log (call it
/// once logging is set up, before the server starts: a server holds the root key, HSM
/// sessions, software key versions and the PIN in memory, and a core file or a debugger
/// would take them all).
///
/// - `RLIMIT_CORE` 0, soft and hard: no core file, and no way for the process to raise the
///   limit again (lowering a hard limit needs no privilege; raising it does).
/// - `PR_SET_DUMPABLE` 0: no core file whatever the limit or `core_pattern` (a pipe to
///   systemd-coredump ignores `RLIMIT_CORE`), no `ptrace` attach and no reading of
///   `/proc/PID/mem` or `environ` by other processes of the same user (root keeps
///   `CAP_SYS_PTRACE`). The kernel makes `/proc/PID`'s files root's for a process that is
///   not dumpable, which is how the tests see it.
///
/// Neither call fails on Linux short of a sandbox that forbids it; a failure is a warning,
/// not a refusal to start: both are defence in depth beside the service manager's own
/// setting (`LimitCORE=0` in the systemd unit, docs/operations.md), and a server that would
/// not start under such a sandbox protects nothing. Memory is not locked (`mlockall`): see
/// docs/operations.md, "Process hardening".
pub fn disable_core_dumps() {
    // Already 0 and 0 (the packaged unit's LimitCORE=0): nothing to set.
    let core = match getrlimit(Resource::Core) {
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        } => Ok(()),
        _ => setrlimit(
            Resource::Core,
            Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        ),
    };
    let dumpable = set_dumpable_behavior(DumpableBehavior::NotDumpable);
    match (core, dumpable) {
        (Ok(()), Ok(())) => tracing::info!(
            "core dumps off (RLIMIT_CORE 0) and the process not dumpable (no core file, no ptrace, no /proc/PID/mem by the same user)"
        ),
        (core, dumpable) => tracing::warn!(
            core_limit = core.err().map(|e| e.to_string()),
            not_dumpable = dumpable.err().map(|e| e.to_string()),
            "cannot turn core dumps off or make the process not dumpable: a crash or a debugger could see keys in memory; set LimitCORE=0 in the service unit"
        ),
    }
}
