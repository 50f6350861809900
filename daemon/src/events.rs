//! `metroblk events`: the node's state, then one line per change, until interrupted (like
//! `drbdsetup events2 --now`), and the `on_event` hook.
//!
//! How: the command polls the node's control socket for `status` every [`POLL`] and compares
//! what it got with what it knew ([`Tracker::update`], pure, tested on every kind). A push
//! channel would need every control-plane thread (lifecycle, sync link, witness client) to
//! publish its changes; polling reads what `status` already reports and changes nothing in
//! the node, at the price of a state that lasts less than [`POLL`] being missed (a resync of
//! a few regions can go from `sync-source` back to `in-sync` unseen: its counters still
//! move). A node that stops answering is an event (`node reachable -> unreachable`); when it
//! answers again, what changed meanwhile is reported against what was known.
//!
//! Each volume is a set of facts, each a short string: `serving` (or why not: opening,
//! changing role, failed, stopping), `role`, `disk`, `link`, `sync`, `fence` (none, fenced,
//! deposed), `epoch`, `alone`, `alert` (the out-of-sync alert), `resync` (progress in
//! [`RESYNC_STEP_PERCENT`] steps while one runs, `-` otherwise), `verify` (the last online
//! verify's result) and `witness`. A fact a snapshot does not state (a volume not serving has
//! no role) keeps its last known value, so a role change through `changing role` is one
//! `role secondary -> primary` event.
//!
//! The hook (`on_event` in `[node]`): `sh -c COMMAND` per change, one at a time on a thread of
//! its own, with the event in its environment (`METROBLK_EVENT`, `METROBLK_VOLUME`,
//! `METROBLK_OLD`, `METROBLK_NEW`, `METROBLK_NODE`, `METROBLK_TIME`, `METROBLK_EVENT_JSON`),
//! its output on stderr, killed (its whole process group) after [`HOOK_MAX`]. At most
//! [`HOOK_QUEUE_MAX`] events wait for it; beyond that they are dropped with a warning, so a
//! slow hook never holds up the stream.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Keys, NodeConfig};
use crate::control::{NodeStatus, VolumeStatus};
use crate::resync::SyncState;

/// How often the control socket is asked.
pub const POLL: Duration = Duration::from_millis(250);
/// Resync progress is reported in steps of this many percent.
pub const RESYNC_STEP_PERCENT: f64 = 10.0;
/// One run of the hook may take this long; then it is killed.
pub const HOOK_MAX: Duration = Duration::from_secs(10);
/// Events waiting for the hook; more are dropped.
pub const HOOK_QUEUE_MAX: usize = 64;

/// The pseudo-volume of node-wide events (`node reachable -> unreachable`).
pub const NODE: &str = "-";

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub volume: String,
    /// `exists` (the state at start, or a volume that appeared), `gone`, or the fact that
    /// changed (`role`, `link`, ...; `node` for reachability).
    pub kind: String,
    pub old: Option<String>,
    /// For `exists`: every fact, `kind=value` separated by spaces.
    pub new: String,
}

type Facts = BTreeMap<&'static str, String>;

/// The facts in the order a line lists them and changes of one poll are reported.
pub const FACTS: [&str; 12] =
    ["serving", "role", "epoch", "fence", "disk", "link", "sync", "resync", "alone", "alert", "verify", "witness"];

/// The facts of a serving volume.
pub fn facts(v: &VolumeStatus) -> Facts {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let resync = match (v.sync_state, v.resync_percent) {
        (SyncState::SyncSource, Some(p)) => {
            format!("{:.0}%", (p / RESYNC_STEP_PERCENT).floor() * RESYNC_STEP_PERCENT)
        }
        (SyncState::SyncTarget, _) => "receiving".to_string(),
        _ => "-".to_string(),
    };
    let verify = match &v.verify {
        None => "-".to_string(),
        Some(i) if i.failed => format!("failed after {} regions", i.regions_checked),
        Some(i) if i.done => format!("{} regions checked, {} differ", i.regions_checked, i.regions_differing),
        Some(_) => "running".to_string(),
    };
    let fence = if v.deposed {
        "deposed"
    } else if v.fenced {
        "fenced"
    } else {
        "none"
    };
    let witness = match (&v.witness_address, v.witness_connected) {
        (None, _) => "-",
        (Some(_), true) => "connected",
        (Some(_), false) => "unreachable",
    };
    Facts::from([
        ("serving", "serving".to_string()),
        ("role", v.role.to_string()),
        ("disk", v.disk_state.clone()),
        ("link", v.link_state.to_string()),
        ("sync", v.sync_state.to_string()),
        ("fence", fence.to_string()),
        ("epoch", v.epoch.to_string()),
        ("alone", yes_no(v.alone)),
        ("alert", if v.out_of_sync_alert { "raised" } else { "clear" }.to_string()),
        ("resync", resync),
        ("verify", verify),
        ("witness", witness.to_string()),
    ])
}

/// What events know of a node: the last value of every fact of every volume.
#[derive(Debug, Default)]
pub struct Tracker {
    known: BTreeMap<String, Facts>,
    reachable: Option<bool>,
}

impl Tracker {
    /// The events between what was known and `now` (`Err`: the node did not answer, why).
    /// The first call reports every volume as `exists`.
    pub fn update(&mut self, now: Result<&NodeStatus, &str>) -> Vec<Event> {
        let mut out = Vec::new();
        let s = match now {
            Err(why) => {
                if self.reachable != Some(false) {
                    out.push(Event {
                        volume: NODE.into(),
                        kind: "node".into(),
                        old: self.reachable.map(|_| "reachable".to_string()),
                        new: format!("unreachable ({why})"),
                    });
                }
                self.reachable = Some(false);
                return out;
            }
            Ok(s) => s,
        };
        if self.reachable == Some(false) {
            out.push(Event {
                volume: NODE.into(),
                kind: "node".into(),
                old: Some("unreachable".into()),
                new: "reachable".into(),
            });
        }
        self.reachable = Some(true);
        let mut seen: BTreeMap<String, Facts> = BTreeMap::new();
        for v in &s.volumes {
            seen.insert(v.name.clone(), facts(v));
        }
        for n in &s.not_serving {
            let state = match &n.error {
                Some(e) => format!("{}: {e}", n.state),
                None => n.state.clone(),
            };
            seen.insert(n.name.clone(), Facts::from([("serving", state)]));
        }
        for (name, now) in seen.iter() {
            match self.known.get_mut(name) {
                None => {
                    let all: Vec<String> =
                        FACTS.iter().filter_map(|k| now.get(k).map(|v| format!("{k}={v}"))).collect();
                    out.push(Event { volume: name.clone(), kind: "exists".into(), old: None, new: all.join(" ") });
                    self.known.insert(name.clone(), now.clone());
                }
                Some(known) => {
                    // `serving` first: a role change reads "serving ... -> serving", then the role.
                    for k in FACTS {
                        let Some(new) = now.get(k) else { continue };
                        match known.get(k) {
                            Some(old) if old == new => {}
                            old => out.push(Event {
                                volume: name.clone(),
                                kind: k.to_string(),
                                old: old.cloned(),
                                new: new.clone(),
                            }),
                        }
                        known.insert(k, new.clone());
                    }
                }
            }
        }
        let gone: Vec<String> = self.known.keys().filter(|k| !seen.contains_key(*k)).cloned().collect();
        for name in gone {
            self.known.remove(&name);
            out.push(Event { volume: name, kind: "gone".into(), old: None, new: "-".into() });
        }
        out
    }
}

/// `t` as RFC 3339 UTC with milliseconds.
pub fn utc(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The event as a line of text.
pub fn text(node: &str, time: &str, e: &Event) -> String {
    match &e.old {
        Some(old) => format!("{time} {node} {} {} {old} -> {}", e.volume, e.kind, e.new),
        None => format!("{time} {node} {} {} {}", e.volume, e.kind, e.new),
    }
}

/// The event as one JSON object.
pub fn json(node: &str, time: &str, e: &Event) -> serde_json::Value {
    serde_json::json!({
        "time": time, "node": node, "volume": e.volume, "event": e.kind, "old": e.old, "new": e.new,
    })
}

/// Runs the hook for each event it is sent, one at a time.
struct Hook {
    queue: std::sync::mpsc::SyncSender<Vec<(String, String)>>,
}

impl Hook {
    fn start(command: String) -> Result<Hook, String> {
        let (queue, rx) = std::sync::mpsc::sync_channel::<Vec<(String, String)>>(HOOK_QUEUE_MAX);
        std::thread::Builder::new()
            .name("on_event".into())
            .spawn(move || {
                for env in rx {
                    run_hook(&command, &env, HOOK_MAX);
                }
            })
            .map_err(|e| format!("cannot start the on_event thread: {e}"))?;
        Ok(Hook { queue })
    }

    fn send(&self, env: Vec<(String, String)>) {
        if self.queue.try_send(env).is_err() {
            eprintln!("metroblk events: on_event is {HOOK_QUEUE_MAX} events behind; this event is not passed to it");
        }
    }
}

/// Runs `sh -c command` with `env`, killing its process group after `max`.
fn run_hook(command: &str, env: &[(String, String)], max: Duration) {
    use std::os::unix::process::CommandExt;
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::io::stderr())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("metroblk events: on_event: cannot run sh: {e}");
            return;
        }
    };
    let deadline = Instant::now() + max;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return,
            Ok(Some(st)) => {
                eprintln!("metroblk events: on_event exited with {st}");
                return;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                // SAFETY: kill(2) on the process group the child leads (process_group(0)).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                eprintln!("metroblk events: on_event ran longer than {max:?} and was killed");
                return;
            }
        }
    }
}

/// `metroblk events --config FILE [--json]`: until interrupted, or until stdout is closed.
pub fn run(config: &Path, as_json: bool) -> Result<(), String> {
    let cfg = NodeConfig::load_with(config, Keys::Skip).map_err(|e| e.to_string())?;
    let hook = cfg.on_event.clone().map(Hook::start).transpose()?;
    let mut tracker = Tracker::default();
    let mut out = std::io::stdout().lock();
    loop {
        let status = crate::control::query_status(&cfg.control_socket);
        let time = utc(SystemTime::now());
        for e in tracker.update(status.as_ref().map_err(String::as_str)) {
            let line = if as_json { json(&cfg.name, &time, &e).to_string() } else { text(&cfg.name, &time, &e) };
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                return Ok(()); // the reader went away
            }
            if let Some(h) = hook.as_ref().filter(|_| e.kind != "exists") {
                h.send(vec![
                    ("METROBLK_NODE".into(), cfg.name.clone()),
                    ("METROBLK_VOLUME".into(), e.volume.clone()),
                    ("METROBLK_EVENT".into(), e.kind.clone()),
                    ("METROBLK_OLD".into(), e.old.clone().unwrap_or_default()),
                    ("METROBLK_NEW".into(), e.new.clone()),
                    ("METROBLK_TIME".into(), time.clone()),
                    ("METROBLK_EVENT_JSON".into(), json(&cfg.name, &time, &e).to_string()),
                ]);
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests;
