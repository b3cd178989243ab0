//! Call records of trunk calls: one JSON line per call, appended with a single write (a
//! reader never sees half a line), the file rotated by size (`[cdr] max_bytes`: the full
//! file becomes `PATH.1`) or reopened on SIGHUP after an outside tool moved it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use pinhole_sip::b2bua::CallRecord;

pub(crate) struct CdrWriter {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    max_bytes: u64,
}

/// Set by the SIGHUP handler: reopen before the next record.
pub(crate) static REOPEN: AtomicBool = AtomicBool::new(false);

impl CdrWriter {
    pub(crate) fn open(path: PathBuf, max_bytes: u64) -> std::io::Result<CdrWriter> {
        let mut w = CdrWriter { path, file: None, written: 0, max_bytes };
        w.reopen()?;
        Ok(w)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        let f = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.written = f.metadata().map(|m| m.len()).unwrap_or(0);
        self.file = Some(f);
        Ok(())
    }

    /// The file is full: it becomes `PATH.1` (replacing an older one) and a new one starts.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, PathBuf::from(old))?;
        self.reopen()
    }

    /// Appends one record, `ended_at` the wall clock at its end.
    pub(crate) fn write(&mut self, r: &CallRecord, ended_at: SystemTime) -> std::io::Result<()> {
        if REOPEN.swap(false, Ordering::Relaxed) {
            self.reopen()?;
        }
        if self.max_bytes > 0 && self.written >= self.max_bytes {
            self.rotate()?;
        }
        let mut line = record_json(r, ended_at).to_string();
        line.push('\n');
        let f = match &mut self.file {
            Some(f) => f,
            None => {
                self.reopen()?;
                self.file.as_mut().ok_or_else(|| std::io::Error::other("no call record file"))?
            }
        };
        f.write_all(line.as_bytes())?;
        self.written += line.len() as u64;
        Ok(())
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A record as its JSON object: times in Unix milliseconds.
pub(crate) fn record_json(r: &CallRecord, ended_at: SystemTime) -> serde_json::Value {
    let end = unix_ms(ended_at);
    let start = end.saturating_sub(r.duration_ms);
    let mut v = serde_json::json!({
        "a_call_id": r.a_call_id,
        "b_call_id": r.b_call_id,
        "caller": r.caller,
        "callee": r.callee,
        "trunk": r.trunk,
        "start_ms": start,
        "answer_ms": r.answer_ms.map(|a| start + a),
        "end_ms": end,
        "hangup": r.hangup,
        "code": r.code,
        "packets": r.packets,
        "bytes": r.bytes,
        "media_path": r.media_path,
    });
    // What the relay measured, when it carried RTP (see README, Call quality).
    if let Some(q) = &r.quality {
        v["mos"] = q.mos().map(round2).into();
        v["mos_min"] = q.lowest_mos().map(round2).into();
        v["loss_pct"] = round2(q.loss_pct()).into();
        v["jitter_ms"] = round2(q.jitter_ms()).into();
        v["rtt_ms"] = q.rtt_us().map(|r| round2(f64::from(r) / 1000.0)).into();
    }
    v
}

/// Two decimals are all a quality figure means.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u32) -> CallRecord {
        CallRecord {
            a_call_id: format!("a{n}"),
            b_call_id: format!("b{n}"),
            caller: "alice".into(),
            callee: "15551230001".into(),
            trunk: "carrier1".into(),
            answer_ms: Some(1500),
            duration_ms: 10_000,
            hangup: "caller",
            code: 200,
            packets: 1000,
            bytes: 172_000,
            media_path: "relay",
            quality: None,
        }
    }

    #[test]
    fn records_are_whole_json_lines_and_a_full_file_rotates() {
        let dir = std::env::temp_dir().join(format!("pinhole-cdr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("calls.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut w = CdrWriter::open(path.clone(), 600).expect("open");
        let at = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        for n in 0..5 {
            w.write(&record(n), at).expect("write");
        }
        let current = std::fs::read_to_string(&path).expect("current");
        let rotated = std::fs::read_to_string(dir.join("calls.jsonl.1")).expect("rotated");
        let lines: Vec<&str> = rotated.lines().chain(current.lines()).collect();
        assert_eq!(lines.len(), 5, "no record lost across the rotation");
        let first: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
        assert_eq!(first["start_ms"], 1_799_999_990_000u64);
        assert_eq!(first["answer_ms"], 1_799_999_991_500u64);
        assert_eq!((first["trunk"].as_str(), first["code"].as_u64()), (Some("carrier1"), Some(200)));
        // After an outside tool moved the file, SIGHUP makes the next record start a new one.
        std::fs::rename(&path, dir.join("moved")).expect("move");
        REOPEN.store(true, Ordering::Relaxed);
        w.write(&record(9), at).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("new file").lines().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
