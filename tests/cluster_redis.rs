//! Two pinhole nodes sharing registrations in a real redis-server on loopback: a phone
//! (sipp) registers through node 1 and is called through node 2; node 1 killed with -9 and
//! restarted still has it; Redis gone for a while drops nothing and is reconciled after.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A redis-server of our own on `port`, keeping nothing on disk.
fn redis(port: u16) -> Child {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (package redis-server) must be installed");
    assert!(wait_listening(port, Duration::from_secs(5)), "redis-server did not start");
    child
}

fn node(dir: &TempDir, name: &str, redis_port: u16) -> Pinhole {
    let extra = format!("[cluster]\nredis = \"redis://127.0.0.1:{redis_port}\"\nnode = \"{name}\"\n");
    Pinhole::start(dir, PinholeOptions { extra, ..Default::default() })
}

fn wait_log(ph: &Pinhole, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ph.log_text().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn call(ph: &Pinhole, dir: &TempDir, tag: &str) -> (bool, u32, String) {
    let (ok, good, _, text) =
        sipp_caller(&ph.sip(), "carol", "uac.xml", 1, "u1", &dir.path().join(format!("{tag}.err")));
    (ok, good, text)
}

#[test]
fn a_phone_registered_through_one_node_is_reached_through_another_and_survives_a_kill_9_and_redis_going_away() {
    let dir = TempDir::new("cluster");
    let redis_port = free_port();
    let mut server = redis(redis_port);
    let mut n1 = node(&dir, "edge-1", redis_port);
    let n2 = node(&dir, "edge-2", redis_port);
    let callee = sipp_callee(&n1.sip(), "carol", free_port(), "u1", "uas.xml", 60_000, &dir.path().join("uas.err"));
    assert!(
        n2.wait_metric("pinhole_cluster_remote_bindings", 1.0, Duration::from_secs(10)),
        "node 2 never saw carol's binding\n{}\n{}",
        n1.log_text(),
        n2.log_text()
    );
    let (ok, good, text) = call(&n2, &dir, "first");
    assert!(ok && good == 1, "the call through node 2 was not answered: {text}\n{}\n{}", n1.log_text(), n2.log_text());

    // Node 1 dies hard and comes back: carol's binding comes back from Redis.
    n1.kill9();
    n1.restart();
    assert!(
        n1.wait_metric("pinhole_cluster_local_bindings", 1.0, Duration::from_secs(10)),
        "node 1 lost carol's binding across kill -9\n{}",
        n1.log_text()
    );
    assert!(n1.log_text().contains("own registrations taken back from Redis"));
    let (ok, good, text) = call(&n2, &dir, "after-restart");
    assert!(ok && good == 1, "not answered after node 1's restart: {text}\n{}", n1.log_text());

    // A call in progress through node 2 (held 14 s) while Redis goes away for 10 s, its
    // data with it: the call goes on, and new calls are served from what the nodes have.
    let long = {
        let (target, err) = (n2.sip(), dir.path().join("long.err"));
        std::thread::spawn(move || {
            sipp_caller_via(&target, None, "carol", "uac_hold.xml", 1, "u1", &err, &["-d", "14000"])
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let _ = server.kill();
    let _ = server.wait();
    let down_at = Instant::now();
    for n in [&n1, &n2] {
        assert!(wait_log(n, "Redis unreachable", Duration::from_secs(10)), "{}", n.log_text());
    }
    let (ok, good, text) = call(&n2, &dir, "redis-down");
    assert!(ok && good == 1, "a call failed while Redis was away: {text}");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed()));
    // …and when it is back, node 1 writes carol again and node 2 sees her from Redis.
    server = redis(redis_port);
    for n in [&n1, &n2] {
        assert!(wait_log(n, "Redis is back", Duration::from_secs(10)), "{}", n.log_text());
        assert_eq!(n.metric("pinhole_cluster_reconciles_total"), Some(1.0));
    }
    assert!(n2.wait_metric("pinhole_cluster_remote_bindings", 1.0, Duration::from_secs(5)));
    let (ok, good, text) = call(&n2, &dir, "reconciled");
    assert!(ok && good == 1, "{text}");
    let (ok, good, _, text) = long.join().expect("the long call's thread");
    assert!(ok && good == 1, "the call in progress did not survive Redis's absence: {text}");
    drop(callee);
    let _ = server.kill();
    let _ = server.wait();
}
