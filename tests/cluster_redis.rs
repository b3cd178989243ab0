//! Two pinhole nodes sharing registrations in a real redis-server on loopback: a phone
//! (sipp) registers through node 1 and is called through node 2; node 1 killed with -9 and
//! restarted still has it; Redis gone for a while drops nothing and is reconciled after.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A redis-server of our own on `port`, keeping nothing on disk.
fn redis(port: u16) -> Bg {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        // Should it ever write a file (a replica's sync), not into the crate.
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (package redis-server) must be installed");
    assert!(wait_listening(port, Duration::from_secs(5)), "redis-server did not start");
    Bg(Some(child))
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
    let server = redis(redis_port);
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
    drop(server);
    let down_at = Instant::now();
    for n in [&n1, &n2] {
        assert!(wait_log(n, "Redis unreachable", Duration::from_secs(10)), "{}", n.log_text());
    }
    let (ok, good, text) = call(&n2, &dir, "redis-down");
    assert!(ok && good == 1, "a call failed while Redis was away: {text}");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed()));
    // …and when it is back, node 1 writes carol again and node 2 sees her from Redis.
    let server = redis(redis_port);
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
    drop(server);
}

/// A CA and a certificate it signed for 127.0.0.1 (rustls wants a SAN and will not take a
/// CA as the server's own certificate), made with Debian's openssl.
fn ca_and_leaf(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let [ca, ca_key, leaf, key, csr, ext] =
        ["ca.pem", "ca.key", "leaf.pem", "leaf.key", "leaf.csr", "leaf.ext"].map(|f| dir.join(f));
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").expect("ext");
    let openssl = |args: &[&str]| {
        let st = Command::new("openssl").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
        assert!(st.is_ok_and(|s| s.success()), "openssl {args:?}");
    };
    let p = |p: &std::path::PathBuf| p.display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=pinhole test CA",
        "-keyout",
        &p(&ca_key),
        "-out",
        &p(&ca),
    ]);
    openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", &p(&key), "-out", &p(&csr)]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&leaf),
    ]);
    (ca, leaf, key)
}

/// Waits until a counter reaches `min`.
fn wait_at_least(ph: &Pinhole, name: &str, min: f64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ph.metric(name).is_some_and(|v| v >= min) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn over_tls_with_an_acl_user_nodes_share_a_phone_and_what_a_stranger_plants_in_redis_costs_nothing() {
    let dir = TempDir::new("cluster-tls");
    let (ca, leaf, key) = ca_and_leaf(dir.path());
    let port = free_port();
    let p = |p: &std::path::PathBuf| p.display().to_string();
    let server = Bg(Some(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--tls-cert-file", &p(&leaf), "--tls-key-file", &p(&key), "--tls-ca-cert-file", &p(&ca)])
            // An ACL user for the nodes (keys under pinhole: only); the default user is off.
            .args(["--tls-auth-clients", "no", "--user", "default", "off"])
            .args(["--user", "pinhole", "on", ">s3cret", "~pinhole:*", "+@all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (package redis-server) must be installed"),
    ));
    assert!(wait_listening(port, Duration::from_secs(5)), "redis-server with TLS did not start");
    let node = |name: &str, url: &str| {
        let extra = format!("[cluster]\nredis = \"{url}\"\ntls_ca = \"{}\"\nnode = \"{name}\"\n", ca.display());
        Pinhole::start(&dir, PinholeOptions { extra, ..Default::default() })
    };
    let url = format!("rediss://pinhole:s3cret@127.0.0.1:{port}");
    let n1 = node("edge-1", &url);
    let n2 = node("edge-2", &url);
    let callee = sipp_callee(&n1.sip(), "carol", free_port(), "u1", "uas.xml", 60_000, &dir.path().join("uas.err"));
    assert!(
        n2.wait_metric("pinhole_cluster_remote_bindings", 1.0, Duration::from_secs(10)),
        "node 2 never saw carol over TLS\n{}\n{}",
        n1.log_text(),
        n2.log_text()
    );
    assert!(!n1.log_text().contains("has no password"), "a password was given");
    let (ok, good, text) = call(&n2, &dir, "tls");
    assert!(ok && good == 1, "{text}\n{}", n2.log_text());
    // The wrong password is refused by Redis: that node never sees anyone.
    let n3 = node("edge-3", &format!("rediss://pinhole:wrong@127.0.0.1:{port}"));
    assert!(wait_log(&n3, "Redis unreachable", Duration::from_secs(10)), "{}", n3.log_text());

    // Someone with the password plants a 64 MB value and 10 000 bindings for carol.
    let cli = |args: &[&str]| {
        let mut c = Command::new("redis-cli");
        c.args(["-p", &port.to_string(), "--tls", "--cacert", &p(&ca), "--user", "pinhole", "--pass", "s3cret"])
            .args(["--no-auth-warning"])
            .args(args);
        c
    };
    let pipe = |input: &[u8]| {
        use std::io::Write;
        let mut c = cli(&["--pipe"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli");
        c.stdin.take().expect("stdin").write_all(input).expect("write");
        assert!(c.wait().is_ok_and(|s| s.success()), "redis-cli --pipe");
    };
    let resp = |args: &[&[u8]]| {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    };
    let before = rss_kib(n2.pid().expect("pid"));
    let output = |args: &[&str]| String::from_utf8(cli(args).output().expect("redis-cli").stdout).unwrap_or_default();
    let key = output(&["--scan", "--pattern", "pinhole:aor:*"]).lines().next().expect("carol's key").to_owned();
    let template = output(&["HGET", &key, "edge-1"]).trim().to_owned();
    assert!(template.contains("carol"), "{template}");
    let aor = key.trim_start_matches("pinhole:aor:").to_owned();
    let announce = |node: &str, aor: &str| {
        resp(&[b"XADD", b"pinhole:regchanges", b"*", b"node", node.as_bytes(), b"aor", aor.as_bytes()])
    };
    // A 64 MB value as another node's field of carol, announced.
    let mut planted = resp(&[b"HSET", key.as_bytes(), b"giant", &vec![b'{'; 64 << 20]]);
    planted.extend(announce("giant", &aor));
    // Twelve more "nodes" each with a binding of carol: more than an AOR may hold.
    for i in 0..12 {
        let value = template.replacen("sip:carol@", &format!("sip:carol{i}@"), 1);
        planted.extend(resp(&[b"HSET", key.as_bytes(), format!("evil{i}").as_bytes(), value.as_bytes()]));
        planted.extend(announce(&format!("evil{i}"), &aor));
    }
    // And an AOR with 10 000 fields.
    for i in 0..10_000 {
        planted.extend(resp(&[b"HSET", b"pinhole:aor:dave@x", format!("n{i}").as_bytes(), template.as_bytes()]));
    }
    planted.extend(announce("n1", "dave@x"));
    pipe(&planted);
    for counter in ["pinhole_cluster_oversized_total", "pinhole_cluster_bindings_refused_total"] {
        assert!(
            wait_at_least(&n2, counter, 1.0, Duration::from_secs(10)),
            "{counter}\n{}",
            n2.metrics().unwrap_or_default()
        );
    }
    let after = rss_kib(n2.pid().expect("pid"));
    assert!(after < before + 32 * 1024, "node 2 grew from {before} to {after} KiB reading a 64 MB value");
    // carol is still called, through a bounded fork.
    let (ok, good, text) = call(&n2, &dir, "planted");
    assert!(ok && good == 1, "{text}\n{}", n2.log_text());
    drop(callee);
    drop(server);
}

/// Counters of a Redis server (`INFO stats`), by name.
fn redis_stat(port: u16, name: &str) -> u64 {
    let out = Command::new("redis-cli").args(["-p", &port.to_string(), "INFO", "stats"]).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// A phone (a bare UDP socket) registering `user` through `node` and waiting for its 200.
fn register_raw(node: &Pinhole, user: &str) -> std::net::UdpSocket {
    let phone = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    phone.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let at = phone.local_addr().expect("addr");
    let register = format!(
        "REGISTER sip:pinhole.test SIP/2.0\r\nVia: SIP/2.0/UDP {at};branch=z9hG4bKr{user};rport\r\nMax-Forwards: 70\r\nTo: <sip:{user}@pinhole.test>\r\nFrom: <sip:{user}@pinhole.test>;tag=r{user}\r\nCall-ID: reg-{user}\r\nCSeq: 1 REGISTER\r\nContact: <sip:{user}@{at}>\r\nContent-Length: 0\r\n\r\n"
    );
    phone.send_to(register.as_bytes(), node.sip()).expect("send");
    let mut buf = [0u8; 4096];
    let ok = wait_until(Duration::from_secs(3), || {
        phone.recv(&mut buf).is_ok_and(|n| String::from_utf8_lossy(&buf[..n]).starts_with("SIP/2.0 200"))
    });
    assert!(ok, "{user} was not registered\n{}", node.log_text());
    phone
}

/// `caller` calls `user` through `node`: whether `phone` rings within 2 s.
fn rings(caller: &std::net::UdpSocket, node: &Pinhole, user: &str, phone: &std::net::UdpSocket) -> bool {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let user_call = format!("{user}{n}");
    let c = caller.local_addr().expect("addr");
    let invite = format!(
        "INVITE sip:{user}@pinhole.test SIP/2.0\r\nVia: SIP/2.0/UDP {c};branch=z9hG4bKc{user_call};rport\r\nMax-Forwards: 70\r\nTo: <sip:{user}@pinhole.test>\r\nFrom: <sip:caller@pinhole.test>;tag=c{user_call}\r\nCall-ID: call-{user_call}\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@{c}>\r\nContent-Length: 0\r\n\r\n"
    );
    caller.send_to(invite.as_bytes(), node.sip()).expect("send");
    let mut buf = [0u8; 4096];
    wait_until(Duration::from_secs(2), || {
        phone.recv(&mut buf).is_ok_and(|n| String::from_utf8_lossy(&buf[..n]).starts_with("INVITE "))
    })
}

#[test]
fn a_phone_is_reachable_through_every_node_as_soon_as_its_200_ok_has_left_and_idle_nodes_cost_redis_nothing() {
    let dir = TempDir::new("cluster-now");
    let redis_port = free_port();
    let server = redis(redis_port);
    let n1 = node(&dir, "edge-1", redis_port);
    let n2 = node(&dir, "edge-2", redis_port);
    for n in [&n1, &n2] {
        assert!(n.wait_metric("pinhole_cluster_redis_up", 1.0, Duration::from_secs(10)), "{}", n.log_text());
    }
    let caller = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut waits = Vec::new();
    for i in 0..20 {
        let user = format!("now{i}");
        let phone = register_raw(&n1, &user);
        // At once, through node 2.
        let sent = Instant::now();
        assert!(
            rings(&caller, &n2, &user, &phone),
            "{user} was not called through node 2 right after registering\n{}",
            n2.log_text()
        );
        waits.push(sent.elapsed());
    }
    waits.sort();
    eprintln!("registration to ringing through the other node: p50 {:?}, max {:?}", waits[10], waits[19]);
    let mut caller_buf = [0u8; 4096];
    caller.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    while let Ok(n) = caller.recv(&mut caller_buf) {
        let text = String::from_utf8_lossy(&caller_buf[..n]);
        assert!(!text.starts_with("SIP/2.0 480") && !text.starts_with("SIP/2.0 404"), "a caller was refused: {text}");
    }
    // Node 2 learnt every phone by the changes announced (or asked for them): no full reads.
    let applied = n2.metric("pinhole_cluster_changes_applied_total").unwrap_or(0.0)
        + n2.metric("pinhole_cluster_lookups_total{result=\"found\"}").unwrap_or(0.0);
    assert!(applied >= 20.0, "{}", n2.metrics().unwrap_or_default());
    // Idle, with 20 phones registered: what do the two nodes ask of Redis in 3 s?
    std::thread::sleep(Duration::from_secs(1));
    let before = redis_stat(redis_port, "total_commands_processed");
    std::thread::sleep(Duration::from_secs(3));
    let idle = redis_stat(redis_port, "total_commands_processed") - before;
    eprintln!("Redis commands from two idle nodes in 3 s: {idle}");
    assert!(idle > 0, "the nodes are connected");
    let stats = Command::new("redis-cli").args(["-p", &redis_port.to_string(), "INFO", "commandstats"]).output();
    let stats = stats.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    assert!(
        idle <= 30,
        "{idle} commands in 3 s from two idle nodes: more than a ping and a blocked read each\n{stats}"
    );
    drop(server);
}

/// A sentinel of our own watching `master_port` as `pinhole`, quick to act.
fn sentinel(dir: &std::path::Path, port: u16, master_port: u16) -> Bg {
    let conf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!("port {port}\nbind 127.0.0.1\nsentinel monitor pinhole 127.0.0.1 {master_port} 2\nsentinel down-after-milliseconds pinhole 1000\nsentinel failover-timeout pinhole 5000\nsentinel parallel-syncs pinhole 1\n"),
    )
    .expect("sentinel config");
    let child = Command::new("redis-sentinel")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-sentinel (package redis-sentinel) must be installed");
    assert!(wait_listening(port, Duration::from_secs(5)), "redis-sentinel did not start");
    Bg(Some(child))
}

fn cli_text(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn when_sentinel_promotes_a_replica_the_nodes_follow_and_no_registration_is_lost() {
    let dir = TempDir::new("cluster-sentinel");
    let (p1, p2) = (free_port(), free_port());
    let mut primary = redis(p1);
    let _replica = Bg(Some(
        Command::new("redis-server")
            .args(["--port", &p2.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--replicaof", "127.0.0.1", &p1.to_string()])
            // A replica keeps the primary's data in a file: in the test's own directory,
            // not the crate's.
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server"),
    ));
    assert!(wait_until(Duration::from_secs(10), || cli_text(p2, &["INFO", "replication"])
        .contains("master_link_status:up")));
    let ports = [free_port(), free_port(), free_port()];
    let _sentinels: Vec<Bg> = ports.iter().map(|p| sentinel(dir.path(), *p, p1)).collect();
    // The sentinels know the replica and each other before anything fails.
    let ready = wait_until(Duration::from_secs(20), || {
        cli_text(ports[0], &["SENTINEL", "REPLICAS", "pinhole"]).contains(&p2.to_string())
            && cli_text(ports[0], &["SENTINEL", "SENTINELS", "pinhole"]).matches("runid").count() >= 2
    });
    assert!(ready, "the sentinels never saw the replica and each other");
    let sentinels = ports.map(|p| format!("\"redis://127.0.0.1:{p}\"")).join(", ");
    let node = |name: &str| {
        let extra = format!("[cluster]\nredis = \"redis://localhost\"\nsentinels = [{sentinels}]\nmaster = \"pinhole\"\nnode = \"{name}\"\n");
        Pinhole::start(&dir, PinholeOptions { extra, ..Default::default() })
    };
    let (n1, n2) = (node("edge-1"), node("edge-2"));
    for n in [&n1, &n2] {
        assert!(n.wait_metric("pinhole_cluster_redis_up", 1.0, Duration::from_secs(10)), "{}", n.log_text());
    }
    let caller = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let before = register_raw(&n1, "before");
    assert!(rings(&caller, &n2, "before", &before), "{}", n2.log_text());

    // The primary dies; phones keep registering through node 1 meanwhile.
    if let Some(mut c) = primary.0.take() {
        let _ = c.kill(); // SIGKILL
        let _ = c.wait();
    }
    let killed = Instant::now();
    let during: Vec<(String, std::net::UdpSocket)> = (0..5)
        .map(|i| {
            let user = format!("during{i}");
            let phone = register_raw(&n1, &user);
            std::thread::sleep(Duration::from_millis(300));
            (user, phone)
        })
        .collect();
    let promoted = wait_until(Duration::from_secs(20), || {
        cli_text(ports[0], &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "pinhole"]).contains(&p2.to_string())
    });
    assert!(promoted, "the sentinels never promoted the replica");
    let promoted_after = killed.elapsed();
    for n in [&n1, &n2] {
        let back = wait_until(Duration::from_secs(5), || n.log_text().contains("Redis is back"));
        assert!(back, "a node did not follow the new master within 5 s\n{}", n.log_text());
    }
    let followed_after = killed.elapsed();
    eprintln!("primary killed: replica promoted after {promoted_after:?}, both nodes on it after {followed_after:?}");
    // Nothing registered is lost: every phone rings through the other node.
    assert!(rings(&caller, &n2, "before", &before), "a registration from before the failover was lost");
    for (user, phone) in &during {
        assert!(
            rings(&caller, &n2, user, phone),
            "{user}, registered during the failover, was lost\n{}",
            n2.log_text()
        );
    }
    assert!(
        cli_text(p2, &["HGETALL", "pinhole:aor:during4@pinhole.test"]).contains("edge-1"),
        "written to the new master"
    );
}

/// A TCP relay (socat) from `listen` to Redis on `to`: stopping it with SIGSTOP cuts whoever
/// talks through it off without a word, as a dropped network does.
fn tcp_relay(listen: u16, to: u16) -> Bg {
    use std::os::unix::process::CommandExt as _;
    let child = Command::new("socat")
        .arg(format!("TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("TCP:127.0.0.1:{to}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("socat (package socat) must be installed");
    assert!(wait_listening(listen, Duration::from_secs(5)), "socat did not start");
    Bg(Some(child))
}

/// Sends `sig` to every process of the group `leader` leads (socat forks one per connection).
fn signal_group(leader: &Bg, sig: &str) {
    let pid = leader.0.as_ref().map(|c| c.id()).expect("running");
    let st = Command::new("kill").args([&format!("-{sig}"), "--", &format!("-{pid}")]).status();
    assert!(st.is_ok_and(|s| s.success()), "kill -{sig}");
}

#[test]
fn a_node_cut_off_from_redis_serves_on_and_reconciles_and_a_dead_nodes_phones_come_back_through_another() {
    let dir = TempDir::new("cluster-cut");
    let redis_port = free_port();
    let _server = redis(redis_port);
    let via = free_port();
    let relay = tcp_relay(via, redis_port);
    let mut n1 = node(&dir, "edge-1", via);
    let n2 = node(&dir, "edge-2", redis_port);
    for n in [&n1, &n2] {
        assert!(n.wait_metric("pinhole_cluster_redis_up", 1.0, Duration::from_secs(10)), "{}", n.log_text());
    }
    let caller = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let early = register_raw(&n1, "early");
    assert!(rings(&caller, &n2, "early", &early));

    // Node 1's way to Redis goes silent for 30 s.
    signal_group(&relay, "STOP");
    let cut_at = Instant::now();
    assert!(n1.wait_metric("pinhole_cluster_redis_up", 0.0, Duration::from_secs(10)), "node 1 never noticed");
    assert!(n1.log_text().contains("Redis unreachable: serving from the local cache"));
    // It serves on from what it has, and both sides keep registering.
    let cut1 = register_raw(&n1, "cut1");
    let cut2 = register_raw(&n2, "cut2");
    assert!(rings(&caller, &n1, "early", &early), "node 1 stopped serving its own phone");
    assert!(rings(&caller, &n1, "cut1", &cut1));
    std::thread::sleep(Duration::from_secs(30).saturating_sub(cut_at.elapsed()));
    signal_group(&relay, "CONT");
    // Back: a log line and a metric, everything local written again, the store read again.
    assert!(wait_until(Duration::from_secs(15), || n1.log_text().contains("Redis is back")), "{}", n1.log_text());
    assert!(n1.wait_metric("pinhole_cluster_reconciles_total", 1.0, Duration::from_secs(5)));
    assert!(rings(&caller, &n2, "cut1", &cut1), "node 2 never learnt the phone registered on node 1 during the cut");
    assert!(rings(&caller, &n1, "cut2", &cut2), "node 1 never learnt the phone registered on node 2 during the cut");

    // Node 1 dies for good: node 2 still forwards; early's phone, registering again
    // through node 2, is reached there.
    n1.kill9();
    let early_again = register_raw(&n2, "early");
    assert!(rings(&caller, &n2, "early", &early_again), "{}", n2.log_text());
}

/// A Redis Cluster of three masters on loopback (no replicas), with a password; their
/// ports. Each server keeps its cluster file in `dir`.
fn redis_cluster(dir: &std::path::Path, password: &str) -> (Vec<Bg>, Vec<u16>) {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let servers = ports
        .iter()
        .map(|p| {
            let port = p.to_string();
            let conf = dir.join(format!("nodes-{p}.conf"));
            let child = Command::new("redis-server")
                .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(&conf)
                .args(["--requirepass", password, "--masterauth", password])
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (package redis-server) must be installed");
            assert!(wait_listening(*p, Duration::from_secs(5)), "redis-server {p} did not start");
            Bg(Some(child))
        })
        .collect();
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let created = Command::new("redis-cli")
        .args(["-a", password, "--no-auth-warning", "--cluster", "create"])
        .args(&nodes)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli");
    assert!(created.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&created.stdout));
    let ok = wait_until(Duration::from_secs(10), || {
        ports.iter().all(|p| {
            cli_text(*p, &["-a", password, "--no-auth-warning", "CLUSTER", "INFO"]).contains("cluster_state:ok")
        })
    });
    assert!(ok, "the Redis Cluster did not come up");
    (servers, ports)
}

#[test]
fn over_a_redis_cluster_every_aor_is_shared_whichever_master_holds_it_and_a_restarted_node_reads_them_all_back() {
    let dir = TempDir::new("redis-cluster");
    let password = "cluster-pw";
    let (servers, ports) = redis_cluster(dir.path(), password);
    // Each node is told of one master only: it learns the others and the slots.
    let node = |name: &str, seed: u16| {
        let extra = format!(
            "[cluster]\nredis = \"redis://:{password}@127.0.0.1:{seed}\"\ncluster_nodes = [\"redis://127.0.0.1:{seed}\"]\nnode = \"{name}\"\n"
        );
        Pinhole::start(&dir, PinholeOptions { extra, ..Default::default() })
    };
    let n1 = node("edge-1", ports[0]);
    let mut n2 = node("edge-2", ports[1]);
    for n in [&n1, &n2] {
        assert!(n.wait_metric("pinhole_cluster_redis_up", 1.0, Duration::from_secs(10)), "{}", n.log_text());
    }
    let phones: Vec<(String, std::net::UdpSocket)> = (0..30)
        .map(|i| {
            let user = format!("rc{i}");
            let phone = register_raw(&n1, &user);
            (user, phone)
        })
        .collect();
    // The AORs are spread over the masters (each command touched its own key's slot).
    let keys =
        |p: u16| -> u64 { cli_text(p, &["-a", password, "--no-auth-warning", "DBSIZE"]).trim().parse().unwrap_or(0) };
    assert!(
        wait_until(Duration::from_secs(5), || ports.iter().map(|p| keys(*p)).sum::<u64>() >= 31),
        "30 AORs and the stream are not all in the cluster"
    );
    for p in &ports {
        assert!(keys(*p) > 0, "master {p} holds no AOR: keys were not spread over the slots");
    }
    assert!(
        n2.wait_metric("pinhole_cluster_remote_bindings", 30.0, Duration::from_secs(10)),
        "node 2 did not learn every AOR from the changes\n{}",
        n2.metrics().unwrap_or_default()
    );
    let caller = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    for (user, phone) in phones.iter().step_by(7) {
        assert!(rings(&caller, &n2, user, phone), "{user} not reached through node 2\n{}", n2.log_text());
    }
    // Node 2 restarts empty: its full read scans every master and finds all 30.
    n2.kill9();
    n2.restart();
    assert!(
        n2.wait_metric("pinhole_cluster_remote_bindings", 30.0, Duration::from_secs(10)),
        "the restarted node did not read every master\n{}\n{}",
        n2.metrics().unwrap_or_default(),
        n2.log_text()
    );
    let (user, phone) = &phones[29];
    assert!(rings(&caller, &n2, user, phone), "{user} not reached through the restarted node 2");
    drop(servers);
}
