//! Ending a job whose rank died or hangs, as torch's NCCL watchdog and heartbeat do: every rank
//! sends a heartbeat to every peer over the rendezvous's TCP links, and a thread of its own
//! watches for a peer whose connection closed before it said goodbye, or that has not been
//! heard from for [`SILENCE`]. Then it aborts the rank's NCCL communicators (a collective
//! waiting on a dead peer never returns by itself) and ends the process naming the peer. A rank
//! says goodbye only where every rank stops together (the run's end, a stop all ranks agreed
//! on), so a rank that fails anywhere else ends its peers within [`SILENCE`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Weak;
use std::time::{Duration, Instant};

use super::tcp::Links;

/// How often a rank tells its peers it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a peer may go unheard before it is taken for hung or unreachable: under the 60 s
/// a job has to end in, above any pause a busy machine gives a thread.
pub const SILENCE: Duration = Duration::from_secs(40);

const LIVE: u8 = 0;
const SAID_GOODBYE: u8 = 1;
const CLOSED: u8 = 2;

/// What a rank knows of its peers' liveness, written by the connections' readers.
#[derive(Debug)]
pub(crate) struct Health {
    start: Instant,
    /// Per world rank: milliseconds after `start` of its last message.
    heard: Vec<AtomicU64>,
    state: Vec<AtomicU8>,
    /// This rank said goodbye: whatever its peers do now is no failure.
    finished: AtomicBool,
}

impl Health {
    pub(crate) fn new(world: usize) -> Health {
        Health {
            start: Instant::now(),
            heard: (0..world).map(|_| AtomicU64::new(0)).collect(),
            state: (0..world).map(|_| AtomicU8::new(LIVE)).collect(),
            finished: AtomicBool::new(false),
        }
    }

    pub(crate) fn heard(&self, peer: usize) {
        self.heard[peer].store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub(crate) fn said_goodbye(&self, peer: usize) {
        self.state[peer].store(SAID_GOODBYE, Ordering::Relaxed);
    }

    /// The peer's connection ended (after a goodbye, that is how a rank leaves).
    pub(crate) fn closed(&self, peer: usize) {
        let _ = self.state[peer].compare_exchange(LIVE, CLOSED, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }

    /// The first peer (of `peers`) that failed, and how, `silence` being the longest a live
    /// peer may go unheard; `None` while all are well or once this rank is finished.
    fn failure(&self, peers: impl Iterator<Item = usize>, silence: Duration) -> Option<String> {
        if self.is_finished() {
            return None;
        }
        let now = self.start.elapsed().as_millis() as u64;
        for peer in peers {
            match self.state[peer].load(Ordering::Relaxed) {
                CLOSED => return Some(format!("rank {peer}'s connection closed before it finished: its process ended or its node went away (see rank {peer}'s log)")),
                LIVE if now.saturating_sub(self.heard[peer].load(Ordering::Relaxed)) > silence.as_millis() as u64 => {
                    return Some(format!(
                        "rank {peer} has not been heard from for {} s: it hangs, or its node is unreachable",
                        silence.as_secs()
                    ))
                }
                _ => {}
            }
        }
        None
    }
}

/// Starts the thread that sends this rank's heartbeats over `links` and calls `on_failure`
/// with a sentence naming the peer when one fails (once; the thread ends then, or when the
/// links are dropped).
pub(crate) fn watch(links: Weak<Links>, silence: Duration, on_failure: impl FnOnce(String) + Send + 'static) {
    let spawned = std::thread::Builder::new().name("trainer-watchdog".into()).spawn(move || loop {
        let Some(links) = links.upgrade() else { return };
        if links.health().is_finished() {
            return;
        }
        links.heartbeat();
        if let Some(failure) = links.health().failure(links.peers(), silence) {
            drop(links);
            on_failure(failure);
            return;
        }
        drop(links);
        std::thread::sleep(HEARTBEAT.min(silence / 4));
    });
    if let Err(e) = spawned {
        eprintln!("warning: cannot start the watchdog thread ({e}): a rank that dies may leave this one waiting");
    }
}

/// What a rank does when a peer failed: abort its NCCL communicators (`abort`), say so, and end
/// with exit code 2 (as a failed collective does).
pub fn end_rank(rank: usize, failure: &str, abort: impl FnOnce()) -> ! {
    abort();
    eprintln!("error: rank {rank}: {failure}; ending this rank");
    std::process::exit(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_fails_when_it_closes_without_goodbye_or_goes_silent() {
        let h = Health::new(3);
        let silence = Duration::from_millis(200);
        h.heard(1);
        h.heard(2);
        assert_eq!(h.failure([1, 2].into_iter(), silence), None);
        h.said_goodbye(1);
        h.closed(1);
        assert_eq!(h.failure([1, 2].into_iter(), silence), None, "a goodbye, then the close: a rank leaving");
        h.closed(2);
        let f = h.failure([1, 2].into_iter(), silence).expect("rank 2 closed without a goodbye");
        assert!(f.contains("rank 2") && f.contains("closed"), "{f}");
        let h = Health::new(2);
        h.heard(1);
        std::thread::sleep(Duration::from_millis(300));
        let f = h.failure([1].into_iter(), silence).expect("silent for longer than allowed");
        assert!(f.contains("rank 1 has not been heard from"), "{f}");
        h.finish();
        assert_eq!(h.failure([1].into_iter(), silence), None, "a finished rank watches no more");
    }
}
