//! At most a few lines a minute per app and destination (pure): past that, attempts are
//! counted, and when the minute is over one summary line says how many more there were.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// The window lines are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// (app, destination) pairs followed at once; past it the oldest window is forgotten (its
/// held-back count is then summarised at once).
pub const MAX_KEYS: usize = 10_000;

/// What to do with one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Line,
    HeldBack,
}

#[derive(Debug, Clone)]
struct Window<T> {
    started: SystemTime,
    lines: u32,
    held_back: u64,
    /// The last attempt held back, for the summary's words.
    last: Option<T>,
}

/// The per-key windows; `T` is what a summary is written about.
#[derive(Debug)]
pub struct Limiter<K, T> {
    per_window: u32,
    windows: HashMap<K, Window<T>>,
}

impl<K: std::hash::Hash + Eq + Clone, T: Clone> Limiter<K, T> {
    pub fn new(per_window: u32) -> Limiter<K, T> {
        Limiter {
            per_window,
            windows: HashMap::new(),
        }
    }

    /// Counts one attempt of `key` at `now`. Returns summaries of windows it had to forget to
    /// make room (at most one).
    pub fn admit(&mut self, key: K, what: &T, now: SystemTime) -> (Admit, Vec<(T, u64)>) {
        let mut forgotten = Vec::new();
        if !self.windows.contains_key(&key) && self.windows.len() >= MAX_KEYS {
            let oldest = self
                .windows
                .iter()
                .min_by_key(|(_, w)| w.started)
                .map(|(k, _)| k.clone());
            if let Some(window) = oldest.and_then(|k| self.windows.remove(&k))
                && let Some(last) = window.last
                && window.held_back > 0
            {
                forgotten.push((last, window.held_back));
            }
        }
        let window = self.windows.entry(key).or_insert(Window {
            started: now,
            lines: 0,
            held_back: 0,
            last: None,
        });
        if window.lines < self.per_window {
            window.lines += 1;
            (Admit::Line, forgotten)
        } else {
            window.held_back += 1;
            window.last = Some(what.clone());
            (Admit::HeldBack, forgotten)
        }
    }

    /// Ends the windows older than [`WINDOW`]; returns (what, how many were held back) for
    /// those that held any back.
    pub fn due(&mut self, now: SystemTime) -> Vec<(T, u64)> {
        let mut summaries = Vec::new();
        self.windows.retain(|_, window| {
            let over = now
                .duration_since(window.started)
                .is_ok_and(|age| age >= WINDOW);
            if over
                && window.held_back > 0
                && let Some(last) = window.last.take()
            {
                summaries.push((last, window.held_back));
            }
            !over
        });
        summaries
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_lines_a_minute_per_key_then_one_summary() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut limiter: Limiter<&str, &str> = Limiter::new(5);
        let admitted: Vec<Admit> = (0..8)
            .map(|i| {
                limiter
                    .admit("a->x", &"x", start + Duration::from_secs(i))
                    .0
            })
            .collect();
        assert_eq!(admitted.iter().filter(|a| **a == Admit::Line).count(), 5);
        assert_eq!(
            limiter.admit("a->y", &"y", start).0,
            Admit::Line,
            "another destination has its own"
        );
        assert_eq!(
            limiter.admit("b->x", &"x", start).0,
            Admit::Line,
            "another app has its own"
        );
        assert!(limiter.due(start + Duration::from_secs(59)).is_empty());
        assert_eq!(limiter.due(start + WINDOW), vec![("x", 3)]);
        assert!(
            limiter.is_empty(),
            "windows without held-back attempts end quietly"
        );
        assert_eq!(
            limiter.admit("a->x", &"x", start + WINDOW).0,
            Admit::Line,
            "a new minute"
        );
    }

    #[test]
    fn the_keys_are_bounded_and_a_forgotten_window_is_summarised() {
        let start = SystemTime::UNIX_EPOCH;
        let mut limiter: Limiter<u32, u32> = Limiter::new(1);
        limiter.admit(0, &0, start);
        limiter.admit(0, &0, start);
        for key in 1..MAX_KEYS as u32 {
            limiter.admit(key, &key, start + Duration::from_millis(1));
        }
        let (admit, forgotten) =
            limiter.admit(u32::MAX, &u32::MAX, start + Duration::from_millis(2));
        assert_eq!(admit, Admit::Line);
        assert_eq!(forgotten, vec![(0, 1)]);
        assert_eq!(limiter.len(), MAX_KEYS);
    }
}
