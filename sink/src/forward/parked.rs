//! The parked log: batches InfluxDB refused with 400 (malformed or conflicting points), kept so
//! that the forwarder moves on instead of retrying them forever, and an operator can see, and
//! re-send with `resync`, exactly which `seq` range was affected.
//!
//! A plain append-only text file per destination, one record a line, fsync'ed before the cursor
//! moves past the batch: `first_seq last_seq points status unix_s message`. A crash between the
//! append and the cursor update re-sends the batch and appends the same range again;
//! [`read`] merges records of one range, so it is counted once.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// One parked batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedRange {
    pub first_seq: u64,
    pub last_seq: u64,
    pub points: u64,
    /// HTTP status of the refusal.
    pub status: u16,
    /// When it was parked (UNIX seconds).
    pub at_unix_s: u64,
    /// InfluxDB's error text (one line).
    pub message: String,
}

pub struct ParkedLog {
    path: PathBuf,
    file: Option<File>,
}

impl ParkedLog {
    pub fn new(path: PathBuf) -> ParkedLog {
        ParkedLog { path, file: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends and fsyncs one record.
    pub fn append(&mut self, r: &ParkedRange) -> std::io::Result<()> {
        let mut f = match self.file.take() {
            Some(f) => f,
            None => OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        };
        let message: String = r
            .message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let line = format!(
            "{} {} {} {} {} {}\n",
            r.first_seq, r.last_seq, r.points, r.status, r.at_unix_s, message
        );
        let res = f.write_all(line.as_bytes()).and_then(|()| f.sync_data());
        // On failure the handle is dropped and reopened next time (the file may have been
        // removed or the disk remounted).
        if res.is_ok() {
            self.file = Some(f);
        }
        res
    }
}

/// Reads the parked log; a missing file is an empty log. Records of the same range are merged
/// (the latest wins); lines that do not parse (a torn last line after a crash) are skipped.
pub fn read(path: &Path) -> std::io::Result<Vec<ParkedRange>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<ParkedRange> = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        let Some(r) = parse(&line) else {
            tracing::warn!(path = %path.display(), line, "skipping unreadable parked record");
            continue;
        };
        match out
            .iter_mut()
            .find(|o| o.first_seq == r.first_seq && o.last_seq == r.last_seq)
        {
            Some(o) => *o = r,
            None => out.push(r),
        }
    }
    Ok(out)
}

fn parse(line: &str) -> Option<ParkedRange> {
    let mut it = line.splitn(6, ' ');
    let r = ParkedRange {
        first_seq: it.next()?.parse().ok()?,
        last_seq: it.next()?.parse().ok()?,
        points: it.next()?.parse().ok()?,
        status: it.next()?.parse().ok()?,
        at_unix_s: it.next()?.parse().ok()?,
        message: it.next()?.to_owned(),
    };
    (r.first_seq <= r.last_seq).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_merge_and_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("parked");
        assert!(read(&path).expect("missing is empty").is_empty());
        let mut log = ParkedLog::new(path.clone());
        let a = ParkedRange {
            first_seq: 1,
            last_seq: 100,
            points: 100,
            status: 400,
            at_unix_s: 5,
            message: "partial write:\nfield type conflict".into(),
        };
        log.append(&a).expect("append");
        let b = ParkedRange {
            first_seq: 201,
            last_seq: 300,
            ..a.clone()
        };
        log.append(&b).expect("append");
        log.append(&a)
            .expect("append again (crash before the cursor moved)");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"301 40"))
            .expect("torn tail");
        let got = read(&path).expect("read");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].message, "partial write: field type conflict");
        assert_eq!((got[1].first_seq, got[1].last_seq), (201, 300));
    }
}
