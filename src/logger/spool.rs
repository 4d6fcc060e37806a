//! Where events wait while MongoDB does not answer: numbered JSON-lines
//! files in the node's spool folder, written whole (temp file + rename) and
//! replayed oldest first. Bounded: past `max` bytes the oldest files go,
//! and the writer says so loudly.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use super::Event;

pub struct Spool {
    dir: PathBuf,
    /// Bound on the bytes of all files.
    max: u64,
    /// Spooled files, oldest first: (sequence number, bytes).
    files: Vec<(u64, u64)>,
}

impl Spool {
    /// Opens (creating) `dir` and finds the files an earlier run left.
    pub fn open(dir: &Path, max: u64) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let mut files = Vec::new();
        for f in std::fs::read_dir(dir)? {
            let f = f?;
            let name = f.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_suffix(".jsonl")
                .and_then(|n| n.parse::<u64>().ok())
            {
                files.push((n, f.metadata()?.len()));
            } else if name.ends_with(".tmp") {
                // A write cut off by a crash: never renamed, never counted.
                let _ = std::fs::remove_file(f.path());
            }
        }
        files.sort_unstable();
        Ok(Spool {
            dir: dir.to_path_buf(),
            max,
            files,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b).sum()
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{n:020}.jsonl"))
    }

    /// Appends `events` as one new file. Returns how many spooled events
    /// were dropped to keep within the bound (the oldest first).
    pub fn push(&mut self, events: &[Event]) -> std::io::Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        let n = self.files.last().map_or(1, |(n, _)| n + 1);
        let tmp = self.dir.join(format!("{n:020}.tmp"));
        let mut buf = Vec::with_capacity(events.len() * 400);
        for e in events {
            serde_json::to_writer(&mut buf, e).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_data()?;
        std::fs::rename(&tmp, self.path(n))?;
        self.files.push((n, buf.len() as u64));
        let mut dropped = 0;
        while self.bytes() > self.max && self.files.len() > 1 {
            let (old, _) = self.files.remove(0);
            dropped += self.read(old).map(|e| e.len() as u64).unwrap_or(0);
            let _ = std::fs::remove_file(self.path(old));
        }
        Ok(dropped)
    }

    fn read(&self, n: u64) -> std::io::Result<Vec<Event>> {
        let f = std::io::BufReader::new(std::fs::File::open(self.path(n))?);
        let mut out = Vec::new();
        for line in f.lines() {
            match serde_json::from_str::<Event>(&line?) {
                Ok(e) => out.push(e),
                Err(e) => {
                    tracing::warn!(error = %e, file = n, "unreadable line in the event spool skipped")
                }
            }
        }
        Ok(out)
    }

    /// The oldest file's events, with its number for [`Spool::remove`]. A
    /// file that cannot be read or holds no event is set aside as `.bad`
    /// (kept for a person, never retried), so it cannot wedge the log.
    pub fn oldest(&mut self) -> Option<(u64, Vec<Event>)> {
        while let Some(&(n, _)) = self.files.first() {
            match self.read(n) {
                Ok(events) if !events.is_empty() => return Some((n, events)),
                outcome => {
                    let why = outcome
                        .err()
                        .map_or("no readable event".to_string(), |e| e.to_string());
                    tracing::error!(file = n, error = %why, "event spool file set aside as .bad");
                    let _ = std::fs::rename(self.path(n), self.dir.join(format!("{n:020}.bad")));
                    self.files.remove(0);
                }
            }
        }
        None
    }

    /// Forgets a file once its events are in MongoDB.
    pub fn remove(&mut self, n: u64) {
        self.files.retain(|(m, _)| *m != n);
        let _ = std::fs::remove_file(self.path(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: usize) -> Event {
        Event {
            event_id: format!("e{i}"),
            message: Some("x".repeat(100)),
            ..Default::default()
        }
    }

    #[test]
    fn spooled_events_come_back_in_order_and_survive_a_reopen() {
        let dir = std::env::temp_dir().join(format!("beds-spool-{}", uuid::Uuid::new_v4()));
        let mut s = Spool::open(&dir, 1 << 20).unwrap();
        s.push(&[ev(1), ev(2)]).unwrap();
        s.push(&[ev(3)]).unwrap();
        std::fs::write(dir.join("00000000000000000009.tmp"), "half").unwrap();
        let mut s = Spool::open(&dir, 1 << 20).unwrap();
        let (n, first) = s.oldest().unwrap();
        assert_eq!(first, vec![ev(1), ev(2)]);
        s.remove(n);
        assert_eq!(s.oldest().unwrap().1, vec![ev(3)]);
        assert!(!dir.join("00000000000000000009.tmp").exists());
        // A file of garbage is set aside, not retried forever.
        s.push(&[ev(4)]).unwrap();
        std::fs::write(dir.join(format!("{:020}.jsonl", 2)), "garbage\n").unwrap();
        let (n, next) = s.oldest().unwrap();
        assert_eq!(next, vec![ev(4)]);
        assert!(dir.join(format!("{:020}.bad", 2)).exists());
        s.remove(n);
        assert!(s.oldest().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts_them() {
        let dir = std::env::temp_dir().join(format!("beds-spool-{}", uuid::Uuid::new_v4()));
        let one = serde_json::to_vec(&ev(10)).unwrap().len() as u64 + 1;
        let mut s = Spool::open(&dir, one * 25).unwrap();
        let mut dropped = 0;
        for i in 0..10 {
            let batch: Vec<Event> = (0..5).map(|j| ev(i * 5 + j)).collect();
            dropped += s.push(&batch).unwrap();
        }
        assert!(s.bytes() <= one * 25, "{} > {}", s.bytes(), one * 25);
        assert_eq!(dropped, 25, "five files of five dropped");
        assert_eq!(s.oldest().unwrap().1[0], ev(25), "the newest kept");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
