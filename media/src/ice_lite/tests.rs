//! Checks as a browser sends them (USERNAME, PRIORITY, ICE-CONTROLLING, USE-CANDIDATE,
//! MESSAGE-INTEGRITY, FINGERPRINT), built with stun-rs, and every way a stranger's fails.

use stun_rs::attributes::ice::UseCandidate;
use stun_rs::{DecoderContextBuilder, HMACKey, TransactionId};

use super::*;

const BROWSER: &str = "198.51.100.7:51000";
const STRANGER: &str = "203.0.113.66:4444";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn leg() -> IceLite {
    let mut n = 0u8;
    let mut ice = IceLite::new(Credentials::generate(|| {
        n = n.wrapping_add(7);
        n
    }));
    ice.set_remote_ufrag("brws");
    ice
}

/// A check from the browser: `user`, signed with `pwd`; `nominate` adds USE-CANDIDATE,
/// `controlled` claims the controlled role instead of the controlling one.
pub(crate) fn check(user: &str, pwd: &str, nominate: bool, controlled: bool, tid: u8) -> Vec<u8> {
    browser_check(user, pwd, nominate, controlled, [tid; 12]).expect("encodes")
}

#[test]
fn credentials_are_ice_chars_of_ice_length() {
    let c = leg().local().clone();
    assert_eq!((c.ufrag.len(), c.pwd.len()), (UFRAG_LEN, PWD_LEN));
    assert!(c.ufrag.bytes().chain(c.pwd.bytes()).all(|b| ICE_CHARS.contains(&b)));
}

#[test]
fn a_browsers_check_is_answered_signed_and_nominates_its_source_only_with_use_candidate() {
    let mut ice = leg();
    let c = ice.local().clone();
    let user = format!("{}:brws", c.ufrag);
    let Checked::Answer { bytes, nominated } = ice.handle(addr(BROWSER), &check(&user, &c.pwd, false, false, 1)) else {
        panic!("a good check is answered")
    };
    assert!(!nominated && ice.selected().is_none(), "a plain check selects nothing");
    // The answer: our transaction, the check's source, signed with our password.
    let ctx = DecoderContextBuilder::default()
        .with_key(HMACKey::new_short_term(&c.pwd).expect("key"))
        .with_validation()
        .build();
    let (msg, _) = MessageDecoderBuilder::default().with_context(ctx).build().decode(&bytes).expect("signed answer");
    assert_eq!(msg.class(), MessageClass::SuccessResponse);
    assert_eq!(*msg.transaction_id(), TransactionId::from([1; 12]));
    let Some(StunAttribute::XorMappedAddress(x)) = msg.get::<XorMappedAddress>() else { panic!("mapped address") };
    assert_eq!(*x.socket_address(), addr(BROWSER));
    assert!(msg.get::<Fingerprint>().is_some());

    let Checked::Answer { nominated, .. } = ice.handle(addr(BROWSER), &check(&user, &c.pwd, true, false, 2)) else {
        panic!("answered")
    };
    assert!(nominated);
    assert_eq!(ice.selected(), Some(addr(BROWSER)));
}

#[test]
fn a_stranger_gets_nothing_and_moves_nothing() {
    let mut ice = leg();
    let c = ice.local().clone();
    let user = format!("{}:brws", c.ufrag);
    assert!(matches!(ice.handle(addr(BROWSER), &check(&user, &c.pwd, true, false, 1)), Checked::Answer { .. }));
    let cases = [
        (check(&user, "a-guessed-password-xxxxx", true, false, 3), Refused::Integrity),
        (check(&format!("{}:other", c.ufrag), &c.pwd, true, false, 4), Refused::Username),
        (check("brws:brws", &c.pwd, true, false, 5), Refused::Username),
        (check(&user, &c.pwd, true, true, 6), Refused::RoleConflict),
        (b"\x00\x01\x00\x00garbage-garbage-".to_vec(), Refused::NotACheck),
        (b"RTP-looking bytes".to_vec(), Refused::NotACheck),
    ];
    for (wire, why) in cases {
        assert_eq!(ice.handle(addr(STRANGER), &wire), Checked::Refused(why));
    }
    // A check without FINGERPRINT is not an ICE check.
    let key = HMACKey::new_short_term(&c.pwd).expect("key");
    let bare = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from([9; 12]))
        .with_attribute(UserName::new(&user).expect("user"))
        .with_attribute(UseCandidate::default())
        .with_attribute(MessageIntegrity::new(key))
        .build();
    let bare = encode(&bare).expect("encodes");
    assert_eq!(ice.handle(addr(STRANGER), &bare), Checked::Refused(Refused::Integrity));
    assert_eq!(ice.selected(), Some(addr(BROWSER)), "the selected address stays");
}

#[test]
fn an_ice_restart_keeps_media_where_it_is_until_the_new_credentials_nominate() {
    let mut ice = leg();
    let old = ice.local().clone();
    let check_old = |nominate, tid| check(&format!("{}:brws", old.ufrag), &old.pwd, nominate, false, tid);
    assert!(matches!(ice.handle(addr(BROWSER), &check_old(true, 1)), Checked::Answer { nominated: true, .. }));
    // Both sides restart: new local credentials, the browser's new ufrag.
    let new = Credentials { ufrag: "NEWufrag".into(), pwd: "a-new-password-of-24-chs".into() };
    ice.restart(new.clone());
    ice.set_remote_ufrag("brw2");
    assert_eq!(ice.selected(), Some(addr(BROWSER)), "media stays until a new nomination");
    assert_eq!(
        ice.handle(addr(BROWSER), &check_old(true, 2)),
        Checked::Refused(Refused::Username),
        "old ufrags are gone"
    );
    let moved = addr("198.51.100.7:52000");
    let fresh = check("NEWufrag:brw2", &new.pwd, true, false, 3);
    assert!(matches!(ice.handle(moved, &fresh), Checked::Answer { nominated: true, .. }));
    assert_eq!(ice.selected(), Some(moved));
}

#[test]
fn before_the_peers_sdp_no_check_is_counted() {
    let mut ice = IceLite::new(Credentials { ufrag: "aaaaaaaa".into(), pwd: "bbbbbbbbbbbbbbbbbbbbbbbb".into() });
    let wire = check("aaaaaaaa:brws", "bbbbbbbbbbbbbbbbbbbbbbbb", true, false, 1);
    assert_eq!(ice.handle(addr(BROWSER), &wire), Checked::Refused(Refused::Username));
    assert_eq!(ice.selected(), None);
}
