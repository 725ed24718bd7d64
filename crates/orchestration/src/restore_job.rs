//! A restore point put back into vSphere as a new VM: each disk uploaded as a hosted sparse
//! VMDK through the datastore's `/folder` interface and converted on the datastore, the VM
//! created from the captured `.vmx` under a temporary name, the disks read back and compared
//! with the point, and the rename to its real name as the commit. What a failed or killed
//! restore made is removed at once, or by the next restore's sweep from its intent record.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use repo::{Manifest, PointReader, Repo};
use serde::{Deserialize, Serialize};
use vsphere::datastore::DatastoreFile;
use vsphere::provision::{Placement, Provisioning};
use vsphere::{Client, MoRef};

use crate::OrchError;
use crate::report::human_bytes;
use crate::restore_plan::{NewVm, vm_spec};

/// The prefix of a VM that a restore has not finished: it is ours, and incomplete.
pub const TEMP_PREFIX: &str = "syncproxy-restoring-";

/// How much of the restored disks is read back and compared with the restore point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// The first and last MiB and a sample of the data (the default).
    Sample,
    /// Every byte.
    Full,
}

/// Where and how to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The new VM's name.
    pub name: String,
    /// The datacenter (`None`: the only one).
    pub datacenter: Option<String>,
    /// A host for the VM.
    pub host: Option<String>,
    /// A cluster for the VM.
    pub cluster: Option<String>,
    /// A resource pool.
    pub pool: Option<String>,
    /// A VM folder, as an inventory path under the datacenter's VM folder.
    pub folder: Option<String>,
    /// The datastore of the VM and its disks (`None`: the only one).
    pub datastore: Option<String>,
    /// Disks placed elsewhere: slot (`scsi0:1`) → datastore.
    pub disk_datastores: Vec<(String, String)>,
    /// The disks' provisioning.
    pub provisioning: Provisioning,
    /// How disks are sent.
    pub upload: Upload,
    /// Source port group → target network name.
    pub networks: Vec<(String, String)>,
    /// Connect the NICs.
    pub connect_nics: bool,
    /// Keep UUIDs and MAC addresses.
    pub keep_identity: bool,
    /// Power the VM on once restored.
    pub power_on: bool,
    /// How much to read back.
    pub verify: Verify,
    /// Where intent records live (`restores/` under it).
    pub state_dir: PathBuf,
    /// The VM's configuration for a point with none captured.
    pub vmx: Option<String>,
}

/// One restored disk.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredDisk {
    /// Its slot.
    pub slot: String,
    /// Its datastore path.
    pub file: String,
    /// Its size.
    pub capacity: u64,
    /// Bytes sent over HTTPS (the sparse file).
    pub uploaded: u64,
    /// Bytes of data in it.
    pub data: u64,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreOutcome {
    /// The restore point.
    pub point: String,
    /// The VM, by moref value.
    pub vm: String,
    /// Its name.
    pub name: String,
    /// The data path, in words.
    pub path: String,
    /// The disks.
    pub disks: Vec<RestoredDisk>,
    /// Bytes read back and compared.
    pub verified: u64,
    /// Seconds spent uploading and converting.
    pub upload_seconds: f64,
    /// Whether it was powered on.
    pub powered_on: bool,
    /// Defaults taken, what was left out, and anything swept first.
    pub notes: Vec<String>,
}

/// A step of a restore, for progress.
#[derive(Debug, Clone)]
pub struct Progress {
    /// What is being done.
    pub step: String,
    /// Bytes done of the step.
    pub done: u64,
    /// Bytes the step moves.
    pub total: u64,
}

/// What a restore is about to do, kept until it is done so a later run can undo it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Intent {
    pub(crate) id: String,
    /// `pid start-time` of the process doing it.
    pub(crate) owner: String,
    pub(crate) server: String,
    pub(crate) datacenter: String,
    pub(crate) datacenter_name: String,
    pub(crate) name: String,
    pub(crate) temp_name: String,
    pub(crate) folders: Vec<String>,
    pub(crate) vm: Option<String>,
    pub(crate) complete: bool,
    /// What kind of restore (records written before it existed are new VMs).
    #[serde(default)]
    pub(crate) work: Work,
}

impl Intent {
    /// A new record of this process's restore `id` of `work` on `client`'s server, in the
    /// datacenter `at`, named for `name` (the VM made or written into).
    pub(crate) fn begin(client: &Client, id: &str, at: Where<'_>, name: &str, work: Work) -> Self {
        Self {
            id: id.to_owned(),
            owner: crate::drill_job::process_identity(std::process::id()).unwrap_or_default(),
            server: client.endpoint().authority(),
            datacenter: at.datacenter.value.clone(),
            datacenter_name: at.datacenter_name.to_owned(),
            name: name.to_owned(),
            temp_name: String::new(),
            folders: Vec::new(),
            vm: None,
            complete: false,
            work,
        }
    }
}

/// The kind of restore an intent record is for, with what undoing it needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(crate) enum Work {
    /// A new VM, made under [`Intent::temp_name`] in [`Intent::folders`].
    #[default]
    NewVm,
    /// Disk files uploaded beside an existing VM (moref value `vm`), each to be swapped in for
    /// one of its disks or attached to it: the reconfiguration that does so is the commit.
    Disks {
        /// The VM.
        vm: String,
        /// The files, in the order made.
        files: Vec<NewFile>,
    },
    /// Disks of an existing VM written in place through VDDK: nothing to undo, and a run that
    /// died left them holding part of the point, which a later run of the same restore mends.
    Rollback {
        /// The VM (moref value).
        vm: String,
        /// The restore point.
        point: String,
    },
}

/// A disk file a restore made beside an existing VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NewFile {
    /// Its datastore path.
    pub(crate) file: String,
    /// The disk file it replaces once swapped in (`None`: it is attached as a new disk).
    pub(crate) replaces: Option<String>,
}

fn intents_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("restores")
}

pub(crate) fn save(state_dir: &Path, intent: &Intent) -> Result<(), OrchError> {
    let dir = intents_dir(state_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| OrchError::Refused(format!("cannot make the restore state folder {}: {e}", dir.display())))?;
    let data = serde_json::to_vec_pretty(intent)
        .map_err(|e| OrchError::Refused(format!("a restore intent could not be encoded: {e}")))?;
    durable::write_atomic(&dir.join(format!("{}.json", intent.id)), &data)?;
    Ok(())
}

pub(crate) fn forget(state_dir: &Path, id: &str) {
    let path = intents_dir(state_dir).join(format!("{id}.json"));
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!("cannot remove the restore record {}: {e}", path.display());
    }
}

/// Removes what dead restores against `client`'s server left: VMs still under their temporary
/// name and the folders they made. Returns what it did, in words. A record whose process still
/// runs is left alone.
pub async fn sweep(client: &Client, state_dir: &Path) -> Result<Vec<String>, OrchError> {
    let dir = intents_dir(state_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
    let server = client.endpoint().authority();
    let mut done = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        // A record a dead restore was writing when it died: the record it was to replace (or
        // none, when nothing had been made yet) says what to undo.
        let file_name = e.file_name().to_string_lossy().into_owned();
        if let Some((pid, _)) = durable::temp_writer(&file_name) {
            if crate::drill_job::process_identity(pid).is_none() {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(data) = std::fs::read(&path) else { continue };
        let Ok(intent) = serde_json::from_slice::<Intent>(&data) else {
            done.push(format!("{} is not a restore record: left alone", path.display()));
            continue;
        };
        if intent.server != server || owner_alive(&intent.owner) {
            continue;
        }
        if !undo(client, &intent, &mut done).await? {
            forget(state_dir, &intent.id);
        }
    }
    Ok(done)
}

pub(crate) fn owner_alive(owner: &str) -> bool {
    owner
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse::<u32>().ok())
        .and_then(crate::drill_job::process_identity)
        .is_some_and(|now| now == owner.trim())
}

/// Undoes an unfinished restore: its VM destroyed (only while it has its temporary name), its
/// folders deleted; or disk files it made and did not swap in deleted. A finished one is only
/// forgotten. Returns whether the record must be kept (an interrupted write in place, which
/// nothing undoes: it is reported on every sweep until a run of that restore finishes).
pub(crate) async fn undo(client: &Client, intent: &Intent, done: &mut Vec<String>) -> Result<bool, OrchError> {
    match &intent.work {
        Work::NewVm => undo_new_vm(client, intent, done).await.map(|()| false),
        Work::Disks { vm, files } => undo_disks(client, intent, vm, files, done).await.map(|()| false),
        Work::Rollback { vm, point } => {
            done.push(format!(
                "an in-place restore of VM {} ({vm}) from point {point} was interrupted: its disks hold part of \
                 that point; run the same restore again to finish it",
                intent.name
            ));
            Ok(true)
        }
    }
}

/// Undoes disk files made beside an existing VM: a file the VM has is the commit done (the one
/// it replaced is deleted), a file it does not have is deleted.
async fn undo_disks(
    client: &Client,
    intent: &Intent,
    vm: &str,
    files: &[NewFile],
    done: &mut Vec<String>,
) -> Result<(), OrchError> {
    let datacenter = MoRef::new("Datacenter", &intent.datacenter);
    let attached: Vec<String> = match client.hardware(&MoRef::new("VirtualMachine", vm)).await {
        Ok(hw) => hw.disks.into_iter().map(|d| d.file).collect(),
        Err(_) => Vec::new(),
    };
    for upload in &intent.folders {
        match client.delete_datastore_file(upload, &datacenter).await {
            Ok(()) => done.push(format!("removed {upload}, left by restore {}", intent.id)),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for f in files {
        let gone = if attached.contains(&f.file) {
            match &f.replaces {
                Some(old) if !attached.contains(old) => old,
                _ => continue,
            }
        } else {
            &f.file
        };
        match client.delete_virtual_disk(gone, &datacenter).await {
            Ok(()) => done.push(format!("removed {gone}, left by restore {} of VM {}", intent.id, intent.name)),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn undo_new_vm(client: &Client, intent: &Intent, done: &mut Vec<String>) -> Result<(), OrchError> {
    let datacenter = MoRef::new("Datacenter", &intent.datacenter);
    let vm = match &intent.vm {
        Some(v) => Some(MoRef::new("VirtualMachine", v)),
        None => find_vm_named(client, &intent.temp_name).await?,
    };
    if let Some(vm) = &vm {
        match client.hardware(vm).await {
            Ok(hw) if hw.name == intent.name && intent.vm.is_some() => {
                done.push(format!("restore {} had finished: VM {} kept", intent.id, intent.name));
                return Ok(());
            }
            Ok(hw) if hw.name == intent.temp_name => {
                let _ = client.power_off(vm).await;
                client.destroy(vm).await?;
                done.push(format!("removed VM {} ({vm}), left by an unfinished restore", intent.temp_name));
            }
            Ok(hw) => {
                done.push(format!(
                    "restore {}: VM {vm} is now named {:?}, not ours to remove: left alone",
                    intent.id, hw.name
                ));
                return Ok(());
            }
            // Gone already (destroyed before the record was forgotten).
            Err(_) => {}
        }
    }
    if intent.complete {
        return Ok(());
    }
    for folder in &intent.folders {
        match client.delete_datastore_file(folder, &datacenter).await {
            Ok(()) => done.push(format!("removed {folder}, left by an unfinished restore")),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub(crate) fn is_not_found(e: &vsphere::Error) -> bool {
    let text = e.to_string();
    text.contains("FileNotFound") || text.contains("not found") || text.contains("404")
}

async fn find_vm_named(client: &Client, name: &str) -> Result<Option<MoRef>, OrchError> {
    Ok(client.vms().await?.into_iter().find(|v| v.name == name).map(|v| v.moref))
}

/// A short random ID for a restore's records and temporary names.
pub(crate) fn new_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let low = u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or(0);
    let mixed = (low ^ u64::from(std::process::id()).rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{:08x}", mixed >> 32)
}

/// Restores point `point` of `repo` as a new VM through `client`. On any error and on cancel,
/// what it made is removed before it returns; if the process dies instead, the next restore's
/// [`sweep`] removes it.
pub async fn restore_new_vm(
    client: &Client,
    repo: &Repo,
    point: &str,
    options: &RestoreOptions,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<RestoreOutcome, OrchError> {
    let manifest = repo.point(point)?;
    let vmx = match &options.vmx {
        Some(text) => text.clone(),
        None => {
            let f = manifest.files.iter().find(|f| f.name.ends_with(".vmx")).ok_or_else(|| {
                OrchError::Refused(format!(
                    "restore point {} has no captured .vmx: a new VM needs its configuration (give one with --vmx)",
                    manifest.id
                ))
            })?;
            String::from_utf8_lossy(&repo.file(&manifest, &f.name)?).into_owned()
        }
    };
    let mut notes = sweep(client, &options.state_dir).await?;

    let placement = client
        .placement(
            options.datacenter.as_deref(),
            options.host.as_deref(),
            options.cluster.as_deref(),
            options.pool.as_deref(),
            options.folder.as_deref(),
        )
        .await?;
    let thick = options.provisioning != Provisioning::Thin || options.upload == Upload::Flat;
    // Each disk's datastore: its own when mapped, else the VM's; each checked for the space its
    // disks take.
    for (slot, _) in &options.disk_datastores {
        if !manifest.disks.iter().any(|d| &d.name == slot) {
            let names: Vec<&str> = manifest.disks.iter().map(|d| d.name.as_str()).collect();
            return Err(OrchError::Refused(format!(
                "--disk-datastore names {slot}, which restore point {} has not; it has: {}",
                manifest.id,
                names.join(", ")
            )));
        }
    }
    let own = |slot: &str| options.disk_datastores.iter().find(|(s, _)| s == slot).map(|(_, ds)| ds.clone());
    let all_needs = crate::preflight::restore::needs_of_point(repo, &manifest.id, None, thick)?;
    let needs_of = |on: &dyn Fn(&str) -> bool| crate::preflight::restore::RestoreNeeds {
        disks: all_needs.disks.iter().filter(|d| on(&d.name)).cloned().collect(),
        ..all_needs.clone()
    };
    let datastore =
        pick_datastore(client, options.datastore.as_deref(), &placement, &needs_of(&|s| own(s).is_none())).await?;
    for (_, ds) in &options.disk_datastores {
        pick_datastore(client, Some(ds), &placement, &needs_of(&|s| own(s).as_deref() == Some(ds.as_str()))).await?;
    }
    let disk_folders: Vec<String> = manifest
        .disks
        .iter()
        .map(|d| format!("[{}] {}", own(&d.name).unwrap_or_else(|| datastore.clone()), options.name))
        .collect();
    let networks = map_networks(client, &placement, &options.networks).await?;
    if find_vm_named(client, &options.name).await?.is_some() {
        return Err(OrchError::Refused(format!(
            "a VM named {:?} exists already: nothing is overwritten (choose another --name)",
            options.name
        )));
    }
    let folder = format!("[{datastore}] {}", options.name);
    let mut folders = vec![folder.clone()];
    for f in &disk_folders {
        if !folders.contains(f) {
            folders.push(f.clone());
        }
    }
    let reader = client.datastore_reader()?;
    for f in &folders {
        if exists(&reader, &placement.datacenter_name, f).await? {
            return Err(OrchError::Refused(format!(
                "{f} exists already on the datastore: nothing is overwritten (choose another --name, or remove it)"
            )));
        }
    }

    let id = new_id();
    let at = Where { datacenter: &placement.datacenter, datacenter_name: &placement.datacenter_name };
    let mut intent = Intent {
        temp_name: format!("{TEMP_PREFIX}{id}-{}", options.name),
        folders,
        ..Intent::begin(client, &id, at, &options.name, Work::NewVm)
    };
    save(&options.state_dir, &intent)?;
    let ran = restore_steps(
        client,
        repo,
        &manifest,
        &vmx,
        options,
        &placement,
        &folder,
        &disk_folders,
        networks,
        &mut intent,
        progress,
        cancel,
    )
    .await;
    match ran {
        Ok(mut outcome) => {
            forget(&options.state_dir, &id);
            notes.append(&mut outcome.notes);
            outcome.notes = notes;
            Ok(outcome)
        }
        Err(e) => {
            let mut undone = Vec::new();
            match undo(client, &intent, &mut undone).await {
                Ok(_) => forget(&options.state_dir, &id),
                Err(u) => tracing::warn!("restore {id} could not be undone now ({u}); the next restore sweeps it"),
            }
            for line in undone {
                tracing::info!("{line}");
            }
            Err(e)
        }
    }
}

#[expect(clippy::too_many_arguments, reason = "the steps of one restore share its resolved facts")]
async fn restore_steps(
    client: &Client,
    repo: &Repo,
    manifest: &Manifest,
    vmx: &str,
    options: &RestoreOptions,
    placement: &Placement,
    folder: &str,
    disk_folders: &[String],
    networks: Vec<(String, (String, MoRef))>,
    intent: &mut Intent,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<RestoreOutcome, OrchError> {
    let name = &options.name;
    let files: Vec<String> = disk_folders
        .iter()
        .enumerate()
        .map(|(n, f)| if n == 0 { format!("{f}/{name}.vmdk") } else { format!("{f}/{name}_{n}.vmdk") })
        .collect();
    if options.upload == Upload::Nfc {
        // The import makes the VM's own folder; disks elsewhere need theirs.
        for f in intent.folders.iter().filter(|f| f.as_str() != folder) {
            client.make_directory(f, &placement.datacenter).await?;
        }
        let made = nfc_steps(
            client, repo, manifest, vmx, options, placement, folder, &files, networks, intent, progress, cancel,
        )
        .await?;
        return finish(client, repo, manifest, options, placement, made, intent, progress, cancel).await;
    }
    for f in &intent.folders {
        client.make_directory(f, &placement.datacenter).await?;
    }
    let started = Instant::now();
    let mut disks = Vec::new();
    let mut upload_notes = Vec::new();
    let mut flat = options.upload == Upload::Flat;
    for n in 0..manifest.disks.len() {
        check(cancel)?;
        let upload = format!("{}/{name}-upload-{n}.vmdk", disk_folders[n]);
        let file = files[n].clone();
        let at = Where { datacenter: &placement.datacenter, datacenter_name: &placement.datacenter_name };
        let (disk, note) = upload_disk(
            client,
            repo,
            manifest,
            n,
            at,
            &upload,
            &file,
            options.provisioning,
            options.upload,
            progress,
            cancel,
        )
        .await?;
        flat |= note.is_some();
        upload_notes.extend(note);
        disks.push(disk);
    }
    let upload_seconds = started.elapsed().as_secs_f64();
    check(cancel)?;

    let new = NewVm {
        name: intent.temp_name.clone(),
        vmx_path: format!("{folder}/{name}.vmx"),
        disks: disks.iter().map(|d| (d.slot.clone(), d.capacity, d.file.clone())).collect(),
        networks,
        connect_nics: options.connect_nics,
        keep_identity: options.keep_identity,
    };
    let (spec, mut notes) = vm_spec(vmx, &new)?;
    notes.append(&mut upload_notes);
    let vm = client.create_vm(placement, &spec).await?;
    intent.vm = Some(vm.value.clone());
    save(&options.state_dir, intent)?;
    let path = if flat {
        "datastore upload: each disk's bytes as a flat extent and its VMFS descriptor over HTTPS (/folder PUT)"
    } else {
        "datastore upload: a hosted sparse VMDK per disk over HTTPS (/folder PUT), converted on the datastore \
         (CopyVirtualDisk)"
    };
    let made = Made { vm, disks, upload_seconds, notes, path: path.into() };
    finish(client, repo, manifest, options, placement, made, intent, progress, cancel).await
}

/// A new VM made and its disks filled, not yet checked or named.
struct Made {
    vm: MoRef,
    disks: Vec<RestoredDisk>,
    upload_seconds: f64,
    notes: Vec<String>,
    path: String,
}

/// Reads the new VM's disks back, names it (the commit) and powers it on if asked.
#[expect(clippy::too_many_arguments, reason = "the steps of one restore share its resolved facts")]
async fn finish(
    client: &Client,
    repo: &Repo,
    manifest: &Manifest,
    options: &RestoreOptions,
    placement: &Placement,
    made: Made,
    intent: &mut Intent,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<RestoreOutcome, OrchError> {
    let Made { vm, disks, upload_seconds, mut notes, path } = made;
    let name = &options.name;
    let mut verified = 0;
    for (n, d) in disks.iter().enumerate() {
        check(cancel)?;
        let point = repo.reader(&manifest.id, n)?;
        verified += verify_disk(client, &placement.datacenter_name, d, &point, options.verify, progress).await?;
    }
    check(cancel)?;

    // The commit: from here the VM is the restore's result, not its leftover.
    client.rename(&vm, name).await?;
    intent.complete = true;
    save(&options.state_dir, intent)?;
    let powered_on = if options.power_on {
        match client.power_on(&vm).await {
            Ok(()) => true,
            Err(e) => {
                notes.push(format!("the VM was restored but did not power on: {e}"));
                false
            }
        }
    } else {
        false
    };
    Ok(RestoreOutcome {
        point: manifest.id.clone(),
        vm: vm.value.clone(),
        name: name.clone(),
        path,
        disks,
        verified,
        upload_seconds,
        powered_on,
        notes,
    })
}

/// The NFC way: the VM imported (`ImportVApp`) under its temporary name with empty disks, each
/// disk's data sent as a streamOptimized VMDK to the lease's URL, the lease completed.
#[expect(clippy::too_many_arguments, reason = "the steps of one restore share its resolved facts")]
async fn nfc_steps(
    client: &Client,
    repo: &Repo,
    manifest: &Manifest,
    vmx: &str,
    options: &RestoreOptions,
    placement: &Placement,
    folder: &str,
    files: &[String],
    networks: Vec<(String, (String, MoRef))>,
    intent: &mut Intent,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<Made, OrchError> {
    let name = &options.name;
    let new = NewVm {
        name: intent.temp_name.clone(),
        vmx_path: format!("{folder}/{name}.vmx"),
        disks: manifest.disks.iter().zip(files).map(|(d, f)| (d.name.clone(), d.capacity, f.clone())).collect(),
        networks,
        connect_nics: options.connect_nics,
        keep_identity: options.keep_identity,
    };
    let (spec, notes) = vm_spec(vmx, &new)?;
    let started = Instant::now();
    progress(Progress { step: "importing the VM (ImportVApp)".into(), done: 0, total: 0 });
    let lease = client.import_vapp(placement, &spec).await?;
    let sent = async {
        let info = client.wait_lease(&lease, std::time::Duration::from_secs(300)).await?;
        intent.vm = Some(info.entity.value.clone());
        save(&options.state_dir, intent)?;
        let mut disks = Vec::new();
        let total: u64 = manifest.disks.iter().map(|d| d.capacity).sum::<u64>().max(1);
        let mut before = 0;
        for (n, file) in files.iter().enumerate() {
            check(cancel)?;
            let base = file.rsplit_once('/').map_or(file.as_str(), |(_, b)| b);
            let device = info.disk_url(n, base).ok_or_else(|| {
                OrchError::Refused(format!("the NFC lease offers no URL for disk {n} ({base}) of the import"))
            })?;
            let disk = nfc_disk(client, repo, manifest, n, file, device, &lease, (before, total), progress).await?;
            before += manifest.disks[n].capacity;
            disks.push(disk);
        }
        client.lease_complete(&lease).await?;
        Ok::<_, OrchError>((info.entity, disks))
    };
    let (vm, disks) = match sent.await {
        Ok(r) => r,
        Err(e) => {
            if let Err(a) = client.lease_abort(&lease).await {
                tracing::warn!("NFC lease {lease} could not be aborted: {a}");
            }
            return Err(e);
        }
    };
    Ok(Made {
        vm,
        disks,
        upload_seconds: started.elapsed().as_secs_f64(),
        notes,
        path: "NFC import: ImportVApp and its lease, a streamOptimized VMDK per disk over HTTPS".into(),
    })
}

/// Sends disk `n` of `manifest` to `device` as a streamOptimized VMDK (written to a temporary
/// file first: the upload's length must be known), reporting progress on `lease` (which keeps
/// it alive) as `(bytes of disks before it, bytes of all disks)` says.
#[expect(clippy::too_many_arguments, reason = "one disk's upload needs its source, place and ways to report")]
async fn nfc_disk(
    client: &Client,
    repo: &Repo,
    manifest: &Manifest,
    n: usize,
    file: &str,
    device: &vsphere::nfc::DeviceUrl,
    lease: &MoRef,
    (before, total): (u64, u64),
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RestoredDisk, OrchError> {
    let d = &manifest.disks[n];
    let reader = repo.reader(&manifest.id, n)?;
    // The packer skips all-zero grains itself: the point's data chunks are all it needs.
    let data = allocation(&reader).await?;
    progress(Progress { step: format!("disk {}: packing it as a streamOptimized VMDK", d.name), done: 0, total: 0 });
    let base = file.rsplit_once('/').map_or(file, |(_, b)| b).to_owned();
    let cap = d.capacity;
    let (tmp, stats) = tokio::task::spawn_blocking(move || -> Result<_, OrchError> {
        let mut tmp = tempfile::tempfile()
            .map_err(|e| OrchError::Refused(format!("cannot make a temporary file for the upload: {e}")))?;
        let mut out = std::io::BufWriter::new(&mut tmp);
        let stats = vmdk::write_stream_optimized(&mut out, &PointAt::new(reader), cap, Some(&data), &base)?;
        std::io::Write::flush(&mut out)
            .map_err(|e| OrchError::Refused(format!("cannot write the upload's temporary file: {e}")))?;
        drop(out);
        Ok((tmp, stats))
    })
    .await
    .map_err(|e| OrchError::Refused(format!("packing a disk stopped: {e}")))??;
    let len = stats.file_bytes;
    let (writer, path) = client.lease_writer(device)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek};
        let mut tmp = tmp;
        if let Err(e) = tmp.rewind() {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match tmp.read(&mut buf) {
                Ok(0) => return,
                Ok(k) => {
                    if tx.blocking_send(Ok(Bytes::copy_from_slice(&buf[..k]))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let step = format!("disk {} ({}): upload", d.name, human_bytes(cap));
    progress(Progress { step: step.clone(), done: 0, total: len });
    let put = writer.put_to(&path, &device.url, vsphere::nfc::STREAM_VMDK, len, ReceiverBody(rx));
    tokio::pin!(put);
    // The lease lapses without progress: report it while the upload runs.
    let mut keepalive = tokio::time::interval(std::time::Duration::from_secs(20));
    loop {
        tokio::select! {
            r = &mut put => { r?; break; }
            _ = keepalive.tick() => {
                let pct = u8::try_from(before.saturating_mul(100) / total).unwrap_or(100);
                client.lease_progress(lease, pct).await?;
            }
        }
    }
    progress(Progress { step, done: len, total: len });
    Ok(RestoredDisk {
        slot: d.name.clone(),
        file: file.to_owned(),
        capacity: cap,
        uploaded: len,
        data: stats.data_bytes,
    })
}

/// Stops a restore that was asked to stop.
pub(crate) fn check(cancel: &AtomicBool) -> Result<(), OrchError> {
    if cancel.load(Ordering::Relaxed) { Err(OrchError::Refused("the restore was cancelled".into())) } else { Ok(()) }
}

/// A datacenter, by moref and by name (datastore paths need both).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Where<'a> {
    pub(crate) datacenter: &'a MoRef,
    pub(crate) datacenter_name: &'a str,
}

/// How a disk reaches the datastore over HTTPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Upload {
    /// Its data grains as a hosted sparse VMDK, converted on the datastore by
    /// `CopyVirtualDisk` (the default: zeros are never sent). A server that cannot convert it
    /// gets the disk flat instead, with a note.
    Sparse,
    /// Every byte as a flat extent beside a VMFS descriptor: no conversion, a thick file.
    Flat,
    /// NFC import (`ImportVApp` and its lease): each disk's data grains as a streamOptimized
    /// VMDK to the lease's URL, thin by nature. New VMs only.
    Nfc,
}

/// A restore point's disk as `vmdk`'s reader (for writing it as a streamOptimized VMDK), read
/// from the repository a window at a time: `vmdk` asks grain by grain, and each grain read
/// alone would decode its whole chunk again.
#[derive(Debug)]
pub struct PointAt {
    reader: PointReader,
    window: std::sync::Mutex<(u64, Vec<u8>)>,
}

impl PointAt {
    /// How much is read from the repository at once.
    const WINDOW: u64 = 4 << 20;

    /// `reader` as `vmdk`'s reader.
    pub fn new(reader: PointReader) -> Self {
        Self { reader, window: std::sync::Mutex::new((0, Vec::new())) }
    }
}

impl vmdk::ReadAt for PointAt {
    fn len(&self) -> u64 {
        self.reader.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let size = self.reader.size();
        let want = buf.len() as u64;
        if offset.checked_add(want).is_none_or(|end| end > size) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("read past the end at {offset}"),
            ));
        }
        let mut window = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut done = 0u64;
        while done < want {
            let at = offset + done;
            let (start, data) = &*window;
            if at < *start || at >= start + data.len() as u64 {
                let new_start = at / Self::WINDOW * Self::WINDOW;
                let len = Self::WINDOW.min(size - new_start);
                let data = self.reader.read(new_start, len).map_err(std::io::Error::other)?;
                if data.len() as u64 != len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("short read at {new_start}"),
                    ));
                }
                *window = (new_start, data);
                continue;
            }
            let from = usize::try_from(at - start).map_err(std::io::Error::other)?;
            let n = (data.len() - from).min(usize::try_from(want - done).map_err(std::io::Error::other)?);
            let to = usize::try_from(done).map_err(std::io::Error::other)?;
            buf[to..to + n].copy_from_slice(&data[from..from + n]);
            done += n as u64;
        }
        Ok(())
    }
}

/// Puts disk `n` of `manifest` on a datastore as `file`, the way `how` says: a sparse upload
/// to `upload` converted into a VMFS disk of `provisioning` (the upload deleted after), or a
/// flat extent and its descriptor. Returns the disk and a note when it fell back to flat.
#[expect(clippy::too_many_arguments, reason = "one disk's upload needs its source, place and ways to report")]
pub(crate) async fn upload_disk(
    client: &Client,
    repo: &Repo,
    manifest: &Manifest,
    n: usize,
    at: Where<'_>,
    upload: &str,
    file: &str,
    provisioning: Provisioning,
    how: Upload,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<(RestoredDisk, Option<String>), OrchError> {
    match how {
        Upload::Flat => return Ok((upload_flat(client, repo, manifest, n, at, file, progress).await?, None)),
        Upload::Nfc => {
            return Err(OrchError::Refused(
                "an NFC import makes new VMs only: restore into an existing VM with --upload sparse or flat".into(),
            ));
        }
        Upload::Sparse => {}
    }
    let d = &manifest.disks[n];
    let reader = repo.reader(&manifest.id, n)?;
    progress(Progress { step: format!("disk {}: finding its data", d.name), done: 0, total: 0 });
    let data = nonzero_grains(reader.clone(), allocation(&reader).await?).await?;
    let layout = vmdk::SparseLayout::new(d.capacity, &data)?;
    let step = format!("disk {} ({}): upload", d.name, human_bytes(d.capacity));
    let body = sparse_body(reader.clone(), layout.clone(), step, progress);
    let target = DatastoreFile::from_ds_path(at.datacenter_name, upload)?;
    client.datastore_writer()?.put(&target, layout.len(), body).await?;
    check(cancel)?;
    progress(Progress { step: format!("disk {}: converting on the datastore", d.name), done: 0, total: 0 });
    let converted = client.copy_virtual_disk(upload, file, at.datacenter, provisioning, Some(cancel)).await;
    client.delete_datastore_file(upload, at.datacenter).await?;
    match converted {
        Ok(()) => {}
        // The upload was just written, so a server that finds no file to copy looks for
        // another: one that takes only flat disks as a copy's source (vcsim) wants the
        // upload's `-flat.vmdk`, which a hosted sparse file has not.
        Err(e) if e.fault().is_some_and(|f| f.type_name == "FileNotFound") => {
            let note = format!(
                "the server cannot convert a hosted sparse disk ({e}): disk {} was sent whole, as a flat extent",
                d.name
            );
            tracing::warn!("{note}");
            return Ok((upload_flat(client, repo, manifest, n, at, file, progress).await?, Some(note)));
        }
        Err(e) => return Err(e.into()),
    }
    let disk = RestoredDisk {
        slot: d.name.clone(),
        file: file.to_owned(),
        capacity: d.capacity,
        uploaded: layout.len(),
        data: layout.data_bytes(),
    };
    Ok((disk, None))
}

/// Puts disk `n` of `manifest` on a datastore as `file`: every byte as `NAME-flat.vmdk`, then
/// the VMFS descriptor naming it.
async fn upload_flat(
    client: &Client,
    repo: &Repo,
    manifest: &Manifest,
    n: usize,
    at: Where<'_>,
    file: &str,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RestoredDisk, OrchError> {
    const PIECE: u64 = 4 << 20;
    let d = &manifest.disks[n];
    let reader = repo.reader(&manifest.id, n)?;
    let stem = file.strip_suffix(".vmdk").unwrap_or(file);
    let flat = format!("{stem}-flat.vmdk");
    let flat_name = flat.rsplit_once('/').map_or(flat.as_str(), |(_, f)| f);
    let writer = client.datastore_writer()?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let cap = d.capacity;
    let step = format!("disk {} ({}): upload, flat", d.name, human_bytes(cap));
    progress(Progress { step: step.clone(), done: 0, total: cap });
    tokio::task::spawn_blocking(move || {
        let mut at = 0;
        while at < cap {
            let len = PIECE.min(cap - at);
            let piece = reader
                .read(at, len)
                .map(Bytes::from)
                .map_err(|e| std::io::Error::other(format!("reading the restore point at byte {at}: {e}")));
            let failed = piece.is_err();
            if tx.blocking_send(piece).is_err() || failed {
                return;
            }
            at += len;
        }
    });
    writer.put(&DatastoreFile::from_ds_path(at.datacenter_name, &flat)?, cap, ReceiverBody(rx)).await?;
    progress(Progress { step, done: cap, total: cap });
    let text = vmdk::flat_descriptor(cap, flat_name);
    let len = text.len() as u64;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let _ = tx.try_send(Ok(Bytes::from(text)));
    drop(tx);
    let body = ReceiverBody(rx);
    writer.put(&DatastoreFile::from_ds_path(at.datacenter_name, file)?, len, body).await?;
    Ok(RestoredDisk { slot: d.name.clone(), file: file.to_owned(), capacity: cap, uploaded: cap + len, data: cap })
}

/// The data extents of a point's disk (zero chunks are holes).
pub(crate) async fn allocation(reader: &PointReader) -> Result<cbt::ExtentSet, OrchError> {
    let a = pipeline::BlockSource::allocation(reader).await?;
    Ok(a.map(|a| a.data).unwrap_or_else(|| cbt::ExtentSet::from_ranges([(0, reader.size())])))
}

/// The 64 KiB grains of `data` that hold a byte other than zero: only those are sent, so
/// zeros inside a stored chunk stay holes on the datastore. It reads the data once more from
/// the repository (a local read) to save sending zeros over the network.
async fn nonzero_grains(reader: PointReader, data: cbt::ExtentSet) -> Result<cbt::ExtentSet, OrchError> {
    const GRAIN: u64 = vmdk::SparseLayout::GRAIN;
    const PIECE: u64 = 64 * GRAIN;
    let found = tokio::task::spawn_blocking(move || -> Result<Vec<(u64, u64)>, repo::RepoError> {
        let cap = reader.size();
        let mut out = Vec::new();
        for e in data.iter() {
            let mut at = e.start() / GRAIN * GRAIN;
            while at < e.end() {
                let len = PIECE.min(cap - at).min(e.end().div_ceil(GRAIN) * GRAIN - at);
                let bytes = reader.read(at, len)?;
                for (n, grain) in bytes.chunks(usize::try_from(GRAIN).unwrap_or(usize::MAX)).enumerate() {
                    if grain.iter().any(|b| *b != 0) {
                        out.push((at + n as u64 * GRAIN, grain.len() as u64));
                    }
                }
                at += len;
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| OrchError::Refused(format!("the scan of a disk's data stopped: {e}")))??;
    Ok(cbt::ExtentSet::from_ranges(found))
}

/// The bytes of a hosted sparse VMDK of `reader`'s disk, produced as they are sent.
fn sparse_body(
    reader: PointReader,
    layout: vmdk::SparseLayout,
    step: String,
    progress: &(dyn Fn(Progress) + Sync),
) -> ReceiverBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let total = layout.len();
    progress(Progress { step: step.clone(), done: 0, total });
    tokio::task::spawn_blocking(move || {
        let send = |b: Result<Bytes, std::io::Error>| tx.blocking_send(b).is_ok();
        if !send(Ok(Bytes::from(layout.prefix()))) {
            return;
        }
        // Grains come in disk order; neighbours are read together, up to 4 MiB at a time.
        let mut pending: Option<(u64, u64)> = None;
        let flush = |run: (u64, u64)| -> bool {
            match reader.read(run.0, run.1) {
                Ok(mut data) => {
                    let want = usize::try_from(padded(run.1)).unwrap_or(usize::MAX);
                    data.resize(want, 0);
                    send(Ok(Bytes::from(data)))
                }
                Err(e) => {
                    send(Err(std::io::Error::other(format!("reading the restore point at byte {}: {e}", run.0))));
                    false
                }
            }
        };
        for (offset, len) in layout.grains() {
            pending = match pending {
                Some((start, l))
                    if start + padded(l) == offset && l + len <= 4 << 20 && l % vmdk::SparseLayout::GRAIN == 0 =>
                {
                    Some((start, l + len))
                }
                Some(run) => {
                    if !flush(run) {
                        return;
                    }
                    Some((offset, len))
                }
                None => Some((offset, len)),
            };
        }
        if let Some(run) = pending {
            flush(run);
        }
    });
    ReceiverBody(rx)
}

/// An upload's body as its bytes are produced on another thread.
struct ReceiverBody(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl futures_core::Stream for ReceiverBody {
    type Item = Result<Bytes, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// A run's length in the file: whole grains.
fn padded(len: u64) -> u64 {
    len.div_ceil(vmdk::SparseLayout::GRAIN) * vmdk::SparseLayout::GRAIN
}

/// Reads the restored disk back and compares it with the point: a sample, or every byte.
pub(crate) async fn verify_disk(
    client: &Client,
    datacenter_name: &str,
    disk: &RestoredDisk,
    point: &PointReader,
    verify: Verify,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<u64, OrchError> {
    let reader = client.datastore_reader()?;
    let (restored, _) =
        vsphere_io::open_frozen(reader, datacenter_name, &disk.file, disk.capacity, format!("restored {}", disk.file))
            .await
            .map_err(|e| OrchError::Refused(format!("cannot read back {}: {e}", disk.file)))?;
    const PIECE: u64 = 1 << 20;
    let cap = disk.capacity;
    let mut offsets: Vec<u64> = match verify {
        Verify::Full => (0..cap.div_ceil(PIECE)).map(|n| n * PIECE).collect(),
        Verify::Sample => {
            let data = allocation(point).await?;
            let mut v = vec![0, cap.saturating_sub(PIECE) / PIECE * PIECE];
            let extents: Vec<(u64, u64)> = data.iter().map(|e| (e.start(), e.len())).collect();
            let mut x = cap ^ 0x9e37_79b9_7f4a_7c15;
            for _ in 0..32.min(extents.len() * 4) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let (start, len) = extents[usize::try_from(x % extents.len() as u64).unwrap_or(0)];
                v.push((start + x % len.max(1)) / PIECE * PIECE);
            }
            v.sort_unstable();
            v.dedup();
            v
        }
    };
    offsets.retain(|o| *o < cap);
    let total = offsets.len() as u64 * PIECE;
    let step = format!("disk {}: verify", disk.slot);
    let mut done = 0;
    for offset in offsets {
        let len = PIECE.min(cap - offset);
        let mut buf = bytes::BytesMut::zeroed(usize::try_from(len).unwrap_or(0));
        buf = restored.read_at(offset, buf).await?;
        let want = point.read(offset, len)?;
        if buf[..] != want[..] {
            return Err(OrchError::Refused(format!(
                "the restored {} differs from the restore point in the MiB at byte {offset}",
                disk.file
            )));
        }
        done += len;
        progress(Progress { step: step.clone(), done, total });
    }
    Ok(done)
}

pub(crate) async fn exists(
    reader: &vsphere::datastore::DatastoreReader,
    dc: &str,
    ds_path: &str,
) -> Result<bool, OrchError> {
    let file = DatastoreFile::from_ds_path(dc, ds_path)?;
    match reader.size(&file).await {
        Ok(_) => Ok(true),
        Err(vsphere::Error::Http { status: Some(404), .. }) => Ok(false),
        // A directory answers with a listing.
        Err(vsphere::Error::Protocol(_)) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// The datastore for the new VM: the one named, or the only one of the placement's datacenter;
/// refused when it lacks the space the restore takes at its peak (the rule `probe check
/// --restore-to` applies).
async fn pick_datastore(
    client: &Client,
    wanted: Option<&str>,
    placement: &Placement,
    needs: &crate::preflight::restore::RestoreNeeds,
) -> Result<String, OrchError> {
    let in_dc = client.datacenters().await?.into_iter().find(|d| d.moref == placement.datacenter).map(|d| d.datastores);
    let all: Vec<_> = client
        .datastores()
        .await?
        .into_iter()
        .filter(|d| in_dc.as_ref().is_none_or(|set| set.contains(&d.moref)))
        .collect();
    let names: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
    let ds = match wanted {
        Some(w) => all.iter().find(|d| d.name == w).ok_or_else(|| {
            OrchError::Refused(format!(
                "no datastore named {w:?} in datacenter {}; there are: {}",
                placement.datacenter_name,
                names.join(", ")
            ))
        })?,
        None if all.len() == 1 => &all[0],
        None => {
            return Err(OrchError::Refused(format!(
                "several datastores: choose one with --datastore ({})",
                names.join(", ")
            )));
        }
    };
    let need = crate::preflight::restore::space_needed(needs);
    if let Some(free) = ds.free
        && free < need
    {
        return Err(OrchError::Refused(format!(
            "datastore {} has {} free, and this restore takes up to {} (its disks' data{} and one upload beside \
             them): choose another with --datastore",
            ds.name,
            human_bytes(free),
            human_bytes(need),
            if needs.thick { " at full size" } else { "" }
        )));
    }
    Ok(ds.name.clone())
}

async fn map_networks(
    client: &Client,
    placement: &Placement,
    mapping: &[(String, String)],
) -> Result<Vec<(String, (String, MoRef))>, OrchError> {
    if mapping.is_empty() {
        return Ok(Vec::new());
    }
    let all = client.networks(&placement.datacenter).await?;
    mapping
        .iter()
        .map(|(from, to)| {
            let n = all.iter().find(|n| &n.name == to).ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|n| n.name.as_str()).collect();
                OrchError::Refused(format!(
                    "no network named {to:?} in the datacenter; there are: {}",
                    names.join(", ")
                ))
            })?;
            Ok((from.clone(), (n.name.clone(), n.moref.clone())))
        })
        .collect()
}
