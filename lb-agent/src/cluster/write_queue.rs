//! The allocator's queue of API writes: the latest wanted state per object, taken a few at a
//! time, new allocations first, each object backing off on its own after a failure. The
//! allocator's passes only submit to it, so a slow or stalled API server delays statuses,
//! never the next decision (nor the data path, which follows the decisions). Pure: the
//! writer task ([`super::writer`]) does the IO and the clock comes in as arguments.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

/// First wait after a failed write; doubled per further failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between attempts at one object.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A wanted state written this recently is not submitted again: the cache the pass
/// compared with may simply not show the write yet. Older than this, a difference is drift
/// and is written again.
pub const ECHO_WAIT: Duration = Duration::from_secs(5);

/// How urgent a write is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A Service waiting for its first address or a change of it: a user is watching.
    New,
    /// Anything else (refreshed conditions, releases, counts).
    Refresh,
}

#[derive(Clone, Debug)]
struct Waiting<W, J> {
    want: W,
    job: J,
    priority: Priority,
    not_before: Instant,
}

/// Queue of writes keyed by `K`. `W` is what is wanted (compared to skip repeats), `J`
/// whatever the writer needs besides it to write.
#[derive(Debug)]
pub struct WriteQueue<K, W, J> {
    waiting: BTreeMap<K, Waiting<W, J>>,
    /// The waiting keys by due time, one set per [`Priority`], so the next write is found
    /// without a scan: a cold sync queues every Service, and scanning them all for each of
    /// thousands of takes cost more CPU than the writes themselves.
    order: [BTreeSet<(Instant, K)>; 2],
    in_flight: BTreeMap<K, W>,
    /// Failures in a row per object.
    failures: BTreeMap<K, u32>,
    /// Last successful write per object, and when, for [`ECHO_WAIT`] after it.
    written: BTreeMap<K, (W, Instant)>,
    /// The writes of `written` in the order they were made, so those older than
    /// [`ECHO_WAIT`] are forgotten without a scan: kept for good, every Service's last
    /// wanted state was a second copy of all decisions.
    written_order: VecDeque<(Instant, K)>,
}

impl<K, W, J> Default for WriteQueue<K, W, J> {
    fn default() -> Self {
        Self {
            waiting: BTreeMap::new(),
            order: [BTreeSet::new(), BTreeSet::new()],
            in_flight: BTreeMap::new(),
            failures: BTreeMap::new(),
            written: BTreeMap::new(),
            written_order: VecDeque::new(),
        }
    }
}

impl<K: Ord + Clone, W: PartialEq + Clone, J> WriteQueue<K, W, J> {
    /// Wants `want` written for `key`, replacing whatever was waiting for it. Returns
    /// whether it was queued: not when the same is being written or was just written.
    pub fn submit(&mut self, key: K, want: W, job: J, priority: Priority, now: Instant) -> bool {
        self.forget_old(now);
        if self.in_flight.get(&key) == Some(&want) {
            return false;
        }
        if self.written.get(&key).is_some_and(|(w, at)| *w == want && now.duration_since(*at) < ECHO_WAIT) {
            return false;
        }
        let not_before = match self.failures.get(&key) {
            // Still backing off after a failure: a newer state waits its turn too.
            Some(n) => self.waiting.get(&key).map_or(now + backoff(*n), |w| w.not_before),
            None => now,
        };
        let priority = self.waiting.get(&key).map_or(priority, |w| w.priority.min(priority));
        self.put(key, Waiting { want, job, priority, not_before });
        true
    }

    /// Forgets the writes made [`ECHO_WAIT`] or longer before `now`.
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, _)) = self.written_order.front()
            && now.duration_since(*at) >= ECHO_WAIT
        {
            let Some((at, key)) = self.written_order.pop_front() else { break };
            // Unless a later write of the key replaced it.
            if self.written.get(&key).is_some_and(|(_, w)| *w == at) {
                self.written.remove(&key);
            }
        }
    }

    /// Makes `w` the waiting write of `key`, in place of any other.
    fn put(&mut self, key: K, w: Waiting<W, J>) {
        if let Some(old) = self.waiting.get(&key) {
            self.order[old.priority as usize].remove(&(old.not_before, key.clone()));
        }
        self.order[w.priority as usize].insert((w.not_before, key.clone()));
        self.waiting.insert(key, w);
    }

    /// Removes `key`'s waiting write.
    fn pull(&mut self, key: &K) -> Option<Waiting<W, J>> {
        let w = self.waiting.remove(key)?;
        self.order[w.priority as usize].remove(&(w.not_before, key.clone()));
        Some(w)
    }

    /// The first waiting write of each priority whose object has no write in flight:
    /// (due time, key). Only the writes in flight (a few) are skipped on the way.
    fn heads(&self) -> impl Iterator<Item = &(Instant, K)> {
        self.order.iter().filter_map(|set| set.iter().find(|(_, k)| !self.in_flight.contains_key(k)))
    }

    /// Keeps only the keys `keep` says (the rest are gone), except writes in flight.
    pub fn retain(&mut self, keep: impl Fn(&K) -> bool) {
        for set in &mut self.order {
            set.retain(|(_, k)| keep(k));
        }
        self.waiting.retain(|k, _| keep(k));
        self.failures.retain(|k, _| keep(k));
        self.written.retain(|k, _| keep(k));
        self.written_order.retain(|(_, k)| keep(k));
    }

    /// The next write to start: the most urgent due one whose object has no write in
    /// flight (one object's writes stay in order). It counts as in flight until
    /// [`Self::finished`].
    pub fn take(&mut self, now: Instant) -> Option<(K, W, J)> {
        // Heads come most urgent priority first; within one, the earliest due.
        let key = self.heads().find(|(at, _)| *at <= now).map(|(_, k)| k.clone())?;
        let w = self.pull(&key)?;
        self.in_flight.insert(key.clone(), w.want.clone());
        Some((key, w.want, w.job))
    }

    /// A write taken with [`Self::take`] ended. A failed one is retried after a backoff
    /// (`retry` gives its job back), unless a newer state is waiting, which then waits the
    /// backoff instead.
    pub fn finished(&mut self, key: K, want: W, retry: Option<J>, now: Instant) {
        self.in_flight.remove(&key);
        match retry {
            None => {
                self.failures.remove(&key);
                self.forget_old(now);
                self.written_order.push_back((now, key.clone()));
                self.written.insert(key, (want, now));
            }
            Some(job) => {
                let n = self.failures.entry(key.clone()).or_insert(0);
                *n = n.saturating_add(1);
                let not_before = now + backoff(*n);
                match self.pull(&key) {
                    Some(newer) => {
                        let not_before = newer.not_before.max(not_before);
                        self.put(key, Waiting { not_before, ..newer });
                    }
                    None => self.put(key, Waiting { want, job, priority: Priority::Refresh, not_before }),
                }
            }
        }
    }

    /// When the next waiting write becomes due (`None`: nothing waits).
    pub fn next_due(&self) -> Option<Instant> {
        self.heads().map(|(at, _)| *at).min()
    }

    /// Writes waiting (for logs).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// The wait after `failures` failures in a row.
fn backoff(failures: u32) -> Duration {
    let doubled = FIRST_BACKOFF.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Q = WriteQueue<&'static str, u32, ()>;

    #[test]
    fn only_the_latest_state_per_object_is_written() {
        let t = Instant::now();
        let mut q = Q::default();
        assert!(q.submit("a", 1, (), Priority::Refresh, t));
        assert!(q.submit("a", 2, (), Priority::Refresh, t));
        assert_eq!(q.take(t).map(|(k, w, _)| (k, w)), Some(("a", 2)));
        assert_eq!(q.take(t), None, "one write per object");
    }

    #[test]
    fn new_allocations_go_first() {
        let t = Instant::now();
        let mut q = Q::default();
        q.submit("refresh", 1, (), Priority::Refresh, t);
        q.submit("new", 1, (), Priority::New, t + Duration::from_millis(1));
        let order: Vec<_> = std::iter::from_fn(|| q.take(t + Duration::from_millis(1)).map(|(k, _, _)| k)).collect();
        assert_eq!(order, vec!["new", "refresh"]);
    }

    #[test]
    fn a_write_in_flight_or_just_done_is_not_repeated_but_drift_is_repaired() {
        let t = Instant::now();
        let mut q = Q::default();
        q.submit("a", 1, (), Priority::New, t);
        let (k, w, _) = q.take(t).unwrap_or_else(|| panic!("due"));
        assert!(!q.submit("a", 1, (), Priority::New, t), "the same state is in flight");
        assert!(q.submit("a", 2, (), Priority::New, t), "a newer one waits");
        assert_eq!(q.take(t), None, "until the first ends");
        q.finished(k, w, None, t);
        assert_eq!(q.take(t).map(|(_, w, _)| w), Some(2));
        q.finished("a", 2, None, t);
        assert!(!q.submit("a", 2, (), Priority::Refresh, t + Duration::from_secs(1)), "its echo may lag");
        assert!(q.submit("a", 2, (), Priority::Refresh, t + ECHO_WAIT), "later, a difference is drift");
    }

    #[test]
    fn writes_are_remembered_only_while_their_echo_may_lag() {
        let t = Instant::now();
        let mut q = Q::default();
        for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
            let at = t + Duration::from_secs(i as u64);
            q.submit(k, 1, (), Priority::New, at);
            let (k, w, _) = q.take(at).unwrap_or_else(|| panic!("due"));
            q.finished(k, w, None, at);
        }
        // "a" again, later: its first write must not forget the second.
        q.submit("a", 2, (), Priority::New, t + Duration::from_secs(3));
        let (k, w, _) = q.take(t + Duration::from_secs(3)).unwrap_or_else(|| panic!("due"));
        q.finished(k, w, None, t + Duration::from_secs(3));
        q.submit("d", 1, (), Priority::New, t + ECHO_WAIT + Duration::from_secs(1));
        assert_eq!(q.written.keys().copied().collect::<Vec<_>>(), vec!["a", "c"], "b is older than ECHO_WAIT");
        assert!(!q.submit("a", 2, (), Priority::Refresh, t + ECHO_WAIT + Duration::from_secs(1)), "a's echo may lag");
    }

    #[test]
    fn failures_back_off_per_object_without_holding_up_others() {
        let t = Instant::now();
        let mut q = Q::default();
        q.submit("bad", 1, (), Priority::New, t);
        q.submit("good", 1, (), Priority::New, t);
        let (k, w, _) = q.take(t).unwrap_or_else(|| panic!("due"));
        assert_eq!(k, "bad");
        q.finished(k, w, Some(()), t);
        assert_eq!(q.take(t).map(|(k, _, _)| k), Some("good"));
        assert_eq!(q.take(t), None, "bad waits its backoff");
        assert_eq!(q.next_due(), Some(t + FIRST_BACKOFF));
        let (k, w, _) = q.take(t + FIRST_BACKOFF).unwrap_or_else(|| panic!("retried"));
        q.finished(k, w, Some(()), t + FIRST_BACKOFF);
        assert_eq!(q.next_due(), Some(t + FIRST_BACKOFF * 3), "doubled");
        // A newer state submitted meanwhile still waits out the backoff.
        q.submit("bad", 2, (), Priority::New, t + FIRST_BACKOFF);
        assert_eq!(q.take(t + FIRST_BACKOFF * 2), None);
        assert_eq!(q.take(t + FIRST_BACKOFF * 3).map(|(_, w, _)| w), Some(2));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    /// The rule [`WriteQueue::take`] follows, by a scan of everything waiting.
    fn scanned(q: &WriteQueue<u32, u32, ()>, now: Instant) -> Option<u32> {
        q.waiting
            .iter()
            .filter(|(k, w)| w.not_before <= now && !q.in_flight.contains_key(*k))
            .min_by_key(|(k, w)| (w.priority, w.not_before, **k))
            .map(|(k, _)| *k)
    }

    #[test]
    fn the_index_takes_what_a_scan_of_everything_would() {
        let t0 = Instant::now();
        let mut q = WriteQueue::<u32, u32, ()>::default();
        // A fixed pseudo-random mix of submissions, failures, successes and clock steps.
        let mut x: u32 = 12345;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let mut now = t0;
        let mut running: Vec<(u32, u32)> = Vec::new();
        for step in 0..5_000 {
            let r = next();
            match r % 5 {
                0 | 1 => {
                    let prio = if r & 8 == 0 { Priority::New } else { Priority::Refresh };
                    q.submit(r % 64, r % 3, (), prio, now);
                }
                2 => {
                    let expected = scanned(&q, now);
                    let took = q.take(now).map(|(k, w, _)| {
                        running.push((k, w));
                        k
                    });
                    assert_eq!(took, expected, "step {step}");
                }
                3 if !running.is_empty() => {
                    let (k, w) = running.swap_remove(r as usize % running.len());
                    q.finished(k, w, (r & 16 == 0).then_some(()), now);
                }
                _ => now += Duration::from_millis(u64::from(r % 700)),
            }
            let due = q.waiting.iter().filter(|(k, _)| !q.in_flight.contains_key(*k)).map(|(_, w)| w.not_before).min();
            assert_eq!(q.next_due(), due, "step {step}");
            assert_eq!(q.order.iter().map(BTreeSet::len).sum::<usize>(), q.waiting.len(), "step {step}");
        }
    }
}
