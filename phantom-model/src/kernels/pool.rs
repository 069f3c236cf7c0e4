//! The kernels' worker threads, which wait for the next product spinning rather than asleep.
//!
//! A decode step runs a few hundred parallel products of tens of microseconds each, with a
//! little serial work between them. A pool whose idle workers go to sleep at once pays a
//! futex wake-up and a reschedule for every product: on a two-core machine that was a sixth of
//! a decode step's CPU time. Here an idle worker keeps watching for the next job for a short
//! while ([`SPIN`], giving its core away every few rounds), which covers the gaps within a
//! step, and only then sleeps.
//!
//! One job runs at a time: its caller claims tasks like the workers do and returns when every
//! task is done. A second caller meanwhile (another thread, or a task that is itself parallel)
//! runs its tasks alone, on its own thread.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle worker watches for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

/// Rounds of `pause` between two looks at the clock (and two yields of the core).
const ROUNDS: u32 = 64;

/// Bits of the task counter that hold the next task index, and of the task count.
const INDEX_BITS: u32 = 24;

/// The most tasks one job takes.
const MAX_TASKS: usize = (1 << INDEX_BITS) - 1;

/// One job: `task(i)` for `i` in `0..count`.
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
}

struct Pool {
    /// Held by the caller whose job is running.
    caller: Mutex<()>,
    /// The running job, on its caller's stack (valid while any of its tasks is unfinished).
    job: AtomicPtr<Job<'static>>,
    /// The job's epoch (16 bits), task count and next unclaimed task ([`INDEX_BITS`] each).
    /// A task is claimed by advancing it, which fails once a newer job has replaced it.
    next: AtomicU64,
    /// Tasks of the running job that are finished.
    done: AtomicUsize,
    /// Whether one of them panicked.
    panicked: AtomicBool,
    /// Workers asleep, and what wakes them.
    sleepers: AtomicUsize,
    asleep: Mutex<()>,
    wake: Condvar,
}

/// `(epoch, count, index)` of a task counter.
fn unpack(next: u64) -> (u64, usize, usize) {
    let mask = (1u64 << INDEX_BITS) - 1;
    (
        next >> (2 * INDEX_BITS),
        ((next >> INDEX_BITS) & mask) as usize,
        (next & mask) as usize,
    )
}

fn pack(epoch: u64, count: usize, index: usize) -> u64 {
    ((epoch & 0xffff) << (2 * INDEX_BITS)) | ((count as u64) << INDEX_BITS) | index as u64
}

impl Pool {
    /// Claims and runs tasks of the job of `epoch` until none is left.
    fn help(&self, epoch: u64) {
        loop {
            let next = self.next.load(SeqCst);
            let (e, count, index) = unpack(next);
            if e != epoch || index >= count {
                return;
            }
            if self
                .next
                .compare_exchange_weak(next, next + 1, SeqCst, SeqCst)
                .is_err()
            {
                continue;
            }
            // SAFETY: task `index` of this job is claimed and not yet done, so the caller is
            // still waiting and its job still lives.
            let job = unsafe { &*self.job.load(SeqCst) };
            if catch_unwind(AssertUnwindSafe(|| (job.task)(index))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.done.fetch_add(1, SeqCst);
        }
    }

    /// A worker's life: wait for a job newer than the last one seen, help with it.
    fn work(&self) {
        let mut seen = unpack(self.next.load(SeqCst)).0;
        loop {
            let start = Instant::now();
            let mut rounds = 0u32;
            let epoch = loop {
                let epoch = unpack(self.next.load(SeqCst)).0;
                if epoch != seen {
                    break epoch;
                }
                rounds += 1;
                if !rounds.is_multiple_of(ROUNDS) {
                    std::hint::spin_loop();
                } else if start.elapsed() < SPIN {
                    std::thread::yield_now();
                } else {
                    self.sleep(seen);
                    rounds = 0;
                }
            };
            seen = epoch;
            self.help(epoch);
        }
    }

    /// Sleeps until a job newer than `seen` is posted.
    fn sleep(&self, seen: u64) {
        let mut guard = self.asleep.lock().unwrap_or_else(|e| e.into_inner());
        // Counted before the epoch is read again: a caller that posts a job after that read
        // sees the sleeper and wakes it (both sides are sequentially consistent).
        self.sleepers.fetch_add(1, SeqCst);
        while unpack(self.next.load(SeqCst)).0 == seen {
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        self.sleepers.fetch_sub(1, SeqCst);
    }

    /// Runs `task(i)` for `i` in `0..count` with the workers; `false` (nothing run) when
    /// another job holds the pool.
    fn run(&self, count: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
        let caller = match self.caller.try_lock() {
            Ok(guard) => guard,
            // A task of an earlier job panicked; every task of that job had finished.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        let job = Job { task };
        let epoch = unpack(self.next.load(SeqCst)).0.wrapping_add(1) & 0xffff;
        self.done.store(0, SeqCst);
        self.panicked.store(false, SeqCst);
        self.job
            .store((&job as *const Job<'_>).cast_mut().cast(), SeqCst);
        self.next.store(pack(epoch, count, 0), SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _asleep = self.asleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        self.help(epoch);
        // Every task is claimed; the job must outlive the workers' last ones.
        let mut rounds = 0u32;
        while self.done.load(SeqCst) < count {
            rounds += 1;
            if rounds.is_multiple_of(ROUNDS) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // Released before a panic resumes, so that the next job finds the pool free.
        drop(caller);
        if self.panicked.load(SeqCst) {
            resume_unwind(Box::new("a kernel task panicked"));
        }
        true
    }
}

/// The pool, with `workers` threads besides its callers, started on first use; `None` when it
/// could not start any.
fn pool(workers: usize) -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| {
        if workers == 0 {
            return None;
        }
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            caller: Mutex::new(()),
            job: AtomicPtr::new(std::ptr::null_mut()),
            next: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            asleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let started = (0..workers)
            .filter(|i| {
                std::thread::Builder::new()
                    .name(format!("phantom-kernels-{i}"))
                    .spawn(move || pool.work())
                    .is_ok()
            })
            .count();
        (started > 0).then_some(pool)
    })
}

/// Runs `task(i)` for `i` in `0..count`: on the pool's workers and the calling thread, or on
/// the calling thread alone when the pool is busy, there is one task, or `threads` is 1.
pub fn run(threads: usize, count: usize, task: &(dyn Fn(usize) + Sync)) {
    if count > 1
        && count <= MAX_TASKS
        && let Some(pool) = pool(threads.saturating_sub(1))
        && pool.run(count, task)
    {
        return;
    }
    (0..count).for_each(task);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_also_when_jobs_nest_or_race() {
        let threads = 3;
        for count in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            run(threads, count, &|i| {
                // A task that is itself parallel runs alone.
                let inner: Vec<AtomicUsize> = (0..5).map(|_| AtomicUsize::new(0)).collect();
                run(threads, 5, &|j| {
                    inner[j].fetch_add(1, SeqCst);
                });
                assert!(inner.iter().all(|h| h.load(SeqCst) == 1));
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "{count} tasks");
        }
        // Callers on several threads at once, some of them after the workers fell asleep.
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for round in 0..50 {
                        if round % 10 == t {
                            std::thread::sleep(SPIN * 3);
                        }
                        let sum = AtomicUsize::new(0);
                        run(threads, 64, &|i| {
                            sum.fetch_add(i, SeqCst);
                        });
                        assert_eq!(sum.load(SeqCst), 64 * 63 / 2);
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_panics_its_caller_and_the_pool_goes_on() {
        let caught = catch_unwind(|| {
            run(3, 16, &|i| assert!(i != 9, "task 9"));
        });
        assert!(caught.is_err());
        // Still run in parallel, unless the pool has no workers on this machine. A job finds
        // the pool busy (and runs on its caller alone) while another test's job holds it: a
        // few tries.
        let mut spread = false;
        for _ in 0..100 {
            let sum = AtomicUsize::new(0);
            let threads = Mutex::new(std::collections::HashSet::new());
            run(3, 64, &|i| {
                sum.fetch_add(i, SeqCst);
                threads
                    .lock()
                    .expect("not poisoned")
                    .insert(std::thread::current().id());
                // Long enough for a worker to take some tasks.
                std::thread::sleep(Duration::from_micros(200));
            });
            assert_eq!(sum.load(SeqCst), 64 * 63 / 2);
            if threads.lock().expect("not poisoned").len() > 1 {
                spread = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(spread || pool(2).is_none(), "one thread after a panic");
    }
}
