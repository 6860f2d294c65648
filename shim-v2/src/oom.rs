//! OOM events from the guest, held to what they may claim. The agent
//! reports which container the guest kernel OOM-killed; a compromised guest
//! can send anything, as fast as it likes. An event is published only for
//! a container of this sandbox, once per container per window, and at most
//! `MAX_PER_WINDOW` per window; the rest are dropped and counted, with one
//! log line per window, not one per event.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(1);
pub const MAX_PER_WINDOW: u32 = 20;
/// Pause after a dropped event, so a flooding guest costs the shim little.
pub const DROP_PAUSE: Duration = Duration::from_millis(10);

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Publish,
    /// `report`: the log line for this window's drops, once per window.
    Drop {
        report: Option<String>,
    },
}

#[derive(Default)]
pub struct OomFilter {
    /// When each container's last published event was (known ids only).
    last: HashMap<String, Instant>,
    window_start: Option<Instant>,
    published: u32,
    dropped: u64,
    reported: bool,
}

impl OomFilter {
    pub fn admit(&mut self, id: &str, known: bool, now: Instant) -> Verdict {
        if self.window_start.is_none_or(|s| now.duration_since(s) >= WINDOW) {
            self.window_start = Some(now);
            self.published = 0;
            self.reported = false;
            self.last.retain(|_, t| now.duration_since(*t) < WINDOW);
        }
        let reason = if !known {
            Some("an OOM event for a container that is not in this sandbox")
        } else if self.last.get(id).is_some_and(|t| now.duration_since(*t) < WINDOW) {
            Some("a repeated OOM event")
        } else if self.published >= MAX_PER_WINDOW {
            Some("OOM events beyond the rate limit")
        } else {
            None
        };
        match reason {
            None => {
                self.last.insert(id.to_string(), now);
                self.published += 1;
                Verdict::Publish
            }
            Some(reason) => {
                self.dropped += 1;
                let report = (!self.reported).then(|| {
                    self.reported = true;
                    format!("dropped {reason} (id {:?}); {} dropped so far", truncate(id), self.dropped)
                });
                Verdict::Drop { report }
            }
        }
    }

    #[cfg(test)]
    fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// A guest-chosen id, shortened for a log line.
fn truncate(id: &str) -> String {
    id.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_oom_events_for_other_containers_are_dropped() {
        println!("ATTACK OOM events forged for other containers: tried");
        let mut f = OomFilter::default();
        let t0 = Instant::now();
        assert_eq!(f.admit("c1", true, t0), Verdict::Publish);
        assert!(matches!(f.admit("c1", true, t0), Verdict::Drop { report: Some(_) }), "a duplicate is dropped");
        assert_eq!(f.admit("c1", true, t0 + WINDOW), Verdict::Publish, "once the window passed, again");
        let forged = f.admit(&"x".repeat(10_000), false, t0 + WINDOW);
        match forged {
            Verdict::Drop { report: Some(line) } => assert!(line.len() < 300, "the log line is bounded: {line}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(f.admit("nope", false, t0 + WINDOW), Verdict::Drop { report: None }, "one log line per window");
        println!("ATTACK OOM events forged for other containers: held");
    }

    #[test]
    fn attack_oom_event_flood_is_cut_to_the_rate() {
        println!("ATTACK a forged OOM event flood: tried");
        let mut f = OomFilter::default();
        let t0 = Instant::now();
        let mut published = 0;
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_micros(i as u64 * 10); // 1 s in all
            if f.admit(&format!("c{}", i % 1000), true, now) == Verdict::Publish {
                published += 1;
            }
        }
        assert!(published <= 2 * MAX_PER_WINDOW as usize, "{published} published");
        assert!(f.last.len() <= 2 * MAX_PER_WINDOW as usize, "only published ids are remembered");
        assert_eq!(f.dropped() as usize, 100_000 - published);
        println!("ATTACK a forged OOM event flood: held");
    }
}
