use super::*;
use crate::config::Role;
use crate::control::NotServing;
use crate::resync::VerifyInfo;
use crate::volume::stats::LinkState;

fn volume(name: &str) -> VolumeStatus {
    VolumeStatus {
        name: name.into(),
        group: name.into(),
        uuid: String::new(),
        size: 1 << 20,
        role: Role::Secondary,
        disk_state: "up-to-date".into(),
        disk_error: None,
        link_state: LinkState::Connected,
        epoch: 1,
        peer: "alpha".into(),
        peer_address: "127.0.0.1:1".into(),
        requests_in_flight: 0,
        requests_held: 0,
        local_write_bytes: 0,
        local_write_requests: 0,
        peer_write_bytes: 0,
        peer_write_requests: 0,
        read_bytes: 0,
        read_requests: 0,
        flushes: 0,
        reconnects: 0,
        conflict_waits: 0,
        link_rtt_us: None,
        last_link_error: None,
        ublk_device: None,
        write_path: None,
        generation: String::new(),
        dirty_regions: 0,
        out_of_sync_bytes: 0,
        alone: false,
        sync_state: SyncState::InSync,
        resync_pending: false,
        sync_message: None,
        resync_percent: None,
        resync_bytes_left: None,
        resync_rate_bps: None,
        resync_eta_s: None,
        resynced_bytes: 0,
        resynced_zero_bytes: 0,
        resynced_regions: 0,
        metadata_writes: 0,
        intent_waits: 0,
        completed_alone: 0,
        verify: None,
        witness_address: Some("10.0.0.3:9095".into()),
        witness_connected: true,
        witness_message: None,
        lease_left_ms: None,
        fenced: false,
        deposed: false,
        out_of_sync_alert: false,
        peer_missing_s: 0,
    }
}

fn node(volumes: Vec<VolumeStatus>) -> NodeStatus {
    NodeStatus { node: "beta".into(), volumes, not_serving: Vec::new() }
}

fn ev(volume: &str, kind: &str, old: Option<&str>, new: &str) -> Event {
    Event { volume: volume.into(), kind: kind.into(), old: old.map(String::from), new: new.into() }
}

/// A tracker that has seen `s` (its `exists` events taken).
fn tracking(s: &NodeStatus) -> Tracker {
    let mut t = Tracker::default();
    let first = t.update(Ok(s));
    assert_eq!(first.len(), s.volumes.len() + s.not_serving.len());
    assert!(first.iter().all(|e| e.kind == "exists"));
    t
}

#[test]
fn the_first_state_is_one_exists_line_per_volume_with_every_fact() {
    let mut t = Tracker::default();
    let mut s = node(vec![volume("v0"), volume("v1")]);
    s.not_serving.push(NotServing { name: "v2".into(), state: "failed".into(), error: Some("no disk".into()) });
    let e = t.update(Ok(&s));
    assert_eq!(e.len(), 3);
    assert_eq!(
        e[0].new,
        "serving=serving role=secondary epoch=1 fence=none disk=up-to-date link=connected sync=in-sync resync=- \
         alone=no alert=clear verify=- witness=connected"
    );
    assert_eq!(e[2], ev("v2", "exists", None, "serving=failed: no disk"));
    assert!(t.update(Ok(&s)).is_empty(), "nothing changed, nothing reported");
}

/// Every fact, changed alone, is one event naming it with its old and new value.
#[test]
fn each_fact_changed_alone_is_one_event() {
    type Change = (&'static str, fn(&mut VolumeStatus), &'static str, &'static str);
    let changes: [Change; 16] = [
        ("role", |v| v.role = Role::Primary, "secondary", "primary"),
        ("disk", |v| v.disk_state = "outdated".into(), "up-to-date", "outdated"),
        ("link", |v| v.link_state = LinkState::Connecting, "connected", "connecting"),
        ("sync", |v| v.sync_state = SyncState::SplitBrain, "in-sync", "split-brain"),
        ("fence", |v| v.fenced = true, "none", "fenced"),
        ("fence", |v| v.deposed = true, "none", "deposed"),
        ("epoch", |v| v.epoch = 2, "1", "2"),
        ("alone", |v| v.alone = true, "no", "yes"),
        ("alert", |v| v.out_of_sync_alert = true, "clear", "raised"),
        ("resync", |v| v.resync_percent = Some(0.0), "-", "-"),
        ("verify", |v| v.verify = Some(VerifyInfo::default()), "-", "running"),
        (
            "verify",
            |v| {
                v.verify =
                    Some(VerifyInfo { regions_checked: 8, regions_differing: 2, done: true, ..Default::default() })
            },
            "-",
            "8 regions checked, 2 differ",
        ),
        (
            "verify",
            |v| v.verify = Some(VerifyInfo { regions_checked: 3, failed: true, ..Default::default() }),
            "-",
            "failed after 3 regions",
        ),
        ("witness", |v| v.witness_connected = false, "connected", "unreachable"),
        ("witness", |v| v.witness_address = None, "connected", "-"),
        // Counters are not facts: they change all the time.
        ("", |v| v.local_write_requests += 1, "", ""),
    ];
    for (kind, change, old, new) in changes {
        let before = node(vec![volume("v0")]);
        let mut t = tracking(&before);
        let mut after = before.clone();
        change(&mut after.volumes[0]);
        let e = t.update(Ok(&after));
        if old == new {
            assert!(e.is_empty(), "{kind}: {e:?}");
            continue;
        }
        assert_eq!(e, vec![ev("v0", kind, Some(old), new)], "{kind}");
        assert!(t.update(Ok(&after)).is_empty(), "{kind} reported twice");
        assert_eq!(t.update(Ok(&before)), vec![ev("v0", kind, Some(new), old)], "{kind} back");
    }
}

#[test]
fn a_resync_is_reported_in_steps_from_start_to_end() {
    let mut s = node(vec![volume("v0")]);
    s.volumes[0].role = Role::Primary;
    let mut t = tracking(&s);
    s.volumes[0].sync_state = SyncState::SyncSource;
    let mut seen = Vec::new();
    for p in [0.0, 3.0, 9.9, 10.0, 15.0, 55.5, 99.9, 100.0] {
        s.volumes[0].resync_percent = Some(p);
        seen.extend(t.update(Ok(&s)));
    }
    s.volumes[0].sync_state = SyncState::InSync;
    s.volumes[0].resync_percent = None;
    seen.extend(t.update(Ok(&s)));
    let lines: Vec<String> = seen.iter().map(|e| text("n", "T", e)).collect();
    assert_eq!(
        lines,
        [
            "T n v0 sync in-sync -> sync-source",
            "T n v0 resync - -> 0%",
            "T n v0 resync 0% -> 10%",
            "T n v0 resync 10% -> 50%",
            "T n v0 resync 50% -> 90%",
            "T n v0 resync 90% -> 100%",
            "T n v0 sync sync-source -> in-sync",
            "T n v0 resync 100% -> -",
        ]
    );
    // The target does not know how far it is: it is receiving.
    s.volumes[0].sync_state = SyncState::SyncTarget;
    s.volumes[0].resync_percent = Some(0.0);
    let e = t.update(Ok(&s));
    assert!(e.contains(&ev("v0", "resync", Some("-"), "receiving")), "{e:?}");
}

#[test]
fn a_role_change_through_not_serving_reports_serving_first_then_the_role() {
    let s = node(vec![volume("v0")]);
    let mut t = tracking(&s);
    let mut changing = node(vec![]);
    changing.not_serving.push(NotServing {
        name: "v0".into(),
        state: "changing role from secondary to primary".into(),
        error: None,
    });
    assert_eq!(
        t.update(Ok(&changing)),
        vec![ev("v0", "serving", Some("serving"), "changing role from secondary to primary")]
    );
    let mut promoted = node(vec![volume("v0")]);
    promoted.volumes[0].role = Role::Primary;
    promoted.volumes[0].epoch = 2;
    assert_eq!(
        t.update(Ok(&promoted)),
        vec![
            ev("v0", "serving", Some("changing role from secondary to primary"), "serving"),
            ev("v0", "role", Some("secondary"), "primary"),
            ev("v0", "epoch", Some("1"), "2"),
        ]
    );
}

#[test]
fn an_unreachable_node_is_one_event_and_what_changed_meanwhile_is_reported_after() {
    let mut t = Tracker::default();
    assert_eq!(t.update(Err("connection refused")), vec![ev(NODE, "node", None, "unreachable (connection refused)")]);
    let s = node(vec![volume("v0")]);
    let e = t.update(Ok(&s));
    assert_eq!(e[0], ev(NODE, "node", Some("unreachable"), "reachable"));
    assert_eq!(e[1].kind, "exists");
    assert_eq!(t.update(Err("gone")), vec![ev(NODE, "node", Some("reachable"), "unreachable (gone)")]);
    assert!(t.update(Err("still gone")).is_empty());
    let mut after = s.clone();
    after.volumes[0].link_state = LinkState::Connecting;
    assert_eq!(
        t.update(Ok(&after)),
        vec![ev(NODE, "node", Some("unreachable"), "reachable"), ev("v0", "link", Some("connected"), "connecting")]
    );
}

#[test]
fn volumes_that_appear_or_go_are_reported() {
    let s = node(vec![volume("v0")]);
    let mut t = tracking(&s);
    let both = node(vec![volume("v0"), volume("v1")]);
    let e = t.update(Ok(&both));
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].volume.as_str(), e[0].kind.as_str()), ("v1", "exists"));
    assert_eq!(t.update(Ok(&s)), vec![ev("v1", "gone", None, "-")]);
}

#[test]
fn lines_and_json_say_the_same() {
    let e = ev("v0", "link", Some("connected"), "connecting");
    assert_eq!(text("beta", "T", &e), "T beta v0 link connected -> connecting");
    let j = json("beta", "T", &e);
    assert_eq!(j["event"], "link");
    assert_eq!(j["old"], "connected");
    assert_eq!(j["new"], "connecting");
    assert_eq!(j["volume"], "v0");
    assert_eq!(j["node"], "beta");
    let e = ev("v0", "exists", None, "role=primary");
    assert_eq!(text("beta", "T", &e), "T beta v0 exists role=primary");
    assert!(json("beta", "T", &e)["old"].is_null());
}

#[test]
fn times_are_rfc3339_utc() {
    let at = |s: u64, ms: u64| utc(SystemTime::UNIX_EPOCH + Duration::from_millis(s * 1000 + ms));
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
    assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
    assert_eq!(at(1_796_601_599, 999), "2026-12-06T23:59:59.999Z");
    assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
}

#[test]
fn a_hook_sees_the_event_and_one_that_hangs_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let env = vec![("METROBLK_EVENT".to_string(), "link".to_string())];
    run_hook(&format!("echo \"$METROBLK_EVENT\" > {}", out.display()), &env, HOOK_MAX);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "link\n");
    let late = dir.path().join("late");
    let max = Duration::from_millis(300);
    let t = Instant::now();
    run_hook(&format!("(sleep 1; touch {}) & sleep 30", late.display()), &env, max);
    assert!(t.elapsed() >= max && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Its whole process group went: the background child never writes.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!late.exists(), "the hook's child outlived the kill");
}
