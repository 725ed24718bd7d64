//! Tasks and the VM operations a backup runs through them: snapshots, CBT on and off, disk
//! consolidation; waiting with `WaitForUpdatesEx` on a property collector of its own (so
//! concurrent waits in one session never steal each other's updates), falling back to polling;
//! cancellation; a failed task's fault returned typed. Also `QueryChangedDiskAreas`, paged into
//! the `cbt` crate's types.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cbt::{ChangeAccumulator, ChangedAreas, DiskChangeExtent, DiskChangeInfo};

use crate::error::{Error, Fault, FaultKind};
use crate::pc::{FilterSpec, Objects};
use crate::session::Client;
use crate::soap::{MoRef, Request};
use crate::xml::Element;

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting to run.
    Queued,
    /// Running.
    Running,
    /// Done.
    Success,
    /// Failed.
    Error,
}

/// A task from an entity's `recentTask`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentTask {
    /// The task.
    pub moref: MoRef,
    /// What it does (`VirtualMachine.createSnapshot`).
    pub description_id: String,
    /// Its state, when the server gave one this client knows.
    pub state: Option<TaskState>,
}

impl RecentTask {
    /// Whether it has yet to finish.
    pub fn running(&self) -> bool {
        matches!(self.state, Some(TaskState::Queued | TaskState::Running))
    }
}

impl TaskState {
    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "queued" => Some(Self::Queued),
            "running" => Some(Self::Running),
            "success" => Some(Self::Success),
            "error" => Some(Self::Error),
            _ => None,
        }
    }
}

/// What is known of a task.
#[derive(Debug, Clone, Default)]
struct Seen {
    state: Option<TaskState>,
    error: Option<Element>,
    result: Option<Element>,
    name: String,
}

impl Seen {
    /// Takes a whole `TaskInfo` or one of its properties.
    fn apply(&mut self, name: &str, val: Option<&Element>) {
        match name {
            "info" => {
                if let Some(info) = val {
                    self.apply("info.state", info.child("state"));
                    self.apply("info.error", info.child("error"));
                    self.apply("info.result", info.child("result"));
                    if let Some(n) = info.text_of("descriptionId").or_else(|| info.text_of("name")) {
                        self.name = n.to_owned();
                    }
                }
            }
            "info.state" => self.state = val.and_then(|v| TaskState::parse(&v.text)),
            "info.error" => self.error = val.cloned(),
            "info.result" => self.result = val.cloned(),
            _ => {}
        }
    }

    fn finished(&self, task: &MoRef, what: &str) -> Option<Result<Option<Element>, Error>> {
        match self.state? {
            TaskState::Success => Some(Ok(self.result.clone())),
            TaskState::Error => {
                let lmf = self.error.as_ref();
                let detail = lmf.and_then(|e| e.child("fault"));
                let message = lmf.and_then(|e| e.text_of("localizedMessage")).unwrap_or_default();
                let name = if self.name.is_empty() { what.to_owned() } else { self.name.clone() };
                let fault = Fault::from_detail(detail, message, &name, None);
                Some(Err(Error::Task { task: task.value.clone(), name, fault: Box::new(fault) }))
            }
            TaskState::Queued | TaskState::Running => None,
        }
    }
}

/// How long one `WaitForUpdatesEx` call may block on the server, at most.
const WAIT_SECONDS: u64 = 60;

impl Client {
    /// Waits for `task` to finish and returns its result (a snapshot's moref, for one). When
    /// `cancel` becomes true the task is asked to cancel, and the wait goes on for its end.
    pub async fn wait_task(
        &self,
        task: &MoRef,
        what: &str,
        cancel: Option<&AtomicBool>,
    ) -> Result<Option<Element>, Error> {
        match self.wait_with_updates(task, what, cancel).await {
            Err(e)
                if e.fault().is_some_and(|f| matches!(f.kind, FaultKind::MethodNotFound | FaultKind::NotSupported)) =>
            {
                tracing::debug!("WaitForUpdatesEx is not available ({e}); polling {task}");
                self.wait_polling(task, what, cancel).await
            }
            r => r,
        }
    }

    async fn wait_with_updates(
        &self,
        task: &MoRef,
        what: &str,
        cancel: Option<&AtomicBool>,
    ) -> Result<Option<Element>, Error> {
        // A collector of our own: updates of every filter in a session go to whoever waits on
        // its collector, so concurrent waits on the shared one would steal each other's.
        let req = Request::new("CreatePropertyCollector", &self.content().property_collector);
        let pc = self
            .invoke(req)
            .await?
            .child("returnval")
            .and_then(MoRef::from_element)
            .ok_or_else(|| Error::Protocol("CreatePropertyCollector returned nothing".into()))?;
        let r = self.wait_on(&pc, task, what, cancel).await;
        if let Err(e) = self.invoke(Request::new("DestroyPropertyCollector", &pc)).await {
            tracing::debug!("destroying the property collector {pc}: {e}");
        }
        r
    }

    async fn wait_on(
        &self,
        pc: &MoRef,
        task: &MoRef,
        what: &str,
        cancel: Option<&AtomicBool>,
    ) -> Result<Option<Element>, Error> {
        let mut req = Request::new("CreateFilter", pc);
        req.open("spec", None)
            .open("propSet", None)
            .text("type", "Task")
            .text("pathSet", "info.state")
            .text("pathSet", "info.error")
            .text("pathSet", "info.result")
            .text("pathSet", "info.descriptionId")
            .close("propSet")
            .open("objectSet", None)
            .moref("obj", task)
            .text("skip", false)
            .close("objectSet")
            .close("spec")
            .text("partialUpdates", false);
        self.invoke(req).await?;
        let mut seen = Seen::default();
        let mut version = String::new();
        let mut cancelled = false;
        loop {
            if let Some(done) = seen.finished(task, what) {
                return done;
            }
            if !cancelled && cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                cancelled = true;
                self.cancel_task(task).await;
            }
            let mut req = Request::new("WaitForUpdatesEx", pc);
            req.text("version", &version).open("options", None);
            // Short waits while a cancel may come, so it is seen promptly; never as long as the
            // timeout, which bounds each call: a long task is many short waits.
            let most = (self.timeout().as_secs() / 2).clamp(1, WAIT_SECONDS);
            let wait = if cancel.is_some() && !cancelled { most.min(2) } else { most };
            req.text("maxWaitSeconds", wait).close("options");
            let r = self.invoke(req).await?;
            let Some(set) = r.child("returnval") else { continue };
            if let Some(v) = set.text_of("version") {
                version = v.trim().to_owned();
            }
            for fs in set.children_named("filterSet") {
                for os in fs.children_named("objectSet") {
                    for change in os.children_named("changeSet") {
                        let name = change.text_of("name").unwrap_or_default();
                        let op = change.text_of("op").unwrap_or("assign");
                        let val = if op.trim() == "remove" { None } else { change.child("val") };
                        seen.apply(name.trim(), val);
                    }
                }
            }
        }
    }

    async fn wait_polling(
        &self,
        task: &MoRef,
        what: &str,
        cancel: Option<&AtomicBool>,
    ) -> Result<Option<Element>, Error> {
        let spec =
            FilterSpec { kind: "Task".into(), paths: vec!["info".into()], objects: Objects::List(vec![task.clone()]) };
        let mut pause = Duration::from_millis(100);
        let mut cancelled = false;
        loop {
            let objs = self.retrieve(&spec).await?;
            let mut seen = Seen::default();
            if let Some(info) = objs.first().and_then(|o| o.get("info")) {
                seen.apply("info", Some(info));
            }
            if let Some(done) = seen.finished(task, what) {
                return done;
            }
            if !cancelled && cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                cancelled = true;
                self.cancel_task(task).await;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// The tasks the server lists in `entity`'s `recentTask` (running ones, and those finished
    /// in the last minutes), with what each does (`VirtualMachine.createSnapshot`) and its
    /// state: how a caller whose call went unanswered learns whether the server works on it.
    pub async fn recent_tasks(&self, entity: &MoRef) -> Result<Vec<RecentTask>, Error> {
        let Some(list) = self.property(entity, "recentTask").await? else { return Ok(Vec::new()) };
        let tasks: Vec<MoRef> = list.children.iter().filter_map(MoRef::from_element).collect();
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let spec = FilterSpec { kind: "Task".into(), paths: vec!["info".into()], objects: Objects::List(tasks) };
        let mut out = Vec::new();
        for o in self.retrieve(&spec).await? {
            let Some(info) = o.get("info") else { continue };
            out.push(RecentTask {
                moref: o.obj.clone(),
                description_id: info.text_of("descriptionId").unwrap_or_default().to_owned(),
                state: info.text_of("state").and_then(TaskState::parse),
            });
        }
        Ok(out)
    }

    /// Asks a task to cancel (it may finish anyway); failures are logged, not returned.
    pub async fn cancel_task(&self, task: &MoRef) {
        if let Err(e) = self.invoke(Request::new("CancelTask", task)).await {
            tracing::warn!("cancelling {task}: {e}");
        }
    }

    pub(crate) async fn run_task(&self, req: Request, cancel: Option<&AtomicBool>) -> Result<Option<Element>, Error> {
        let what = req.method().to_owned();
        let r = self.invoke(req).await?;
        let task = r
            .child("returnval")
            .and_then(MoRef::from_element)
            .ok_or_else(|| Error::Protocol(format!("{what} returned no task")))?;
        self.wait_task(&task, &what, cancel).await
    }

    /// Takes a snapshot without memory (`quiesce` asks VMware Tools to freeze the guest) and
    /// returns it.
    pub async fn create_snapshot(
        &self,
        vm: &MoRef,
        name: &str,
        description: &str,
        quiesce: bool,
        cancel: Option<&AtomicBool>,
    ) -> Result<MoRef, Error> {
        let mut req = Request::new("CreateSnapshot_Task", vm);
        req.text("name", name).text("description", description).text("memory", false).text("quiesce", quiesce);
        let result = self.run_task(req, cancel).await?;
        result
            .as_ref()
            .and_then(MoRef::from_element)
            .ok_or_else(|| Error::Protocol(format!("CreateSnapshot_Task on {vm} finished without a snapshot")))
    }

    /// Removes one snapshot (not its children), consolidating its disks into the parent.
    pub async fn remove_snapshot(&self, snapshot: &MoRef, consolidate: bool) -> Result<(), Error> {
        let mut req = Request::new("RemoveSnapshot_Task", snapshot);
        req.text("removeChildren", false).text("consolidate", consolidate);
        self.run_task(req, None).await.map(|_| ())
    }

    /// Turns changed block tracking on or off (`ReconfigVM_Task`). On a running VM it takes
    /// effect at the next stun: a snapshot create and remove.
    pub async fn set_change_tracking(&self, vm: &MoRef, enabled: bool) -> Result<(), Error> {
        let mut req = Request::new("ReconfigVM_Task", vm);
        req.open("spec", None).text("changeTrackingEnabled", enabled).close("spec");
        self.run_task(req, None).await.map(|_| ())
    }

    /// Deletes a datastore file (`[ds1] vm/vm-ctk.vmdk`) in `datacenter` through the file
    /// manager.
    pub async fn delete_datastore_file(&self, ds_path: &str, datacenter: &MoRef) -> Result<(), Error> {
        let fm = self
            .content()
            .file_manager
            .clone()
            .ok_or_else(|| Error::Protocol("the server has no file manager".into()))?;
        let mut req = Request::new("DeleteDatastoreFile_Task", &fm);
        req.text("name", ds_path).moref("datacenter", datacenter);
        self.run_task(req, None).await.map(|_| ())
    }

    /// Merges orphaned delta disks (`runtime.consolidationNeeded`).
    pub async fn consolidate_disks(&self, vm: &MoRef) -> Result<(), Error> {
        self.run_task(Request::new("ConsolidateVMDisks_Task", vm), None).await.map(|_| ())
    }

    /// The areas of disk `device_key` changed since `change_id` (or allocated, for `"*"`) as of
    /// `snapshot`, every page of the answer joined and checked by `cbt`. A `FileFault` here
    /// means CBT cannot answer for that interval: the caller copies the disk in full.
    pub async fn query_changed_disk_areas(
        &self,
        vm: &MoRef,
        snapshot: Option<&MoRef>,
        device_key: i32,
        capacity: u64,
        change_id: &str,
    ) -> Result<ChangedAreas, Error> {
        let mut acc = ChangeAccumulator::new(capacity);
        while let Some(offset) = acc.next_offset() {
            let mut req = Request::new("QueryChangedDiskAreas", vm);
            if let Some(s) = snapshot {
                req.moref("snapshot", s);
            }
            req.text("deviceKey", device_key).text("startOffset", offset).text("changeId", change_id);
            let r = self.invoke(req).await?;
            let page = r.child("returnval").map(change_info).ok_or_else(|| {
                Error::Protocol(format!("QueryChangedDiskAreas on {vm} at byte {offset} returned nothing"))
            })?;
            acc.push(&page).map_err(|e| {
                Error::Protocol(format!("QueryChangedDiskAreas on {vm}, disk {device_key}, at byte {offset}: {e}"))
            })?;
        }
        acc.finish().map_err(|e| Error::Protocol(format!("QueryChangedDiskAreas on {vm}, disk {device_key}: {e}")))
    }
}

/// A `DiskChangeInfo` element as the `cbt` type (numbers that do not parse become -1, which
/// the accumulator refuses by name).
pub fn change_info(e: &Element) -> DiskChangeInfo {
    let num = |x: &Element, n: &str| x.parse_of::<i64>(n).unwrap_or(-1);
    DiskChangeInfo {
        start_offset: num(e, "startOffset"),
        length: num(e, "length"),
        changed_area: e
            .children_named("changedArea")
            .map(|a| DiskChangeExtent { start: num(a, "start"), length: num(a, "length") })
            .collect(),
    }
}
