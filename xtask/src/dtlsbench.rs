//! `cargo xtask bench dtls`: DTLS-SRTP handshakes as a relay's browser legs do them
//! (DTLS 1.2, ECDHE with an ECDSA P-256 certificate, the cookie exchange, the peer's
//! certificate checked against its fingerprint, SRTP keys exported), in one thread: the
//! browser's side is another `DtlsLeg` as client. Reports the server side's handshakes
//! per second of one core (only the time in pinhole's leg counts), and both ends'.

use std::time::{Duration, Instant};

use pinhole_media::dtls::{parse_fingerprint, DtlsLeg, Identity, State};

use crate::bench::arg;

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        // `cargo xtask` is a debug build; the handshakes are measured optimised.
        let status = std::process::Command::new(env!("CARGO"))
            .args(["run", "--quiet", "--release", "--package", "xtask", "--", "bench", "dtls"])
            .args(args)
            .current_dir(crate::root())
            .status()?;
        anyhow::ensure!(status.success(), "the release build of the benchmark failed");
        return Ok(());
    }
    let n = arg(args, "--handshakes", 2000) as usize;
    let ours = Identity::generate()?;
    let browser = Identity::generate()?;
    let fp = |id: &Identity| parse_fingerprint(&id.fingerprint_attr()).ok_or_else(|| anyhow::anyhow!("fingerprint"));
    let (our_fp, browser_fp) = (fp(&ours)?, fp(&browser)?);
    let mut server_time = Duration::ZERO;
    let t0 = Instant::now();
    for _ in 0..n {
        let now = Instant::now();
        let t = Instant::now();
        let mut server = DtlsLeg::new(&ours, browser_fp, false, now);
        server_time += t.elapsed();
        let mut client = DtlsLeg::new(&browser, our_fp, true, now);
        for _ in 0..16 {
            while let Some(p) = client.poll_transmit() {
                let t = Instant::now();
                server.handle(now, &p);
                server_time += t.elapsed();
            }
            let t = Instant::now();
            let mut replies = Vec::new();
            while let Some(p) = server.poll_transmit() {
                replies.push(p);
            }
            server_time += t.elapsed();
            for p in replies {
                client.handle(now, &p);
            }
            if server.state() != State::Handshaking && client.state() != State::Handshaking {
                break;
            }
        }
        anyhow::ensure!(server.state() == State::Done && client.state() == State::Done, "a handshake did not finish");
        let t = Instant::now();
        anyhow::ensure!(server.take_keys().is_some(), "no keys");
        server_time += t.elapsed();
    }
    let total = t0.elapsed();
    println!(
        "DTLS-SRTP handshakes, {n} in one thread: pinhole's (server) side {:.0} per second of one core ({:.0} us each); \
         both ends together {:.0}/s",
        n as f64 / server_time.as_secs_f64(),
        server_time.as_secs_f64() * 1e6 / n as f64,
        n as f64 / total.as_secs_f64()
    );
    Ok(())
}
