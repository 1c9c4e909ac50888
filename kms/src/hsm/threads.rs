//! The HSM threads: the hot HSM crypto calls (sign, decrypt, MAC, encrypt on an HSM key) run
//! on a few threads of their own, fed by a bounded queue, instead of taking a
//! `spawn_blocking` hop each way.
//!
//! Why: on one core, a call handed to tokio's blocking pool (a thread woken, or started when
//! none is idle, so up to one per call in flight, each then waiting on the session pool's
//! condvar and woken with all the others whenever a session came back) cost more than the
//! signature itself (docs/benchmarks.md, issue 13). Here there are as many threads as the
//! pool has sessions (`[hsm] sessions`), so a thread always finds a session free and in a
//! steady state each thread works with one session of its own; only administration, the
//! audit log's signer and the seal, still on blocking threads, share the pool with them.
//!
//! A caller queues its job and awaits the result on a `tokio::sync::oneshot`; a full queue
//! makes it await room, never block its async worker. A thread that wakes takes its share of
//! what is queued (at most [`MAX_BATCH`]) and runs those jobs one after the other without
//! sleeping; it sleeps only when the queue is empty, and a caller wakes a thread only when
//! one sleeps. A job that has been queued runs even if its caller goes away (as a
//! `spawn_blocking` task does), so a call's work and its audit record never part.
//!
//! Why a thread does not keep a session to itself between calls: a job may wait on
//! something else once it holds one (the keyring's change lock when an HSM AES key rotates
//! at three quarters of its nonce budget, the store when it reserves more of it); with the
//! session parked in the thread, a caller holding that lock and waiting for a session would
//! wait forever with `[hsm] sessions = 1`, and a recovery (which closes every session before
//! it loads the module again) would wait for threads that sleep. Taking the session from
//! the pool per call costs an uncontended lock; with as many threads as sessions, nothing
//! else is shared.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// The most jobs a thread takes per wake-up: enough to ride a deep queue without a sleep
/// per call, few enough that one thread does not hold back work others could start.
pub(super) const MAX_BATCH: usize = 8;

/// How many jobs may wait for a thread; a caller past it awaits room.
pub(super) const QUEUE_CAPACITY: usize = 1024;

/// A job for an HSM thread.
type Job = Box<dyn FnOnce() + Send>;

/// A queued job gave no result: it panicked (as a panicked `spawn_blocking` task gives a
/// `JoinError`), or no HSM thread could be started.
#[derive(Debug, thiserror::Error)]
#[error("the HSM thread gave no result: the job panicked, or no thread could be started")]
pub(crate) struct NoResult;

/// The HSM threads and their queue. Started at the first job; they end once this is
/// dropped and the queue is empty.
pub(super) struct Threads {
    shared: Arc<Shared>,
    /// How many threads to start.
    count: usize,
}

/// What the threads and the callers share.
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a job is queued for a sleeping thread, and when the queue closes.
    work: Condvar,
    /// Room in the queue: a caller takes a permit before it queues, a thread gives the
    /// permits back as it takes jobs.
    room: tokio::sync::Semaphore,
    /// How many batches the threads took (tests read it).
    #[cfg(test)]
    batches: std::sync::atomic::AtomicUsize,
}

struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting for work.
    idle: usize,
    /// How many threads run (0 until the first job).
    running: usize,
    /// Set when [`Threads`] is dropped: the threads end once the queue is empty.
    closed: bool,
}

impl Threads {
    /// `count` threads (at least one), started at the first job, and a queue of `capacity`.
    pub(super) fn new(count: usize, capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    jobs: VecDeque::with_capacity(capacity.min(QUEUE_CAPACITY)),
                    idle: 0,
                    running: 0,
                    closed: false,
                }),
                work: Condvar::new(),
                room: tokio::sync::Semaphore::new(capacity.max(1)),
                #[cfg(test)]
                batches: std::sync::atomic::AtomicUsize::new(0),
            }),
            count: count.max(1),
        }
    }

    /// Runs `job` on an HSM thread and awaits its result. Waits for room when the queue is
    /// full. Once queued, the job runs whether or not this future is still awaited.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NoResult> {
        // The semaphore is never closed; a permit is given back when a thread takes the job.
        self.shared
            .room
            .acquire()
            .await
            .map_err(|_| NoResult)?
            .forget();
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = self.push(Box::new(move || {
            // The caller may have gone away: the job was done all the same.
            let _ = tx.send(job());
        })) {
            self.shared.room.add_permits(1);
            return Err(e);
        }
        rx.await.map_err(|_| NoResult)
    }

    /// Queues `job`, starting the threads first if they are not running, and wakes a
    /// sleeping thread if there is one.
    fn push(&self, job: Job) -> Result<(), NoResult> {
        let mut queue = lock(&self.shared.queue);
        if queue.running == 0 {
            queue.running = self.start();
            if queue.running == 0 {
                return Err(NoResult);
            }
        }
        queue.jobs.push_back(job);
        if queue.idle > 0 {
            self.shared.work.notify_one();
        }
        Ok(())
    }

    /// Starts the threads; how many started. Each enters the runtime of the caller that
    /// started it (when there is one), so that the work runs in the same context as on a
    /// `spawn_blocking` thread.
    fn start(&self) -> usize {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let mut started = 0;
        for i in 0..self.count {
            let shared = Arc::clone(&self.shared);
            let runtime = runtime.clone();
            let threads = self.count;
            let spawned = std::thread::Builder::new()
                .name(format!("kms-hsm-{i}"))
                .spawn(move || {
                    let _entered = runtime.as_ref().map(tokio::runtime::Handle::enter);
                    serve(&shared, threads);
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    tracing::error!(error = %e, "an HSM thread could not be started");
                }
            }
        }
        started
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.work.notify_all();
    }
}

/// One HSM thread: takes its share of the queue, runs it, and sleeps only when the queue
/// is empty. Ends when the queue is closed and empty.
fn serve(shared: &Shared, threads: usize) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut queue = lock(&shared.queue);
            while queue.jobs.is_empty() {
                if queue.closed {
                    return;
                }
                queue.idle += 1;
                queue = shared
                    .work
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                queue.idle -= 1;
            }
            let n = share(queue.jobs.len(), threads);
            batch.extend(queue.jobs.drain(..n));
            // More is queued than this thread's share: a sleeping thread takes the rest.
            if !queue.jobs.is_empty() && queue.idle > 0 {
                shared.work.notify_one();
            }
        }
        #[cfg(test)]
        shared
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        shared.room.add_permits(batch.len());
        for job in batch.drain(..) {
            // A job that panics loses its own result only (its caller gets `NoResult`);
            // the thread goes on with the next.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    }
}

/// How many of `queued` jobs a thread that wakes takes: its share among `threads`, at least
/// one, at most [`MAX_BATCH`].
fn share(queued: usize, threads: usize) -> usize {
    queued
        .div_ceil(threads.max(1))
        .clamp(1, MAX_BATCH)
        .min(queued)
}

/// The queue's lock. No job runs under it, so a poisoned lock (a panic in this module's
/// few lines) still holds a consistent queue.
fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::{MAX_BATCH, NoResult, Threads, share};
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    /// `f`'s output, or a failed test after 10 s (a lost wake-up or permit fails here, not
    /// by hanging).
    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("no answer within 10 s")
    }

    /// Keeps one HSM thread busy with a job that waits until the returned sender sends;
    /// returns once that job has begun.
    async fn occupy(
        threads: &Arc<Threads>,
    ) -> (
        mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), NoResult>>,
    ) {
        let (open, shut) = mpsc::channel::<()>();
        let begun = Arc::new(AtomicBool::new(false));
        let job = tokio::spawn({
            let (threads, begun) = (Arc::clone(threads), Arc::clone(&begun));
            async move {
                threads
                    .run(move || {
                        begun.store(true, Ordering::SeqCst);
                        shut.recv().unwrap();
                    })
                    .await
            }
        });
        for _ in 0..500 {
            if begun.load(Ordering::SeqCst) {
                return (open, job);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the job never began");
    }

    /// How many jobs wait in the queue.
    fn waiting(threads: &Threads) -> usize {
        super::lock(&threads.shared.queue).jobs.len()
    }

    #[test]
    fn a_thread_takes_its_share_of_a_deep_queue() {
        assert_eq!(share(1, 4), 1);
        assert_eq!(share(3, 1), 3);
        assert_eq!(share(16, 4), 4);
        assert_eq!(share(17, 4), 5);
        assert_eq!(share(100, 1), MAX_BATCH);
        assert_eq!(share(2, 0), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_caller_gets_its_own_result_from_an_hsm_thread() {
        let threads = Arc::new(Threads::new(3, 64));
        let mut calls = Vec::new();
        for i in 0..200u32 {
            let threads = Arc::clone(&threads);
            calls.push(tokio::spawn(async move {
                threads
                    .run(move || (i, std::thread::current().name().map(str::to_owned)))
                    .await
            }));
        }
        let mut names = HashSet::new();
        for (i, call) in calls.into_iter().enumerate() {
            let (got, name) = within(call).await.unwrap().unwrap();
            assert_eq!(got as usize, i);
            let name = name.unwrap();
            assert!(name.starts_with("kms-hsm-"), "ran on {name}");
            names.insert(name);
        }
        assert!(!names.is_empty() && names.len() <= 3, "{names:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_jobs_run_at_once_than_there_are_threads() {
        let threads = Arc::new(Threads::new(2, 64));
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut calls = Vec::new();
        for _ in 0..40 {
            let (threads, now, most) = (Arc::clone(&threads), Arc::clone(&now), Arc::clone(&most));
            calls.push(tokio::spawn(async move {
                threads
                    .run(move || {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(2));
                        now.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
            }));
        }
        for call in calls {
            within(call).await.unwrap().unwrap();
        }
        let most = most.load(Ordering::SeqCst);
        assert!((1..=2).contains(&most), "{most} jobs at once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deep_queue_is_taken_several_jobs_per_wake_up() {
        let threads = Arc::new(Threads::new(1, 64));
        let (open, first) = occupy(&threads).await;
        // The one thread is busy: these queue up behind it.
        let mut calls = Vec::new();
        for i in 0..MAX_BATCH {
            let threads = Arc::clone(&threads);
            calls.push(tokio::spawn(async move { threads.run(move || i).await }));
        }
        while waiting(&threads) < MAX_BATCH {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        open.send(()).unwrap();
        within(first).await.unwrap().unwrap();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(within(call).await.unwrap().unwrap(), i);
        }
        // One batch for the first job, one for the eight behind it.
        assert_eq!(threads.shared.batches.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_makes_the_caller_wait_without_blocking_its_worker() {
        // One worker thread: if a caller blocked it, nothing else here would run.
        let threads = Arc::new(Threads::new(1, 2));
        let (open, first) = occupy(&threads).await;
        // Two fill the queue behind the busy thread; the third waits for room.
        let queued: Vec<_> = (0..3)
            .map(|i| {
                let threads = Arc::clone(&threads);
                tokio::spawn(async move { threads.run(move || i).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(waiting(&threads), 2);
        assert!(queued.iter().all(|q| !q.is_finished()));
        // The worker still runs other tasks meanwhile.
        assert_eq!(tokio::spawn(async { 7 }).await.unwrap(), 7);
        open.send(()).unwrap();
        within(first).await.unwrap().unwrap();
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(within(q).await.unwrap().unwrap(), i);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_panics_loses_only_its_own_result() {
        let threads = Threads::new(1, 8);
        let lost: Result<(), NoResult> = within(threads.run(|| panic!("a job that panics"))).await;
        assert!(matches!(lost, Err(NoResult)));
        // The one thread is still there.
        let next = tokio::time::timeout(Duration::from_secs(10), threads.run(|| 5));
        assert_eq!(next.await.expect("no thread took the next job").unwrap(), 5);
        // And every permit came back: the queue's room is whole.
        assert_eq!(threads.shared.room.available_permits(), 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_job_runs_when_its_caller_goes_away() {
        let threads = Arc::new(Threads::new(1, 8));
        let (open, first) = occupy(&threads).await;
        let ran = Arc::new(AtomicBool::new(false));
        let caller = tokio::spawn({
            let (threads, ran) = (Arc::clone(&threads), Arc::clone(&ran));
            async move { threads.run(move || ran.store(true, Ordering::SeqCst)).await }
        });
        while waiting(&threads) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        open.send(()).unwrap();
        within(first).await.unwrap().unwrap();
        // Queued behind `first` on the one thread: done once a later job is.
        within(threads.run(|| ())).await.unwrap();
        assert!(ran.load(Ordering::SeqCst));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_threads_end_when_dropped_after_the_queue_is_done() {
        let threads = Threads::new(2, 8);
        within(threads.run(|| ())).await.unwrap();
        let shared = Arc::clone(&threads.shared);
        drop(threads);
        // Each thread holds the shared state until it ends.
        for _ in 0..500 {
            if Arc::strong_count(&shared) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the HSM threads did not end");
    }
}
