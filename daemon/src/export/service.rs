//! The I/O around [`next_step`]: one thread per exported volume runs the steps towards the
//! goal its group's thread sets (serve with a device, or go down), and, while serving,
//! watches the volume's fence to withdraw ahead of it (see the rules in `mod.rs`).
//!
//! The steps run on the export's own thread because some of them wait for the kernel:
//! ending the sessions or removing a LUN waits for the commands in flight, and those can be
//! parked in a fenced volume until the group thread deletes the device. So the group thread
//! only sets goals, and waits for the export with a deadline where the order matters (at
//! shutdown, before it decides whether the device is still in use).
//!
//! State left by an earlier run: a file beside the metadata file (`<metadata_file>.export`)
//! exists from before the first part is added until the last is removed. A node starting
//! with it present tears down whatever of its export is still in configfs (and the address)
//! before anything else, whatever its role, and adds nothing until that is done; without it,
//! it touches nothing (another node in the same kernel, as
//! in the tests, may be serving that target).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::config::ExportConfig;
use super::configfs::{AddError, Plan};
use super::{identity, may_serve, next_step, FenceView, Goal, Part, Present, Step};
use crate::config::{RoleGroup, VolumeConfig};
use crate::lifecycle::Closing;
use crate::volume::stats::LinkState;
use crate::volume::VolumeShared;

/// How often a serving export looks at its volume's fence: a switchover waits for it.
pub const FENCE_POLL: Duration = Duration::from_millis(5);
/// The pause before a failed or busy step is tried again.
pub const RETRY_PAUSE: Duration = Duration::from_millis(100);

#[derive(Clone)]
enum Want {
    Down,
    Serve {
        device: PathBuf,
        volume: Weak<VolumeShared>,
    },
    /// Remove everything towards this goal, then end the thread.
    Exit(Goal),
}

struct Control {
    want: Mutex<Want>,
    changed: Condvar,
}

struct Export {
    volume: String,
    control: Arc<Control>,
    thread: std::thread::JoinHandle<()>,
}

/// The exports of one group's volumes (those with `[volume.export]`).
pub struct Exports {
    items: Vec<Export>,
}

impl Exports {
    /// Starts the export thread of every volume of the group that has one: each first
    /// removes what an earlier run of this node left behind, then waits for [`Self::serve`].
    pub fn open(group: &RoleGroup, node: &str) -> Result<Exports, String> {
        let mut items = Vec::new();
        for cfg in &group.volumes {
            let Some(export) = &cfg.export else { continue };
            let plan = Plan::new(export.clone(), node, &cfg.name, cfg.uuid, identity::node_index(cfg, node));
            plan.check_kernel().map_err(|e| format!("volume {}: {e}", cfg.name))?;
            let control = Arc::new(Control { want: Mutex::new(Want::Down), changed: Condvar::new() });
            let marker = marker_path(cfg);
            let lease = cfg.witness.as_ref().map_or(Duration::ZERO, |w| w.lease);
            let thread = {
                let control = control.clone();
                let name = cfg.name.clone();
                std::thread::Builder::new()
                    .name(format!("export-{}", cfg.name))
                    .spawn(move || run(name, plan, marker, lease, control))
                    .map_err(|e| format!("cannot start the export thread of volume {}: {e}", cfg.name))?
            };
            items.push(Export { volume: cfg.name.clone(), control, thread });
        }
        Ok(Exports { items })
    }

    /// The group serves as primary: each export brings itself up on its volume's device
    /// (and withdraws while the volume is fenced).
    pub fn serve(&self, volumes: &[(String, PathBuf, Weak<VolumeShared>)]) {
        for e in &self.items {
            if let Some((_, device, volume)) = volumes.iter().find(|(n, _, _)| *n == e.volume) {
                e.set(Want::Serve { device: device.clone(), volume: volume.clone() });
            }
        }
    }

    /// The role closes: every export goes down (withdrawing first when the role was lost,
    /// so the address is gone before the device fails what it parked) and its thread ends.
    pub fn begin_close(&self, how: Closing) {
        let goal = match how {
            Closing::RoleLost => Goal::Withdraw,
            Closing::Shutdown => Goal::Down,
        };
        for e in &self.items {
            e.set(Want::Exit(goal));
        }
    }

    /// Waits until every export thread ended (after [`Self::begin_close`]), at most until
    /// `deadline`; one still running then is left to finish on its own.
    pub fn finish_close(&mut self, deadline: Instant) -> Result<(), String> {
        let mut late = Vec::new();
        for e in self.items.drain(..) {
            while !e.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if e.thread.is_finished() {
                let _ = e.thread.join();
            } else {
                late.push(e.volume);
            }
        }
        if late.is_empty() {
            Ok(())
        } else {
            Err(format!("the export of {} is not torn down yet (it waits for I/O in flight)", late.join(", ")))
        }
    }
}

impl Export {
    fn set(&self, want: Want) {
        *self.control.want.lock().unwrap_or_else(|p| p.into_inner()) = want;
        self.control.changed.notify_all();
    }
}

fn marker_path(cfg: &VolumeConfig) -> PathBuf {
    let mut s = cfg.metadata_file.clone().into_os_string();
    s.push(".export");
    PathBuf::from(s)
}

/// What the fence says of the volume now (no side effects: the queues own the latch).
fn fence_view(v: &VolumeShared, lease: Duration) -> FenceView {
    let now = Instant::now();
    let f = &v.fence;
    let peer_linked = v.queue_stats.iter().all(|q| q.link() == LinkState::Connected);
    let lease_valid = f.lease_valid(now);
    FenceView {
        enabled: f.enabled,
        fenced: f.is_deposed()
            || f.switching.load(Ordering::Acquire)
            || (!lease_valid && (f.is_latched() || !peer_linked)),
        peer_linked,
        fence_fails_io: f.on_fence == crate::config::OnFence::IoError,
        lease_left: f.lease_left(now),
        lease,
    }
}

fn run(name: String, plan: Plan, marker: PathBuf, lease: Duration, control: Arc<Control>) {
    // What an earlier run of this node may have left: all of it, as far as we know.
    // Until the leftovers are all gone, nothing is added: `present` is a guess until then.
    let mut cleaning = marker.exists();
    let mut present = if cleaning {
        tracing::warn!(volume = %name, target = %plan.export.target, "removing the export an earlier run of this node left behind");
        Present::ALL
    } else {
        Present::NONE
    };
    let mut last_error: Option<String> = None;
    loop {
        let want = control.want.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (goal, device, volume) = match &want {
            Want::Down => (Goal::Down, None, None),
            Want::Exit(goal) => (*goal, None, None),
            Want::Serve { device, volume } => {
                let v = volume.upgrade();
                let goal = match &v {
                    Some(v) if may_serve(fence_view(v, lease)) => Goal::Serve,
                    _ => Goal::Withdraw,
                };
                (goal, Some(device.clone()), Some(volume.clone()))
            }
        };
        cleaning &= !present.is_empty();
        let goal = if cleaning { Goal::Down } else { goal };
        let Some(step) = next_step(present, goal) else {
            if present.is_empty() {
                let _ = std::fs::remove_file(&marker);
            }
            if matches!(want, Want::Exit(_)) {
                return;
            }
            // Serving: look at the fence again soon; otherwise wait for a new goal.
            let guard = control.want.lock().unwrap_or_else(|p| p.into_inner());
            let wait = if matches!(want, Want::Serve { .. }) { FENCE_POLL } else { Duration::from_secs(1) };
            let _ = control.changed.wait_timeout(guard, wait);
            continue;
        };
        let result = match step {
            Step::Add(part) => {
                if let Err(e) = std::fs::write(&marker, plan.export.target.as_bytes()) {
                    Err(format!("cannot write {}: {e}", marker.display()))
                } else {
                    let device = device.clone().unwrap_or_default();
                    match plan.add(part, &device) {
                        Ok(()) => Ok(()),
                        Err(AddError::Busy(why)) => Err(why),
                        Err(AddError::Failed(why)) => {
                            // Undo what the step made before it is tried again.
                            if let Err(e) = plan.remove(part) {
                                tracing::warn!(volume = %name, "cannot undo a failed {part:?}: {e}");
                            }
                            Err(why)
                        }
                    }
                }
            }
            Step::Remove(part) => plan.remove(part),
        };
        match result {
            Ok(()) => {
                present = present.apply(step);
                if last_error.take().is_some() {
                    tracing::info!(volume = %name, ?step, "export step done after retries");
                }
                log_step(&name, &plan.export, step);
                if let Some(v) = volume.as_ref().and_then(Weak::upgrade) {
                    v.fence.export_address_held.store(present.has(Part::Address), Ordering::Release);
                }
            }
            Err(why) => {
                if last_error.as_deref() != Some(why.as_str()) {
                    tracing::warn!(volume = %name, ?step, "export step failed (retrying): {why}");
                    last_error = Some(why);
                }
                let guard = control.want.lock().unwrap_or_else(|p| p.into_inner());
                let _ = control.changed.wait_timeout(guard, RETRY_PAUSE);
            }
        }
    }
}

fn log_step(name: &str, e: &ExportConfig, step: Step) {
    match step {
        Step::Add(Part::Portal) => tracing::info!(
            volume = %name,
            kind = %e.kind,
            target = %e.target,
            portal = %format!("{}:{}", e.address, e.port),
            "export serving: portal open"
        ),
        Step::Remove(Part::Portal) => tracing::info!(volume = %name, target = %e.target, "export portal closed"),
        Step::Add(Part::Address) => {
            tracing::info!(volume = %name, address = %e.address_with_prefix(), interface = %e.interface, "service address added")
        }
        Step::Remove(Part::Address) => {
            tracing::info!(volume = %name, address = %e.address_with_prefix(), interface = %e.interface, "service address removed")
        }
        Step::Remove(Part::Store) => tracing::info!(volume = %name, target = %e.target, "export removed"),
        _ => tracing::debug!(volume = %name, ?step, "export step done"),
    }
}
