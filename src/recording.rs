//! `[recording]`: calls' media written to disk by one thread, never by the forwarding
//! workers. A worker hands each packet of a recorded call to a bounded queue and moves on;
//! when the queue is full the packet is not recorded (counted), and forwarding never waits.
//!
//! Per call (named by its Call-ID) the recorder writes `CALL.pcap` (every packet both ways,
//! RTP and RTCP, as IP/UDP between the addresses it travelled) and, for G.711, `CALL.wav`:
//! 8 kHz 16-bit stereo, side A (the caller) on the left channel and side B on the right,
//! each packet placed by when it arrived. Files of finished calls are deleted oldest first
//! when the directory holds more than `max_bytes`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

/// What the recorder is told.
pub(crate) enum Rec {
    /// Recording `id` (the relay's call serial) starts, for `call_id`.
    Start { id: u64, call_id: String },
    /// A packet of recording `id`, sent by side A (`from_a`) or B.
    Packet { id: u64, from_a: bool, at: SystemTime, src: SocketAddr, dst: SocketAddr, data: Vec<u8> },
    /// Recording `id` ends: its files are finished.
    Stop { id: u64 },
    /// A worker's batch of packets, handed over in one message.
    Batch(Vec<Rec>),
}

/// The capture points' side: the data plane's workers and control thread.
#[derive(Clone)]
pub(crate) struct Recorder {
    tx: SyncSender<Rec>,
}

impl Recorder {
    /// Starts the recorder thread writing into `dir`.
    pub(crate) fn start(dir: PathBuf, max_bytes: u64, queue: usize) -> anyhow::Result<Recorder> {
        std::fs::create_dir_all(&dir).with_context(|| format!("recording directory {}", dir.display()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(queue.max(16));
        std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || run(&rx, &dir, max_bytes))
            .context("starting the recorder")?;
        metrics::counter!("pinhole_recording_dropped_total").absolute(0);
        metrics::counter!("pinhole_recording_bytes_total").absolute(0);
        metrics::counter!("pinhole_recordings_total").absolute(0);
        Ok(Recorder { tx })
    }

    /// Hands `rec` over without waiting; false (and counted) when the queue is full.
    pub(crate) fn offer(&self, rec: Rec) -> bool {
        self.send(rec, 1)
    }

    /// Hands a batch of packets over as one message: one wakeup of the recorder. The queue
    /// counts messages; a full one drops the whole batch (each packet counted).
    pub(crate) fn offer_batch(&self, batch: Vec<Rec>) {
        let n = batch.len() as u64;
        self.send(Rec::Batch(batch), n);
    }

    fn send(&self, rec: Rec, packets: u64) -> bool {
        match self.tx.try_send(rec) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                metrics::counter!("pinhole_recording_dropped_total").increment(packets);
                false
            }
        }
    }
}

/// A recording without packets this long is finished even if its Stop was lost.
const IDLE: Duration = Duration::from_secs(60);

/// One call being written.
struct Recording {
    /// The directory and the file name the Call-ID gives, before the extension.
    dir: PathBuf,
    name: String,
    pcap: BufWriter<File>,
    /// Per side, the raw 16-bit samples placed by arrival time (a sparse file: holes read
    /// as silence), interleaved into the WAV when the call ends.
    channels: [Option<Channel>; 2],
    /// Per side, where its audio is placed: the sample offset of a packet and its RTP
    /// timestamp (and SSRC). Later packets go by their timestamps, so arrival jitter moves
    /// nothing; a new SSRC or a timestamp more than a second off the clock re-anchors.
    anchors: [Option<(u64, u32, u32)>; 2],
    started: SystemTime,
    last: SystemTime,
}

/// One side's samples on their way to its sparse file: consecutive packets gather in
/// memory and go out in one write (a jump in placement, or 64 KiB, writes what gathered).
struct Channel {
    file: File,
    pending: Vec<u8>,
    /// The sample offset `pending` starts at.
    start: u64,
}

impl Channel {
    fn write(&mut self, offset: u64, samples: &[u8]) -> std::io::Result<()> {
        if !self.pending.is_empty() && offset != self.start + self.pending.len() as u64 / 2 {
            self.flush()?;
        }
        if self.pending.is_empty() {
            self.start = offset;
        }
        self.pending.extend_from_slice(samples);
        if self.pending.len() >= 64 << 10 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.seek(SeekFrom::Start(self.start * 2))?;
        self.file.write_all(&self.pending)?;
        self.pending.clear();
        Ok(())
    }
}

fn run(rx: &Receiver<Rec>, dir: &Path, max_bytes: u64) {
    let mut live: HashMap<u64, Recording> = HashMap::new();
    loop {
        match rx.recv_timeout(IDLE / 4) {
            Ok(rec) => handle(rec, &mut live, dir, max_bytes),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = SystemTime::now();
        let idle: Vec<u64> = live
            .iter()
            .filter(|(_, r)| now.duration_since(r.last).unwrap_or_default() > IDLE)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(r) = live.remove(&id) {
                r.finish();
                enforce_limit(dir, max_bytes);
            }
        }
    }
    for (_, r) in live.drain() {
        r.finish();
    }
}

/// One start, stop, packet or batch of packets.
fn handle(rec: Rec, live: &mut HashMap<u64, Recording>, dir: &Path, max_bytes: u64) {
    match rec {
        Rec::Batch(b) => {
            for r in b {
                handle(r, live, dir, max_bytes);
            }
        }
        Rec::Start { id, call_id } => {
            if live.contains_key(&id) {
                return;
            }
            match Recording::create(dir, &call_id) {
                Ok(r) => {
                    live.insert(id, r);
                }
                Err(e) => tracing::warn!(%call_id, error = %format!("{e:#}"), "cannot record the call"),
            }
        }
        Rec::Packet { id, from_a, at, src, dst, data } => {
            if let Some(r) = live.get_mut(&id) {
                if let Err(e) = r.packet(from_a, at, src, dst, &data) {
                    tracing::warn!(error = %e, "recording write failed");
                }
            }
        }
        Rec::Stop { id } => {
            if let Some(r) = live.remove(&id) {
                r.finish();
                enforce_limit(dir, max_bytes);
            }
        }
    }
}

/// A Call-ID as a file name: letters, digits and `-_.@` kept, the rest `_`, at most 200.
fn file_name(call_id: &str) -> String {
    let name: String = call_id
        .chars()
        .take(200)
        .map(|c| if c.is_ascii_alphanumeric() || "-_.@".contains(c) { c } else { '_' })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        format!("call{name}")
    } else {
        name
    }
}

impl Recording {
    fn create(dir: &Path, call_id: &str) -> anyhow::Result<Recording> {
        let name = file_name(call_id);
        let mut pcap = BufWriter::with_capacity(64 << 10, File::create(dir.join(format!("{name}.pcap")))?);
        // pcap global header: microsecond timestamps, LINKTYPE_RAW (IPv4 or IPv6 packets).
        pcap.write_all(&0xa1b2_c3d4u32.to_le_bytes())?;
        pcap.write_all(&2u16.to_le_bytes())?;
        pcap.write_all(&4u16.to_le_bytes())?;
        pcap.write_all(&[0; 8])?;
        pcap.write_all(&65_535u32.to_le_bytes())?;
        pcap.write_all(&101u32.to_le_bytes())?;
        metrics::counter!("pinhole_recordings_total").increment(1);
        let now = SystemTime::now();
        Ok(Recording {
            dir: dir.to_owned(),
            name,
            pcap,
            channels: [None, None],
            anchors: [None, None],
            started: now,
            last: now,
        })
    }

    /// One of the call's files: `NAME.ext`.
    fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.name))
    }

    fn packet(
        &mut self,
        from_a: bool,
        at: SystemTime,
        src: SocketAddr,
        dst: SocketAddr,
        data: &[u8],
    ) -> std::io::Result<()> {
        self.last = SystemTime::now();
        let frame = ip_udp(src, dst, data);
        let t = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.pcap.write_all(&(t.as_secs() as u32).to_le_bytes())?;
        self.pcap.write_all(&t.subsec_micros().to_le_bytes())?;
        self.pcap.write_all(&(frame.len() as u32).to_le_bytes())?;
        self.pcap.write_all(&(frame.len() as u32).to_le_bytes())?;
        self.pcap.write_all(&frame)?;
        metrics::counter!("pinhole_recording_bytes_total").increment(16 + frame.len() as u64);
        // G.711 audio into its side's channel.
        let Some((info, payload)) = rtp_payload(data) else { return Ok(()) };
        let pt = info.payload_type;
        let decode: fn(u8) -> i16 = match pt {
            0 => ulaw,
            8 => alaw,
            _ => return Ok(()),
        };
        let side = usize::from(!from_a);
        if self.channels[side].is_none() {
            let path = self.path(if from_a { "a.raw" } else { "b.raw" });
            let file = File::options().create(true).truncate(true).read(true).write(true).open(path)?;
            self.channels[side] = Some(Channel { file, pending: Vec::with_capacity(64 << 10), start: 0 });
        }
        let arrival = at.duration_since(self.started).unwrap_or_default().as_micros() as u64 * 8 / 1000;
        let placed = self.anchors[side].and_then(|(offset, ts, ssrc)| {
            let at = offset as i64 + i64::from(info.timestamp.wrapping_sub(ts) as i32);
            (ssrc == info.ssrc && at >= 0 && (at - arrival as i64).abs() <= 8000).then_some(at as u64)
        });
        let offset = placed.unwrap_or_else(|| {
            self.anchors[side] = Some((arrival, info.timestamp, info.ssrc));
            arrival
        });
        let mut samples = [0u8; 2048];
        let n = payload.len().min(samples.len() / 2);
        for (out, &b) in samples.chunks_exact_mut(2).zip(&payload[..n]) {
            out.copy_from_slice(&decode(b).to_le_bytes());
        }
        match self.channels[side].as_mut() {
            Some(c) => c.write(offset, &samples[..n * 2]),
            None => Ok(()),
        }
    }

    /// Closes the pcap and, when there was G.711, interleaves the channels into the WAV.
    fn finish(mut self) {
        let _ = self.pcap.flush();
        if self.channels.iter().all(Option::is_none) {
            return;
        }
        if let Err(e) = self.write_wav() {
            tracing::warn!(error = %e, "recording: the WAV could not be written");
        }
        for side in ["a.raw", "b.raw"] {
            let _ = std::fs::remove_file(self.path(side));
        }
    }

    fn write_wav(&mut self) -> std::io::Result<()> {
        let mut chans: Vec<Option<File>> = Vec::new();
        for c in self.channels.iter_mut().map(Option::take) {
            chans.push(match c {
                Some(mut c) => {
                    c.flush()?;
                    Some(c.file)
                }
                None => None,
            });
        }
        let lens: Vec<u64> =
            chans.iter().map(|c| c.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len() / 2)).collect();
        let frames = lens.iter().copied().max().unwrap_or(0);
        for f in chans.iter_mut().flatten() {
            f.seek(SeekFrom::Start(0))?;
        }
        let mut out = BufWriter::new(File::create(self.path("wav"))?);
        let data_len = (frames * 4) as u32;
        out.write_all(b"RIFF")?;
        out.write_all(&(36 + data_len).to_le_bytes())?;
        out.write_all(b"WAVEfmt ")?;
        out.write_all(&16u32.to_le_bytes())?;
        out.write_all(&1u16.to_le_bytes())?; // PCM
        out.write_all(&2u16.to_le_bytes())?; // stereo: A left, B right
        out.write_all(&8000u32.to_le_bytes())?;
        out.write_all(&(8000u32 * 4).to_le_bytes())?;
        out.write_all(&4u16.to_le_bytes())?;
        out.write_all(&16u16.to_le_bytes())?;
        out.write_all(b"data")?;
        out.write_all(&data_len.to_le_bytes())?;
        const CHUNK: u64 = 8000;
        let mut done = 0;
        let (mut left, mut right) = (vec![0u8; CHUNK as usize * 2], vec![0u8; CHUNK as usize * 2]);
        while done < frames {
            let n = CHUNK.min(frames - done) as usize;
            for (buf, (chan, len)) in [&mut left, &mut right].into_iter().zip(chans.iter_mut().zip(&lens)) {
                buf[..n * 2].fill(0);
                let have = len.saturating_sub(done).min(n as u64) as usize;
                if let Some(f) = chan.as_mut().filter(|_| have > 0) {
                    f.read_exact(&mut buf[..have * 2])?;
                }
            }
            for k in 0..n {
                out.write_all(&left[k * 2..k * 2 + 2])?;
                out.write_all(&right[k * 2..k * 2 + 2])?;
            }
            done += n as u64;
        }
        metrics::counter!("pinhole_recording_bytes_total").increment(44 + u64::from(data_len));
        out.flush()
    }
}

/// An IPv4 or IPv6 packet with a UDP header around `data`, as it travelled (checksums 0:
/// "not computed", which readers accept for a capture).
fn ip_udp(src: SocketAddr, dst: SocketAddr, data: &[u8]) -> Vec<u8> {
    let udp_len = (8 + data.len()) as u16;
    let mut p = Vec::with_capacity(48 + data.len());
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&(20 + udp_len).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let sum = checksum(&p[..20]);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&udp_len.to_be_bytes());
            p.extend_from_slice(&[17, 64]);
            p.extend_from_slice(&v6(s).octets());
            p.extend_from_slice(&v6(d).octets());
        }
    }
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An RTP packet's header fields and payload (`None` for RTCP and anything else).
fn rtp_payload(b: &[u8]) -> Option<(pinhole_media::latch::RtpInfo, &[u8])> {
    let info = pinhole_media::latch::RtpInfo::parse(b)?;
    let mut at = 12 + usize::from(b[0] & 0x0f) * 4;
    if b[0] & 0x10 != 0 {
        let words = usize::from(u16::from_be_bytes([*b.get(at + 2)?, *b.get(at + 3)?]));
        at += 4 + words * 4;
    }
    let mut end = b.len();
    if b[0] & 0x20 != 0 {
        end = end.checked_sub(usize::from(*b.last()?))?;
    }
    Some((info, b.get(at..end)?))
}

/// G.711 μ-law to linear.
fn ulaw(b: u8) -> i16 {
    let b = !b;
    let t = ((i16::from(b & 0x0f) << 3) + 0x84) << ((b & 0x70) >> 4);
    if b & 0x80 != 0 {
        0x84 - t
    } else {
        t - 0x84
    }
}

/// G.711 A-law to linear.
fn alaw(b: u8) -> i16 {
    let b = b ^ 0x55;
    let mut t = i16::from(b & 0x0f) << 4;
    let seg = (b & 0x70) >> 4;
    t = match seg {
        0 => t + 8,
        1 => t + 0x108,
        _ => (t + 0x108) << (seg - 1),
    };
    if b & 0x80 != 0 {
        t
    } else {
        -t
    }
}

/// Deletes the oldest finished recordings until the directory holds at most `max_bytes`
/// (0: no limit). Files still being written (`.raw`) are not counted or touched.
fn enforce_limit(dir: &Path, max_bytes: u64) {
    if max_bytes == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pcap" || x == "wav"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    files.sort();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    for (_, len, path) in files {
        if total <= max_bytes {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
            metrics::counter!("pinhole_recording_deleted_total").increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g711_decodes_silence_to_near_zero_and_full_scale_to_its_extremes() {
        assert_eq!(ulaw(0xff), 0);
        assert_eq!(ulaw(0x7f), 0);
        assert_eq!(ulaw(0x00), -32124);
        assert_eq!(ulaw(0x80), 32124);
        assert_eq!(alaw(0xd5), 8);
        assert_eq!(alaw(0x55), -8);
        assert_eq!(alaw(0xaa), 32256);
        assert_eq!(alaw(0x2a), -32256);
    }

    fn rtp(pt: u8, seq: u16, payload: &[u8]) -> Vec<u8> {
        let ts = (u32::from(seq) * 160).to_be_bytes();
        let mut p = vec![0x80, pt, (seq >> 8) as u8, seq as u8, ts[0], ts[1], ts[2], ts[3], 0, 0, 0, 1];
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn a_call_becomes_a_pcap_of_both_ways_and_a_stereo_wav_with_each_side_on_its_channel() {
        let dir = std::env::temp_dir().join(format!("pinhole-rec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut r = Recording::create(&dir, "abc/../x@host").expect("create");
        let (a, b): (SocketAddr, SocketAddr) =
            ("198.51.100.10:4000".parse().expect("a"), "198.51.100.20:5000".parse().expect("b"));
        let t0 = r.started;
        for k in 0..50u16 {
            let at = t0 + Duration::from_millis(20 * u64::from(k));
            // A sends μ-law full positive, B A-law full negative.
            r.packet(true, at, a, b, &rtp(0, k, &[0x80; 160])).expect("a");
            r.packet(false, at, b, a, &rtp(8, k, &[0x2a; 160])).expect("b");
        }
        r.packet(true, t0, a, b, &[0x81, 201, 0, 1, 0, 0, 0, 1]).expect("rtcp");
        assert_eq!(r.name, "abc_.._x@host", "no path escapes the directory");
        let (pcap, wav, raw) = (r.path("pcap"), r.path("wav"), r.path("a.raw"));
        r.finish();
        let pcap = std::fs::read(pcap).expect("pcap");
        // 101 packets, each 16 + 28 + payload.
        assert_eq!(pcap.len(), 24 + 100 * (16 + 28 + 172) + (16 + 28 + 8));
        let wav = std::fs::read(wav).expect("wav");
        assert_eq!(&wav[..4], b"RIFF");
        assert_eq!(u16::from_le_bytes([wav[22], wav[23]]), 2, "stereo");
        let frames = (wav.len() - 44) / 4;
        assert!((7_900..=8_100).contains(&frames), "one second: {frames}");
        let left = i16::from_le_bytes([wav[44 + 400], wav[45 + 400]]);
        let right = i16::from_le_bytes([wav[46 + 400], wav[47 + 400]]);
        assert_eq!((left, right), (32124, -32256), "A on the left, B on the right");
        assert!(!raw.exists(), "the channel files are gone");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_oldest_recordings_go_first_when_the_directory_is_over_its_limit() {
        let dir = std::env::temp_dir().join(format!("pinhole-rec-limit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        for (k, name) in ["old.pcap", "mid.wav", "new.pcap"].iter().enumerate() {
            std::fs::write(dir.join(name), vec![0u8; 1000]).expect("write");
            let t = SystemTime::now() - Duration::from_secs(100 - 10 * k as u64);
            File::options().write(true).open(dir.join(name)).and_then(|f| f.set_modified(t)).expect("mtime");
        }
        std::fs::write(dir.join("live.a.raw"), vec![0u8; 5000]).expect("raw");
        enforce_limit(&dir, 2000);
        assert!(!dir.join("old.pcap").exists());
        assert!(dir.join("mid.wav").exists() && dir.join("new.pcap").exists());
        assert!(dir.join("live.a.raw").exists(), "a call being written is not touched");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
