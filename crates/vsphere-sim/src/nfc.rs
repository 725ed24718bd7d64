//! NFC import, as vCenter and ESXi (and vcsim) do it: `ResourcePool.ImportVApp` makes the VM of
//! a `VirtualMachineImportSpec` at once, its disks empty, and answers an `HttpNfcLease` (no
//! task) that is `ready` straight away, with one device URL per disk; a `PUT` or `POST` of a
//! streamOptimized VMDK to `/nfc/<lease>/<disk file>` fills that disk (holes kept); then
//! `HttpNfcLeaseProgress` keeps the lease alive, `HttpNfcLeaseComplete` keeps the VM and
//! `HttpNfcLeaseAbort` (or `leaseTimeout` seconds of silence) destroys it and its folder.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use vsphere::MoRef;
use vsphere::xml::escape;

use crate::server::{Resp, plain};
use crate::soap::{Shared, mo, prop, t};
use crate::spec::VmSpec;
use crate::world::{SimFault, World};

/// `HttpNfcLeaseState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    Ready,
    Done,
    Error,
}

impl LeaseState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Done => "done",
            Self::Error => "error",
        }
    }
}

/// One disk a lease lets a client upload.
#[derive(Debug, Clone)]
pub(crate) struct LeaseDevice {
    /// `/<vm moref>/disk:<n>`.
    key: String,
    /// `/<vm name>/disk:<n>`.
    import_key: String,
    /// The disk file's base name (`vm.vmdk`): the URL's last segment.
    target: String,
    disk_key: i32,
    ds: usize,
    capacity: u64,
}

/// An `HttpNfcLease`.
#[derive(Debug)]
pub(crate) struct Lease {
    moref: MoRef,
    vm: MoRef,
    state: LeaseState,
    error: Option<SimFault>,
    devices: Vec<LeaseDevice>,
    /// `https://host:port`, as the client reached the server when it imported.
    base_url: String,
    progress: i32,
    touched: Instant,
    timeout: Duration,
    /// Uploads being received: the lease does not time out under them.
    uploads: u32,
}

fn invalid_state(lease: &Lease) -> SimFault {
    SimFault::new(
        "InvalidState",
        format!("The operation is not allowed in the current state: the lease is {}", lease.state.as_str()),
    )
}

/// Grows a streamOptimized body may have over its disk's capacity: markers, padding, grain
/// tables, metadata (a grain of 8 sectors that does not compress pads to 9).
fn body_limit(capacity: u64) -> u64 {
    capacity.saturating_add(capacity / 4).saturating_add(8 << 20)
}

impl World {
    /// `ResourcePool.ImportVApp` with a `VirtualMachineImportSpec`: the VM made as
    /// `CreateVM_Task` makes it (in `folder`, or the datacenter's VM folder), and its lease.
    pub(crate) fn import_vapp(
        &mut self,
        pool: &MoRef,
        spec: VmSpec,
        folder: Option<&MoRef>,
        host: Option<&MoRef>,
        base_url: String,
    ) -> Result<MoRef, SimFault> {
        let p = self.pools().into_iter().find(|p| p.moref == *pool).ok_or_else(|| {
            SimFault::new("ManagedObjectNotFound", format!("no resource pool {}", pool.value))
                .with_detail(format!(r#"<obj type="ResourcePool">{}</obj>"#, escape(&pool.value)))
        })?;
        self.require(pool, "VApp.Import")?;
        let folder = folder.cloned().unwrap_or_else(|| self.vm_folder(p.dc));
        let vm = self.create_vm(&folder, spec, pool, host, None)?;
        let v = &self.vms[self.vm_index(&vm).ok_or_else(|| SimFault::new("SystemError", "the VM vanished"))?];
        let mut devices: Vec<LeaseDevice> = Vec::new();
        for (n, d) in v.disks.iter().enumerate() {
            let base = d.base_name.rsplit('/').next().unwrap_or(&d.base_name).to_owned();
            // Two disks of one base name (in two folders): the second's URL names it apart.
            let target = if devices.iter().any(|x| x.target == base) {
                format!("{}-{n}.vmdk", base.strip_suffix(".vmdk").unwrap_or(&base))
            } else {
                base
            };
            devices.push(LeaseDevice {
                key: format!("/{}/disk:{n}", v.moref.value),
                import_key: format!("/{}/disk:{n}", v.name),
                target,
                disk_key: d.key,
                ds: d.ds,
                capacity: d.capacity,
            });
        }
        let moref = MoRef::new("HttpNfcLease", &format!("lease-{}", self.id()));
        let lease = Lease {
            moref: moref.clone(),
            vm,
            state: LeaseState::Ready,
            error: None,
            devices,
            base_url,
            progress: 0,
            touched: Instant::now(),
            timeout: Duration::from_secs(self.cfg.lease_timeout),
            uploads: 0,
        };
        self.leases.insert(moref.value.clone(), lease);
        Ok(moref)
    }

    fn lease_mut(&mut self, m: &MoRef) -> Result<&mut Lease, SimFault> {
        self.leases.get_mut(&m.value).filter(|l| l.moref.kind == m.kind).ok_or_else(|| {
            SimFault::new(
                "ManagedObjectNotFound",
                format!("The object 'HttpNfcLease:{}' has already been deleted", m.value),
            )
        })
    }

    /// `HttpNfcLeaseProgress`: recorded, and the lease lives on.
    pub(crate) fn lease_progress(&mut self, m: &MoRef, percent: i32) -> Result<(), SimFault> {
        let l = self.lease_mut(m)?;
        if l.state != LeaseState::Ready {
            return Err(invalid_state(l));
        }
        if !(0..=100).contains(&percent) {
            return Err(SimFault::new("InvalidArgument", format!("percent {percent}"))
                .with_detail("<invalidProperty>percent</invalidProperty>"));
        }
        l.progress = percent;
        l.touched = Instant::now();
        Ok(())
    }

    /// `HttpNfcLeaseComplete`: the lease is done, the VM stays.
    pub(crate) fn lease_complete(&mut self, m: &MoRef) -> Result<(), SimFault> {
        let l = self.lease_mut(m)?;
        if l.state != LeaseState::Ready {
            return Err(invalid_state(l));
        }
        l.state = LeaseState::Done;
        l.progress = 100;
        Ok(())
    }

    /// `HttpNfcLeaseAbort`: the lease fails with `fault` and nothing of the import is left.
    pub(crate) fn lease_abort(&mut self, m: &MoRef, fault: SimFault) -> Result<(), SimFault> {
        let l = self.lease_mut(m)?;
        if l.state != LeaseState::Ready {
            return Err(invalid_state(l));
        }
        let id = l.moref.value.clone();
        self.fail_lease(&id, fault);
        Ok(())
    }

    fn fail_lease(&mut self, id: &str, fault: SimFault) {
        let Some(l) = self.leases.get_mut(id) else { return };
        l.state = LeaseState::Error;
        l.error = Some(fault);
        let vm = l.vm.clone();
        if let Some(vi) = self.vm_index(&vm) {
            self.discard_vm(vi);
        }
    }

    /// Aborts the ready leases nothing has touched for their timeout; how long until the next
    /// may time out.
    pub(crate) fn expire_leases(&mut self) -> Option<Duration> {
        let stale: Vec<String> = self
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Ready && l.uploads == 0 && l.touched.elapsed() >= l.timeout)
            .map(|l| l.moref.value.clone())
            .collect();
        for id in stale {
            let f = SimFault::new("Timedout", "The lease timed out: no progress was reported");
            self.fail_lease(&id, f);
        }
        self.leases
            .values()
            .filter(|l| l.state == LeaseState::Ready)
            .map(|l| l.timeout.saturating_sub(l.touched.elapsed()))
            .min()
    }

    /// A property of a lease.
    pub(crate) fn lease_property(&self, obj: &MoRef, p: &str) -> Result<Option<String>, SimFault> {
        let l = self
            .leases
            .get(&obj.value)
            .ok_or_else(|| SimFault::new("ManagedObjectNotFound", format!("no lease {}", obj.value)))?;
        Ok(match p {
            "state" => Some(prop(p, "HttpNfcLeaseState", l.state.as_str())),
            "info" => Some(prop(p, "HttpNfcLeaseInfo", &self.lease_info(l))),
            "error" => l.error.as_ref().map(|e| {
                prop(
                    p,
                    "LocalizedMethodFault",
                    &format!(
                        r#"<fault xsi:type="{}">{}</fault>{}"#,
                        escape(&e.kind),
                        e.detail,
                        t("localizedMessage", &e.message)
                    ),
                )
            }),
            "initializeProgress" => Some(prop(p, "xsd:int", "100")),
            "transferProgress" => Some(prop(p, "xsd:int", &l.progress.to_string())),
            "mode" => Some(prop(p, "xsd:string", "pushOrGet")),
            _ => return Err(SimFault::new("InvalidProperty", format!("no property {p}"))),
        })
    }

    fn lease_info(&self, l: &Lease) -> String {
        let mut urls = String::new();
        for d in &l.devices {
            let _ = write!(
                urls,
                r#"<deviceUrl xsi:type="HttpNfcLeaseDeviceUrl">{}{}{}{}{}{}{}{}</deviceUrl>"#,
                t("key", &d.key),
                t("importKey", &d.import_key),
                t("url", format!("{}/nfc/{}/{}", l.base_url, l.moref.value, d.target)),
                t("sslThumbprint", &self.thumbprint),
                t("disk", true),
                t("targetId", &d.target),
                t("datastoreKey", self.datastores.get(d.ds).map_or("", |x| x.moref.value.as_str())),
                t("fileSize", 0),
            );
        }
        let total_kb: u64 = l.devices.iter().map(|d| d.capacity / 1024).sum();
        format!(
            "{}{}{urls}{}{}",
            mo("lease", &l.moref),
            mo("entity", &l.vm),
            t("totalDiskCapacityInKB", total_kb),
            t("leaseTimeout", l.timeout.as_secs())
        )
    }
}

/// Watches a lease and aborts it once it times out, so a forgotten import leaves nothing even
/// when no request comes.
pub(crate) fn watch(state: &Shared, id: String) {
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            let wait = {
                let mut w = state.lock().unwrap_or_else(|p| p.into_inner());
                w.expire_leases();
                match w.leases.get(&id) {
                    Some(l) if l.state == LeaseState::Ready => l.timeout.saturating_sub(l.touched.elapsed()),
                    _ => return,
                }
            };
            tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
        }
    });
}

/// The `scheme://host:port` device URLs name: the `Host` the client sent (when it looks like
/// a host), else the address the simulator listens on.
pub(crate) fn base_url(w: &World, host: Option<&str>) -> String {
    let ok = |h: &&str| {
        !h.is_empty() && h.len() < 256 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    };
    format!("{}://{}", w.endpoint.0, host.filter(ok).unwrap_or(&w.endpoint.1))
}

/// Where one upload goes: the disk's data file and the temporary files beside the datastores.
struct Upload {
    lease: String,
    device: LeaseDevice,
    flat: PathBuf,
    spool: PathBuf,
    decoded: PathBuf,
}

/// `PUT`/`POST /nfc/<lease>/<name>`: a streamOptimized VMDK into that disk of a ready lease.
/// 200 once written; 404 for an unknown (or finished) lease or name; 413 past the disk's
/// capacity and the format's overhead; 400 for a stream that does not parse or whose capacity
/// is not the disk's (the disk is left as it was).
pub(crate) async fn upload(state: &Shared, req: http::Request<Incoming>, lease: &str, name: &str) -> Resp {
    let up = {
        let mut w = state.lock().unwrap_or_else(|p| p.into_inner());
        w.expire_leases();
        match begin(&mut w, lease, name) {
            Ok(u) => u,
            Err((status, why)) => return plain(status, why),
        }
    };
    let limit = body_limit(up.device.capacity);
    let declared = req.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let received = if declared.is_some_and(|d| d > limit) {
        Err((413, format!("a stream for a disk of {} bytes is at most {limit} bytes", up.device.capacity)))
    } else {
        crate::server::receive(req.into_body(), &up.spool, limit, declared).await
    };
    let decoded = match received {
        Ok(()) => {
            let (spool, decoded, capacity, target) =
                (up.spool.clone(), up.decoded.clone(), up.device.capacity, up.device.target.clone());
            tokio::task::spawn_blocking(move || decode(&spool, &decoded, capacity, &target))
                .await
                .unwrap_or_else(|e| Err((500, format!("decoding the stream: {e}"))))
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&up.spool);
    if let Some(folder) = up.spool.parent() {
        let _ = std::fs::remove_dir(folder);
    }
    let mut w = state.lock().unwrap_or_else(|p| p.into_inner());
    let answer = decoded.and_then(|written| finish(&mut w, &up, &written));
    if answer.is_err() {
        let _ = std::fs::remove_file(&up.decoded);
    }
    if let Some(l) = w.leases.get_mut(&up.lease) {
        l.uploads = l.uploads.saturating_sub(1);
        l.touched = Instant::now();
    }
    match answer {
        Ok(()) => plain(200, ""),
        Err((status, why)) => plain(status, why),
    }
}

fn begin(w: &mut World, lease: &str, name: &str) -> Result<Upload, (u16, String)> {
    let n = w.id();
    let tmp = w.root.join(".nfc");
    let Some(l) = w.leases.get(lease) else { return Err((404, format!("no lease {lease}"))) };
    if l.state != LeaseState::Ready {
        return Err((404, format!("lease {lease} is {}", l.state.as_str())));
    }
    let Some(device) = l.devices.iter().find(|d| d.target == name).cloned() else {
        return Err((404, format!("lease {lease} has no disk {name}")));
    };
    let vi = w.vm_index(&l.vm).ok_or_else(|| (404, "the lease's VM is gone".to_owned()))?;
    let d = w.vms[vi]
        .disks
        .iter()
        .find(|d| d.key == device.disk_key)
        .ok_or_else(|| (404, format!("the VM no longer has disk {name}")))?;
    let flat = w.ds_path(d.ds, &d.flat_name);
    let folder = tmp.join(format!("upload-{n}"));
    std::fs::create_dir_all(&folder).map_err(|e| (500, format!("{}: {e}", folder.display())))?;
    if let Some(l) = w.leases.get_mut(lease) {
        l.uploads += 1;
        l.touched = Instant::now();
    }
    Ok(Upload {
        lease: lease.to_owned(),
        device,
        flat,
        spool: tmp.join(format!("upload-{n}")).join("stream.vmdk"),
        decoded: tmp.join(format!("decoded-{n}-flat.vmdk")),
    })
}

/// Decodes the streamOptimized file `spool` (alone in its folder) into a new sparse file `out`
/// of `capacity` bytes, writing only grains that hold data; the byte ranges written. It reads
/// the whole file through `vmdk::Disk` (grain directory from the footer), not the client's
/// sequential stream reader, so the two do not share one reading of the format.
fn decode(spool: &Path, out: &Path, capacity: u64, name: &str) -> Result<Vec<(u64, u64)>, (u16, String)> {
    const PIECE: usize = 1 << 20;
    const GRAIN: usize = 64 << 10;
    let bad = |e: String| (400, format!("{name}: not a streamOptimized VMDK: {e}"));
    let mut magic = [0u8; 4];
    let read = File::open(spool).and_then(|f| f.read_exact_at(&mut magic, 0));
    if read.is_err() || &magic != b"KDMV" {
        return Err(bad("no sparse header".into()));
    }
    let disk = vmdk::Disk::open(spool, vmdk::PathPolicy::SameDirectory).map_err(|e| bad(e.to_string()))?;
    let layers = disk.layers();
    if layers.len() != 1 || layers[0].create_type != "streamOptimized" {
        let kind = layers.first().map_or("", |l| l.create_type.as_str());
        return Err(bad(format!("a {kind} disk of {} layers", layers.len())));
    }
    if disk.capacity() != capacity {
        return Err((
            400,
            format!("{name}: the stream's capacity is {} bytes, the disk's {capacity}", disk.capacity()),
        ));
    }
    let data = disk.allocation().map_err(|e| bad(e.to_string()))?.data;
    let file = File::create(out).and_then(|f| f.set_len(capacity).map(|()| f));
    let file = file.map_err(|e| (500, format!("{}: {e}", out.display())))?;
    let mut written = Vec::new();
    let mut buf = vec![0u8; PIECE];
    for e in data.clamp(capacity).iter() {
        let mut at = e.start();
        while at < e.end() {
            let n = usize::try_from(e.end() - at).map_or(PIECE, |left| left.min(PIECE));
            disk.read_at(&mut buf[..n], at).map_err(|e| bad(e.to_string()))?;
            for (k, g) in buf[..n].chunks(GRAIN).enumerate() {
                if g.iter().any(|&b| b != 0) {
                    let off = at + (k * GRAIN) as u64;
                    file.write_all_at(g, off).map_err(|e| (500, format!("{}: {e}", out.display())))?;
                    written.push((off, g.len() as u64));
                }
            }
            at += n as u64;
        }
    }
    file.sync_all().map_err(|e| (500, format!("{}: {e}", out.display())))?;
    Ok(written)
}

/// Puts a decoded disk in place, if its lease is still ready; CBT marks what it wrote.
fn finish(w: &mut World, up: &Upload, written: &[(u64, u64)]) -> Result<(), (u16, String)> {
    let ready = w.leases.get(&up.lease).is_some_and(|l| l.state == LeaseState::Ready);
    let vm = w.leases.get(&up.lease).map(|l| l.vm.clone());
    let vi = vm.and_then(|m| w.vm_index(&m)).filter(|_| ready);
    let Some(vi) = vi else { return Err((409, "the lease ended during the upload".to_owned())) };
    std::fs::rename(&up.decoded, &up.flat).map_err(|e| (500, format!("{}: {e}", up.flat.display())))?;
    let block = w.cfg.cbt_block.max(1);
    if let Some(t) = w.vms[vi].disks.iter_mut().find(|d| d.key == up.device.disk_key).and_then(|d| d.track.as_mut()) {
        for &(at, len) in written {
            if let Some(e) = cbt::Extent::from_bounds(at / block * block, (at + len).div_ceil(block) * block) {
                t.pending.insert(e);
            }
        }
    }
    Ok(())
}

/// The fault `HttpNfcLeaseAbort` names (its type and message), or `RequestCanceled`.
pub(crate) fn abort_fault(call: &vsphere::xml::Element) -> SimFault {
    let given = call.child("fault");
    // The method fault inside the LocalizedMethodFault (and inside any wrapping of it).
    let mut inner = given.and_then(|f| f.child("fault"));
    for _ in 0..4 {
        match inner {
            Some(f) if f.xsi_type.as_deref().is_some_and(|k| k.ends_with("LocalizedMethodFault")) => {
                inner = f.child("fault");
            }
            _ => break,
        }
    }
    let kind = inner.and_then(|f| f.xsi_type.clone());
    let message = given.and_then(|f| f.text_of("localizedMessage")).map(str::to_owned);
    match kind.filter(|k| {
        !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b':')
    }) {
        Some(k) => {
            let k = k.rsplit(':').next().unwrap_or(&k).to_owned();
            SimFault::new(&k, message.unwrap_or_else(|| "The import was aborted by the client".into()))
        }
        None => {
            SimFault::new("RequestCanceled", message.unwrap_or_else(|| "The operation was canceled by the user".into()))
        }
    }
}
