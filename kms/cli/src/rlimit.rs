//! The process's open-file limit, raised before a server starts.
//!
//! Every client connection is an open file, and so are the store, the HSM module's files and
//! the database connections. Service managers start processes with a low soft limit (1024
//! under systemd) and a high hard one; a server that stayed at the soft limit would fail to
//! `accept`, to open its store and to reach its HSM long before its connection limits
//! (`[limits]`, which the library derives from the limit it finds) come into play. So the
//! soft limit is raised to the hard limit first thing, as nginx and HAProxy do.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

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
