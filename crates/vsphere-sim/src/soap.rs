//! The simulator's SOAP side: one request in, one answer out, for the methods backup uses
//! (and `RetrieveProperties`, which pyvmomi's property access calls). Answers carry `xsi:type`
//! wherever the WSDL says `anyType`, so a strict client such as pyvmomi reads them.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vsphere::xml::{self, Element, Limits, Ns, escape};
use vsphere::{ConnectionState, DrsBehavior, MoRef};

use crate::world::{Collector, SimFault, TaskRec, VmState, World, iso_now};

/// What a handler answers: the HTTP status, a session cookie to set, the body.
pub(crate) struct Answer {
    pub status: u16,
    pub set_cookie: Option<String>,
    pub body: String,
}

fn envelope(inner: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"#
    )
}

fn ok(method: &str, inner: &str) -> Answer {
    Answer {
        status: 200,
        set_cookie: None,
        body: envelope(&format!(r#"<{method}Response xmlns="urn:vim25">{inner}</{method}Response>"#)),
    }
}

fn fault_detail(f: &SimFault, obj: Option<&MoRef>) -> String {
    if !f.detail.is_empty() {
        return f.detail.clone();
    }
    match f.kind.as_str() {
        "FileFault" | "FileNotFound" | "FileLocked" | "NoDiskSpace" | "FileAlreadyExists" => {
            format!("<file>{}</file>", escape(&f.message))
        }
        "ManagedObjectNotFound" | "NotAuthenticated" => obj.map(|o| mo("obj", o)).unwrap_or_default(),
        "InvalidArgument" => "<invalidProperty>changeId</invalidProperty>".into(),
        _ => String::new(),
    }
}

fn fault(f: &SimFault, obj: Option<&MoRef>) -> Answer {
    let k = &f.kind;
    let inner = format!(
        r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{}</faultstring><detail><{k}Fault xmlns="urn:vim25" xsi:type="{k}">{}</{k}Fault></detail></soapenv:Fault>"#,
        escape(&f.message),
        fault_detail(f, obj)
    );
    Answer { status: 500, set_cookie: None, body: envelope(&inner) }
}

pub(crate) fn mo(tag: &str, m: &MoRef) -> String {
    format!(r#"<{tag} type="{}">{}</{tag}>"#, escape(&m.kind), escape(&m.value))
}

pub(crate) fn typed_mo(tag: &str, m: &MoRef) -> String {
    format!(r#"<{tag} type="{}" xsi:type="ManagedObjectReference">{}</{tag}>"#, escape(&m.kind), escape(&m.value))
}

pub(crate) fn t(tag: &str, v: impl std::fmt::Display) -> String {
    format!("<{tag}>{}</{tag}>", escape(&v.to_string()))
}

/// The shared state and the root of the datastores.
pub(crate) type Shared = Arc<Mutex<World>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, World> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Methods that need no session.
const OPEN: &[&str] = &["RetrieveServiceContent", "Login", "CurrentTime", "RetrieveInternalContent"];

/// Answers one SOAP request; `host` is the `Host` it came with (NFC device URLs name it).
pub(crate) async fn handle(state: &Shared, cookie: Option<&str>, host: Option<&str>, body: &[u8]) -> Answer {
    let answer = answer(state, cookie, host, body).await;
    let late = {
        let mut w = lock(state);
        match &w.faults.late_answer {
            Some((method, _)) if answer.body.contains(&format!("<{method}Response")) => w.faults.late_answer.take(),
            _ => None,
        }
    };
    if let Some((_, delay)) = late {
        tokio::time::sleep(delay).await;
    }
    // SYNCPROXY_SIM_TRACE=DIR keeps the last answer to each method there (fuzz seeds, debugging).
    if let Some(dir) = std::env::var_os("SYNCPROXY_SIM_TRACE") {
        let method = answer.body.split("Response xmlns").next().and_then(|h| h.rsplit('<').next()).unwrap_or("Fault");
        let name = if answer.status == 500 { "Fault".to_owned() } else { method.to_owned() };
        let _ = std::fs::write(std::path::Path::new(&dir).join(format!("sim-{name}.xml")), &answer.body);
    }
    answer
}

async fn answer(state: &Shared, cookie: Option<&str>, host: Option<&str>, body: &[u8]) -> Answer {
    let delay = lock(state).faults.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let doc = match xml::parse(body, Limits { max_bytes: 16 << 20, ..Limits::default() }) {
        Ok(d) => d,
        Err(e) => return fault(&SimFault::new("InvalidRequest", e.to_string()), None),
    };
    let Some(call) =
        doc.children.iter().find(|c| c.ns == Ns::SoapEnv && c.name == "Body").and_then(|b| b.children.first()).cloned()
    else {
        return fault(&SimFault::new("InvalidRequest", "no SOAP body"), None);
    };
    let method = call.name.clone();
    let this = call.child("_this").and_then(MoRef::from_element);
    {
        let mut w = lock(state);
        w.calls += 1;
        if !OPEN.contains(&method.as_str()) {
            if std::mem::take(&mut w.faults.expire_sessions) {
                w.sessions.clear();
            }
            if !cookie.is_some_and(|c| w.sessions.contains(c)) {
                let f = SimFault::new("NotAuthenticated", "The session is not authenticated.");
                return fault(&f, this.as_ref());
            }
        }
    }
    match method.as_str() {
        "WaitForUpdatesEx" | "WaitForUpdates" => wait_for_updates(state, &method, &call).await,
        _ => {
            let mut w = lock(state);
            w.expire_leases();
            dispatch(&mut w, state, &method, this.as_ref(), &call, host)
        }
    }
}

fn dispatch(
    w: &mut World,
    state: &Shared,
    method: &str,
    this: Option<&MoRef>,
    call: &Element,
    host: Option<&str>,
) -> Answer {
    let text = |n: &str| call.text_of(n).map(|s| s.trim().to_owned());
    match method {
        "RetrieveServiceContent" => ok(method, &service_content(w)),
        "CurrentTime" => ok(method, &format!(r#"<returnval>{}</returnval>"#, iso_now())),
        "Login" => {
            let (user, pass) = (text("userName").unwrap_or_default(), call.text_of("password").unwrap_or_default());
            if user != w.cfg.user || pass != w.cfg.password {
                return fault(
                    &SimFault::new("InvalidLogin", "Cannot complete login due to an incorrect user name or password."),
                    None,
                );
            }
            let key = format!("{:016x}{:016x}", w.id().wrapping_mul(0x9e37_79b9_7f4a_7c15), std::process::id());
            let cookie = format!(r#"vmware_soap_session="{key}""#);
            w.sessions.insert(cookie.clone());
            let now = iso_now();
            let mut a = ok(
                method,
                &format!(
                    "<returnval>{}{}{}{}{}{}{}<extensionSession>false</extensionSession></returnval>",
                    t("key", &key),
                    t("userName", &user),
                    t("fullName", &user),
                    t("loginTime", &now),
                    t("lastActiveTime", &now),
                    t("locale", "en"),
                    t("messageLocale", "en")
                ),
            );
            a.set_cookie = Some(format!("{cookie}; Path=/; HttpOnly; Secure;"));
            a
        }
        "Logout" => ok(method, ""),
        "CreateContainerView" => {
            let kinds: Vec<String> = call.children_named("type").map(|e| e.text.trim().to_owned()).collect();
            let n = w.id();
            let id = format!("session[{}]view-{n}", w.instance_uuid);
            w.views.insert(id.clone(), kinds);
            ok(method, &mo("returnval", &MoRef::new("ContainerView", &id)))
        }
        "DestroyView" => {
            if let Some(v) = this {
                w.views.remove(&v.value);
            }
            ok(method, "")
        }
        "FindByUuid" => {
            let uuid = text("uuid").unwrap_or_default();
            let instance = text("instanceUuid").is_some_and(|s| s == "true");
            let found = w.vms.iter().find(|v| if instance { v.instance_uuid == uuid } else { v.uuid == uuid });
            ok(method, &found.map(|v| mo("returnval", &v.moref)).unwrap_or_default())
        }
        "FindByInventoryPath" => {
            let path = text("inventoryPath").unwrap_or_default();
            let found = path.split_once("/vm/").and_then(|(dc, name)| {
                w.vms.iter().find(|v| v.name == name && w.datacenters[v.dc].name == dc).map(|v| v.moref.clone())
            });
            ok(method, &found.map(|m| mo("returnval", &m)).unwrap_or_default())
        }
        "RetrievePropertiesEx" | "RetrieveProperties" => retrieve(w, method, call),
        "ContinueRetrievePropertiesEx" => {
            let token = text("token").unwrap_or_default();
            match w.pages.remove(&token) {
                Some((rest, size)) => ok(method, &page(w, rest, size)),
                None => fault(&SimFault::new("InvalidArgument", format!("no such token {token}")), None),
            }
        }
        "CancelRetrievePropertiesEx" => {
            w.pages.remove(&text("token").unwrap_or_default());
            ok(method, "")
        }
        "CreateSnapshot_Task"
        | "RemoveSnapshot_Task"
        | "ReconfigVM_Task"
        | "ConsolidateVMDisks_Task"
        | "ReconfigureComputeResource_Task"
        | "DeleteDatastoreFile_Task"
        | "CreateVM_Task"
        | "RegisterVM_Task"
        | "PowerOnVM_Task"
        | "PowerOffVM_Task"
        | "Destroy_Task"
        | "Rename_Task"
        | "CreateVirtualDisk_Task"
        | "CopyVirtualDisk_Task"
        | "DeleteVirtualDisk_Task" => match this {
            Some(obj) => start_task(w, state, method, obj.clone(), call),
            None => fault(&SimFault::new("InvalidRequest", "no _this"), None),
        },
        "StartProgramInGuest" | "ListProcessesInGuest" | "TerminateProcessInGuest" => {
            let Some(vi) = call.child("vm").and_then(MoRef::from_element).and_then(|m| w.vm_index(&m)) else {
                return fault(&SimFault::new("ManagedObjectNotFound", "no such VM"), this);
            };
            let auth = call.child("auth");
            let user = auth.and_then(|a| a.text_of("username")).unwrap_or_default().trim().to_owned();
            let password = auth.and_then(|a| a.text_of("password")).unwrap_or_default().to_owned();
            match method {
                "StartProgramInGuest" => {
                    let spec = call.child("spec");
                    let program = spec.and_then(|s| s.text_of("programPath")).unwrap_or_default().trim().to_owned();
                    let args = spec.and_then(|s| s.text_of("arguments")).unwrap_or_default().to_owned();
                    match w.start_guest_program(vi, &user, &password, &program, &args) {
                        Ok(pid) => ok(method, &t("returnval", pid)),
                        Err(f) => fault(&f, this),
                    }
                }
                _ if user != "root" || w.vms[vi].guest_password.as_deref() != Some(password.as_str()) => fault(
                    &SimFault::new("InvalidGuestLogin", "Failed to authenticate with the guest operating system"),
                    this,
                ),
                "ListProcessesInGuest" => {
                    let pids: Vec<i64> =
                        call.children_named("pids").filter_map(|p| p.text.trim().parse().ok()).collect();
                    let now = std::time::SystemTime::now();
                    let mut inner = String::new();
                    for r in w.vms[vi].guest_runs.iter().filter(|r| pids.is_empty() || pids.contains(&r.pid)) {
                        let ended = r.terminated || r.ends <= now;
                        let _ = write!(
                            inner,
                            "<returnval>{}{}{}{}{}",
                            t("name", &r.program),
                            t("pid", r.pid),
                            t("owner", "root"),
                            t("cmdLine", format!("{} {}", r.program, r.arguments)),
                            t("startTime", iso_now())
                        );
                        if ended {
                            let _ = write!(inner, "{}{}", t("endTime", iso_now()), t("exitCode", r.exit_code));
                        }
                        inner.push_str("</returnval>");
                    }
                    ok(method, &inner)
                }
                _ => {
                    let pid: i64 = call.parse_of("pid").unwrap_or(-1);
                    match w.vms[vi].guest_runs.iter_mut().find(|r| r.pid == pid) {
                        Some(r) => {
                            r.terminated = true;
                            r.exit_code = -1;
                            ok(method, "")
                        }
                        None => fault(&SimFault::new("GuestProcessNotFound", format!("no process {pid}")), this),
                    }
                }
            }
        }
        "HasPrivilegeOnEntity" => {
            let (Some(entity), Some(session)) = (call.child("entity").and_then(MoRef::from_element), text("sessionId"))
            else {
                return fault(&SimFault::new("InvalidArgument", "entity and sessionId are required"), this);
            };
            if !w.sessions.iter().any(|c| c.contains(&format!("\"{session}\""))) {
                return fault(&SimFault::new("InvalidArgument", "sessionId names no session"), this);
            }
            let ids: Vec<String> = call.children_named("privId").map(|e| e.text.trim().to_owned()).collect();
            if let Some(unknown) = ids.iter().find(|id| !w.privilege_ids().contains(&id.as_str())) {
                return fault(&SimFault::new("InvalidArgument", format!("unknown privilege {unknown}")), this);
            }
            let name = w.entity_name(&entity);
            let mut inner = String::new();
            for id in &ids {
                let denied = w.cfg.denied.iter().any(|d| {
                    (d.entity == "*" || Some(d.entity.as_str()) == name.as_deref()) && d.privileges.contains(id)
                });
                inner.push_str(&t("returnval", !denied));
            }
            ok(method, &inner)
        }
        "QueryChangedDiskAreas" => {
            let Some(vm) = this.and_then(|m| w.vm_index(m)) else {
                return fault(&SimFault::new("ManagedObjectNotFound", "no such VM"), this);
            };
            let snap = call.child("snapshot").and_then(MoRef::from_element);
            let key: i32 = call.parse_of("deviceKey").unwrap_or(-1);
            let start: u64 = call.parse_of("startOffset").unwrap_or(u64::MAX);
            match w.qcda(vm, snap.as_ref(), key, start, &text("changeId").unwrap_or_default()) {
                Ok((s, len, areas)) => {
                    let mut inner = format!("<returnval>{}{}", t("startOffset", s), t("length", len));
                    for e in areas.iter() {
                        let _ = write!(
                            inner,
                            "<changedArea>{}{}</changedArea>",
                            t("start", e.start()),
                            t("length", e.len())
                        );
                    }
                    inner.push_str("</returnval>");
                    ok(method, &inner)
                }
                Err(f) => fault(&f, this),
            }
        }
        "CreatePropertyCollector" => {
            let n = w.id();
            let id = format!("session[{}]pc-{n}", w.instance_uuid);
            w.collectors.insert(id.clone(), Collector::default());
            ok(method, &mo("returnval", &MoRef::new("PropertyCollector", &id)))
        }
        "DestroyPropertyCollector" => {
            if let Some(pc) = this {
                w.collectors.remove(&pc.value);
            }
            ok(method, "")
        }
        "CreateFilter" => {
            let pc = this.map(|m| m.value.clone()).unwrap_or_default();
            let objs: Vec<MoRef> = call
                .child("spec")
                .map(|s| {
                    s.children_named("objectSet")
                        .filter_map(|o| o.child("obj"))
                        .filter_map(MoRef::from_element)
                        .collect()
                })
                .unwrap_or_default();
            let n = w.id();
            let id = format!("session[{}]filter-{n}", w.instance_uuid);
            // The service's own collector exists without being created (pyvmomi waits on it).
            let main = main_collector(w);
            if pc == main {
                w.collectors.entry(pc.clone()).or_default();
            }
            match w.collectors.get_mut(&pc) {
                Some(c) => {
                    c.filters.insert(id.clone(), objs);
                    ok(method, &mo("returnval", &MoRef::new("PropertyFilter", &id)))
                }
                None => fault(&SimFault::new("ManagedObjectNotFound", "no such property collector"), this),
            }
        }
        "DestroyPropertyFilter" => {
            if let Some(f) = this {
                for c in w.collectors.values_mut() {
                    c.filters.remove(&f.value);
                }
            }
            ok(method, "")
        }
        "CancelTask" => {
            if let Some(task) = this.and_then(|m| w.tasks.get_mut(&m.value)) {
                if task.state == "running" || task.state == "queued" {
                    task.cancelled = true;
                }
                ok(method, "")
            } else {
                fault(&SimFault::new("ManagedObjectNotFound", "no such task"), this)
            }
        }
        // pyvmomi reads one property of one object this way.
        "Fetch" => {
            let (Some(obj), Some(p)) = (this, text("prop")) else {
                return fault(&SimFault::new("InvalidRequest", "Fetch needs _this and prop"), this);
            };
            match property(w, obj, &p) {
                Ok(Some(ps)) => {
                    // `<propSet><name>p</name><val ...>...</val></propSet>` -> `<returnval ...>...</returnval>`
                    let head = format!("<propSet><name>{p}</name><val");
                    let inner = ps
                        .strip_prefix(&head)
                        .and_then(|r| r.strip_suffix("</val></propSet>"))
                        .map(|r| format!("<returnval{r}</returnval>"))
                        .unwrap_or_default();
                    ok(method, &inner)
                }
                Ok(None) => ok(method, ""),
                Err(f) => fault(&f, Some(obj)),
            }
        }
        "MakeDirectory" => {
            let dc = call.child("datacenter").and_then(MoRef::from_element);
            let parents = text("createParentDirectories").is_some_and(|p| p == "true");
            match w.make_directory(&text("name").unwrap_or_default(), dc.as_ref(), parents) {
                Ok(()) => ok(method, ""),
                Err(f) => fault(&f, this),
            }
        }
        "UnregisterVM" => {
            let Some(vi) = this.and_then(|m| w.vm_index(m)) else {
                return fault(&SimFault::new("ManagedObjectNotFound", "no such VM"), this);
            };
            match w.unregister_vm(vi) {
                Ok(()) => ok(method, ""),
                Err(f) => fault(&f, this),
            }
        }
        "ImportVApp" => {
            let Some(pool) = this.filter(|m| m.kind == "ResourcePool") else {
                return fault(&SimFault::new("InvalidRequest", "ImportVApp is a ResourcePool's"), this);
            };
            let Some(spec) = call.child("spec") else {
                return fault(
                    &SimFault::new("InvalidArgument", "a spec is required")
                        .with_detail("<invalidProperty>spec</invalidProperty>"),
                    this,
                );
            };
            if spec.xsi_type.as_deref().is_some_and(|k| k.rsplit(':').next() != Some("VirtualMachineImportSpec")) {
                return fault(
                    &SimFault::new("NotSupported", "the simulator imports VirtualMachineImportSpec only, not vApps"),
                    this,
                );
            }
            let Some(config) = spec.child("configSpec") else {
                return fault(
                    &SimFault::new("InvalidArgument", "spec.configSpec is required")
                        .with_detail("<invalidProperty>spec.configSpec</invalidProperty>"),
                    this,
                );
            };
            let folder = call.child("folder").and_then(MoRef::from_element);
            let target = call.child("host").and_then(MoRef::from_element);
            let base = crate::nfc::base_url(w, host);
            let made = crate::spec::vm_spec(config)
                .and_then(|vm| w.import_vapp(pool, vm, folder.as_ref(), target.as_ref(), base));
            match made {
                Ok(lease) => {
                    crate::nfc::watch(state, lease.value.clone());
                    ok(method, &mo("returnval", &lease))
                }
                Err(f) => fault(&f, this),
            }
        }
        "HttpNfcLeaseProgress" | "HttpNfcLeaseComplete" | "HttpNfcLeaseAbort" => {
            let Some(lease) = this else { return fault(&SimFault::new("InvalidRequest", "no _this"), None) };
            let done = match method {
                "HttpNfcLeaseProgress" => w.lease_progress(lease, call.parse_of("percent").unwrap_or(-1)),
                "HttpNfcLeaseComplete" => w.lease_complete(lease),
                _ => w.lease_abort(lease, crate::nfc::abort_fault(call)),
            };
            match done {
                Ok(()) => ok(method, ""),
                Err(f) => fault(&f, this),
            }
        }
        "AcquireGenericServiceTicket" => {
            let id = format!("cst-{:016x}", w.id().wrapping_mul(0xbf58_476d_1ce4_e5b9));
            ok(method, &format!("<returnval>{}</returnval>", t("id", id)))
        }
        _ => fault(&SimFault::new("MethodNotFound", format!("the simulator does not implement {method}")), this),
    }
}

fn service_content(w: &World) -> String {
    let esx = w.cfg.api_type == "HostAgent";
    let (root, pc, sm, si) = if esx {
        ("ha-folder-root", "ha-property-collector", "ha-sessionmgr", "ha-searchindex")
    } else {
        ("group-d1", "propertyCollector", "SessionManager", "SearchIndex")
    };
    let name = if esx { "VMware ESXi" } else { "VMware vCenter Server" };
    let about = format!(
        "<about>{}{}{}{}{}{}{}{}{}{}{}</about>",
        t("name", name),
        t("fullName", format!("{name} {} build-0 (syncproxy simulator)", w.cfg.version)),
        t("vendor", "VMware, Inc."),
        t("version", &w.cfg.version),
        t("build", "0"),
        t("localeVersion", "INTL"),
        t("localeBuild", "000"),
        t("osType", "linux-x64"),
        t("productLineId", if esx { "embeddedEsx" } else { "vpx" }),
        t("apiType", &w.cfg.api_type),
        t("apiVersion", &w.cfg.api_version),
    );
    let about = about.replace("</about>", &format!("{}</about>", t("instanceUuid", &w.instance_uuid)));
    format!(
        "<returnval>{}{}{}{}{}{}{}{}{}{}{}</returnval>",
        mo("rootFolder", &MoRef::new("Folder", root)),
        mo("propertyCollector", &MoRef::new("PropertyCollector", pc)),
        mo("viewManager", &MoRef::new("ViewManager", "ViewManager")),
        about,
        mo("sessionManager", &MoRef::new("SessionManager", sm)),
        mo(
            "authorizationManager",
            &MoRef::new("AuthorizationManager", if esx { "ha-authmgr" } else { "AuthorizationManager" })
        ),
        mo("taskManager", &MoRef::new("TaskManager", "TaskManager")),
        mo("searchIndex", &MoRef::new("SearchIndex", si)),
        mo("fileManager", &MoRef::new("FileManager", "FileManager")),
        mo(
            "virtualDiskManager",
            &MoRef::new("VirtualDiskManager", if esx { "ha-vdiskmanager" } else { "VirtualDiskManager" })
        ),
        mo("guestOperationsManager", &MoRef::new("GuestOperationsManager", "guestOperationsManager")),
    )
}

fn main_collector(w: &World) -> String {
    if w.cfg.api_type == "HostAgent" { "ha-property-collector" } else { "propertyCollector" }.to_owned()
}

fn members(w: &World, kinds: &[String]) -> Vec<MoRef> {
    let want = |k: &str| kinds.is_empty() || kinds.iter().any(|x| x == k || x == "ManagedEntity");
    let mut out = Vec::new();
    if want("Datacenter") {
        out.extend(w.datacenters.iter().map(|d| d.moref.clone()));
    }
    if want("HostSystem") {
        out.extend(w.hosts.iter().map(|h| h.moref.clone()));
    }
    if want("Datastore") {
        out.extend(w.datastores.iter().map(|d| d.moref.clone()));
    }
    if want("ClusterComputeResource") || want("ComputeResource") {
        out.extend(w.clusters.iter().map(|c| c.moref.clone()));
    }
    // A ComputeResource view holds the standalone hosts' compute resources too (a cluster is
    // one as well).
    if want("ComputeResource") {
        out.extend(w.pools().into_iter().map(|p| p.owner).filter(|o| o.kind == "ComputeResource"));
    }
    if want("VirtualMachine") {
        out.extend(w.vms.iter().map(|v| v.moref.clone()));
    }
    if want("Network") {
        out.extend(w.networks.iter().map(|n| n.moref.clone()));
    }
    if want("ResourcePool") {
        out.extend(w.pools().into_iter().map(|p| p.moref));
    }
    out
}

fn retrieve(w: &mut World, method: &str, call: &Element) -> Answer {
    let mut objects = Vec::new();
    for spec in call.children_named("specSet") {
        let mut wanted: Vec<(String, Vec<String>, bool)> = Vec::new();
        for p in spec.children_named("propSet") {
            let kind = p.text_of("type").unwrap_or_default().trim().to_owned();
            let paths = p.children_named("pathSet").map(|e| e.text.trim().to_owned()).collect();
            let all = p.text_of("all").is_some_and(|a| a.trim() == "true");
            wanted.push((kind, paths, all));
        }
        for os in spec.children_named("objectSet") {
            let Some(obj) = os.child("obj").and_then(MoRef::from_element) else { continue };
            let skip = os.text_of("skip").is_some_and(|s| s.trim() == "true");
            let mut targets = Vec::new();
            if !skip {
                targets.push(obj.clone());
            }
            // One level of traversal: a container view's `view`.
            if os.children_named("selectSet").any(|s| s.text_of("path").is_some_and(|p| p.trim() == "view")) {
                targets.extend(w.views.get(&obj.value).map(|k| members(w, k)).unwrap_or_default());
            }
            for target in targets {
                let Some((_, paths, _)) = wanted.iter().find(|(k, _, _)| *k == target.kind) else { continue };
                match object_content(w, &target, paths) {
                    Ok(Some(x)) => objects.push(x),
                    Ok(None) => {}
                    Err(f) => return fault(&f, Some(&target)),
                }
            }
        }
    }
    if method == "RetrieveProperties" {
        let all: String = objects.iter().map(|o| format!("<returnval>{o}</returnval>")).collect();
        return ok(method, &all);
    }
    let max = call
        .child("options")
        .and_then(|o| o.parse_of::<usize>("maxObjects"))
        .filter(|m| *m > 0)
        .unwrap_or(w.cfg.page_limit)
        .min(w.cfg.page_limit);
    if objects.is_empty() {
        return ok(method, "");
    }
    ok(method, &page(w, objects, max))
}

/// One page of `objects` (at most `size`), keeping the rest behind a token.
fn page(w: &mut World, mut rest: Vec<String>, size: usize) -> String {
    let tail = if rest.len() > size { rest.split_off(size) } else { Vec::new() };
    let mut inner = String::from("<returnval>");
    if !tail.is_empty() {
        let token = format!("token-{}", w.id());
        inner.push_str(&t("token", &token));
        w.pages.insert(token, (tail, size));
    }
    for o in rest {
        let _ = write!(inner, "<objects>{o}</objects>");
    }
    inner.push_str("</returnval>");
    inner
}

pub(crate) fn prop(name: &str, ty: &str, val: &str) -> String {
    format!(r#"<propSet><name>{name}</name><val xsi:type="{ty}">{val}</val></propSet>"#)
}

fn object_content(w: &World, obj: &MoRef, paths: &[String]) -> Result<Option<String>, SimFault> {
    let mut props = String::new();
    for p in paths {
        if let Some(x) = property(w, obj, p)? {
            props.push_str(&x);
        }
    }
    Ok(Some(format!("{}{props}", mo("obj", obj))))
}

fn invalid_property(p: &str) -> SimFault {
    SimFault::new("InvalidProperty", format!("no property {p}"))
}

fn property(w: &World, obj: &MoRef, p: &str) -> Result<Option<String>, SimFault> {
    if let Some(answer) = crate::inventory::property(w, obj, p) {
        return answer;
    }
    let s = |v: &str| Ok(Some(prop(p, "xsd:string", &escape(v))));
    match obj.kind.as_str() {
        "VirtualMachine" => {
            let v = &w.vms[w.vm_index(obj).ok_or_else(|| SimFault::new("ManagedObjectNotFound", "no such VM"))?];
            vm_property(w, v, p)
        }
        "VirtualMachineSnapshot" => {
            let (vi, si) =
                w.snapshot_owner(obj).ok_or_else(|| SimFault::new("ManagedObjectNotFound", "no such snapshot"))?;
            match p {
                "config.hardware.device" => {
                    Ok(Some(prop(p, "ArrayOfVirtualDevice", &devices(w, &w.vms[vi], Some(si)))))
                }
                _ => Err(invalid_property(p)),
            }
        }
        "Datastore" => {
            let d = w
                .datastores
                .iter()
                .find(|d| d.moref == *obj)
                .ok_or_else(|| SimFault::new("ManagedObjectNotFound", "no such datastore"))?;
            let url = w.root.join(&d.name).display().to_string();
            match p {
                "name" | "summary.name" => s(&d.name),
                "summary.type" => s(&d.extra),
                "info.url" => s(&url),
                "summary" => Ok(Some(prop(
                    p,
                    "DatastoreSummary",
                    &format!(
                        "{}{}{}{}{}{}{}",
                        mo("datastore", &d.moref),
                        t("name", &d.name),
                        t("url", &url),
                        t("capacity", 1u64 << 40),
                        t("freeSpace", 1u64 << 39),
                        t("accessible", true),
                        t("type", &d.extra)
                    ),
                ))),
                "info" => {
                    let common = format!(
                        "{}{}{}{}",
                        t("name", &d.name),
                        t("url", &url),
                        t("freeSpace", 1u64 << 39),
                        t("maxFileSize", 62u64 << 40)
                    );
                    Ok(Some(if d.extra == "VMFS" {
                        let vmfs = format!(
                            "{}{}{}{}",
                            t("type", "VMFS"),
                            t("name", &d.name),
                            t("capacity", 1u64 << 40),
                            t("version", "6.82")
                        );
                        prop(p, "VmfsDatastoreInfo", &format!("{common}<vmfs>{vmfs}</vmfs>"))
                    } else {
                        let nas = format!(
                            "{}{}{}{}",
                            t("type", &d.extra),
                            t("name", &d.name),
                            t("remoteHost", "nas.sim"),
                            t("remotePath", "/export")
                        );
                        prop(p, "NasDatastoreInfo", &format!("{common}<nas>{nas}</nas>"))
                    }))
                }
                _ => Err(invalid_property(p)),
            }
        }
        "HostSystem" => {
            let h = w
                .hosts
                .iter()
                .find(|h| h.moref == *obj)
                .ok_or_else(|| SimFault::new("ManagedObjectNotFound", "no such host"))?;
            match p {
                "name" => s(&h.name),
                "config.product.version" | "summary.config.product.version" => s(&h.extra),
                "config.product.apiVersion" => s(&w.cfg.api_version),
                "runtime.connectionState" => {
                    Ok(Some(prop(p, "HostSystemConnectionState", ConnectionState::Connected.as_str())))
                }
                "parent" => Ok(Some(match w.clusters.iter().find(|c| c.hosts.contains(&h.moref)) {
                    Some(c) => format!("<propSet><name>{p}</name>{}</propSet>", typed_mo("val", &c.moref)),
                    None => format!(
                        "<propSet><name>{p}</name><val type=\"ComputeResource\" xsi:type=\"ManagedObjectReference\">domain-s{}</val></propSet>",
                        h.dc
                    ),
                })),
                // The certificate vCenter holds for the host: PEM as signed bytes. The
                // simulator is its own hosts, so this is its own certificate.
                "config.certificate" => Ok(w.cert_pem.as_ref().map(|pem| {
                    let bytes: String =
                        pem.bytes().map(|b| format!("<byte>{}</byte>", i8::from_le_bytes([b]))).collect();
                    prop(p, "ArrayOfByte", &bytes)
                })),
                _ => Err(invalid_property(p)),
            }
        }
        "Datacenter" => {
            let d = w
                .datacenters
                .iter()
                .find(|d| d.moref == *obj)
                .ok_or_else(|| SimFault::new("ManagedObjectNotFound", "no such datacenter"))?;
            match p {
                "name" => s(&d.name),
                "datastore" => {
                    let inner: String = w
                        .datastores
                        .iter()
                        .filter(|x| w.datacenters.get(x.dc).is_some_and(|dc| dc.moref == *obj))
                        .map(|x| typed_mo("ManagedObjectReference", &x.moref))
                        .collect();
                    Ok(Some(prop(p, "ArrayOfManagedObjectReference", &inner)))
                }
                _ => Err(invalid_property(p)),
            }
        }
        "ClusterComputeResource" => {
            let c = w
                .clusters
                .iter()
                .find(|c| c.moref == *obj)
                .ok_or_else(|| SimFault::new("ManagedObjectNotFound", "no such cluster"))?;
            match p {
                "name" => Ok(Some(prop(p, "xsd:string", &escape(&c.name)))),
                "host" => {
                    let inner: String = c.hosts.iter().map(|h| typed_mo("ManagedObjectReference", h)).collect();
                    Ok(Some(prop(p, "ArrayOfManagedObjectReference", &inner)))
                }
                "configurationEx" => {
                    let mut inner = format!(
                        "<drsConfig>{}{}</drsConfig>",
                        t("enabled", c.drs),
                        t("defaultVmBehavior", &c.behavior)
                    );
                    for (vm, enabled, behavior) in &c.overrides {
                        inner.push_str("<drsVmConfig>");
                        inner.push_str(&mo("key", vm));
                        if let Some(e) = enabled {
                            inner.push_str(&t("enabled", e));
                        }
                        if let Some(b) = behavior {
                            inner.push_str(&t("behavior", b));
                        }
                        inner.push_str("</drsVmConfig>");
                    }
                    Ok(Some(prop(p, "ClusterConfigInfoEx", &inner)))
                }
                _ => Err(invalid_property(p)),
            }
        }
        "GuestOperationsManager" => match p {
            "processManager" => Ok(Some(format!(
                "<propSet><name>{p}</name>{}</propSet>",
                typed_mo("val", &MoRef::new("GuestProcessManager", "guestOperationsProcessManager"))
            ))),
            _ => Err(invalid_property(p)),
        },
        "AuthorizationManager" => match p {
            "privilegeList" => {
                let inner: String = w
                    .privilege_ids()
                    .iter()
                    .map(|id| {
                        let group = id.rsplit_once('.').map_or(*id, |(g, _)| g);
                        format!(
                            r#"<AuthorizationPrivilege xsi:type="AuthorizationPrivilege">{}{}{}{}</AuthorizationPrivilege>"#,
                            t("privId", id),
                            t("onParent", false),
                            t("name", id),
                            t("privGroupName", group)
                        )
                    })
                    .collect();
                Ok(Some(prop(p, "ArrayOfAuthorizationPrivilege", &inner)))
            }
            _ => Err(invalid_property(p)),
        },
        "ServiceInstance" => match p {
            "content" => {
                let sc = service_content(w);
                let inner =
                    sc.strip_prefix("<returnval>").and_then(|x| x.strip_suffix("</returnval>")).unwrap_or_default();
                Ok(Some(prop(p, "ServiceContent", inner)))
            }
            "currentTime" => Ok(Some(prop(p, "xsd:dateTime", &iso_now()))),
            _ => Err(invalid_property(p)),
        },
        "ContainerView" => match p {
            "view" => {
                let kinds =
                    w.views.get(&obj.value).ok_or_else(|| SimFault::new("ManagedObjectNotFound", "no such view"))?;
                let inner: String = members(w, kinds).iter().map(|x| typed_mo("ManagedObjectReference", x)).collect();
                Ok(Some(prop(p, "ArrayOfManagedObjectReference", &inner)))
            }
            _ => Err(invalid_property(p)),
        },
        "HttpNfcLease" => w.lease_property(obj, p),
        "Task" => {
            let task = w.tasks.get(&obj.value).ok_or_else(|| SimFault::new("ManagedObjectNotFound", "no such task"))?;
            match p {
                "info" => Ok(Some(prop(p, "TaskInfo", &task_info(task)))),
                "info.state" => Ok(Some(prop(p, "TaskInfoState", task.state))),
                _ => Err(invalid_property(p)),
            }
        }
        _ => Err(invalid_property(p)),
    }
}

fn vm_property(w: &World, v: &VmState, p: &str) -> Result<Option<String>, SimFault> {
    let s = |x: &str| Ok(Some(prop(p, "xsd:string", &escape(x))));
    let b = |x: bool| Ok(Some(prop(p, "xsd:boolean", if x { "true" } else { "false" })));
    if let Some(x) = crate::inventory::vm_property(w, v, p) {
        return Ok(Some(x));
    }
    match p {
        "name" => s(&v.name),
        "config.uuid" => s(&v.uuid),
        "config.instanceUuid" => s(&v.instance_uuid),
        "config.version" => s(&v.hardware),
        "config.guestId" => s(&v.guest),
        "config.changeTrackingEnabled" => b(v.cbt),
        "capability.changeTrackingSupported" => {
            b(v.hardware.trim_start_matches("vmx-").parse::<u32>().is_ok_and(|n| n >= 7))
        }
        "config.keyId" => Ok(v
            .key_id
            .as_ref()
            .map(|k| prop(p, "CryptoKeyId", &format!("{}<providerId><id>sim-kms</id></providerId>", t("keyId", k))))),
        "config.hardware.device" => Ok(Some(prop(p, "ArrayOfVirtualDevice", &devices(w, v, None)))),
        // The whole configuration, as pyvmomi's `vm.config` asks for it.
        "config" => Ok(Some(prop(p, "VirtualMachineConfigInfo", &crate::inventory::config(w, v)))),
        "runtime.powerState" => Ok(Some(prop(p, "VirtualMachinePowerState", v.power.as_str()))),
        "runtime.connectionState" => {
            Ok(Some(prop(p, "VirtualMachineConnectionState", ConnectionState::Connected.as_str())))
        }
        "runtime.consolidationNeeded" => b(v.consolidation_needed),
        "runtime.host" => {
            Ok(Some(format!("<propSet><name>{p}</name>{}</propSet>", typed_mo("val", &w.hosts[v.host].moref))))
        }
        "guest.toolsRunningStatus" => s(v.tools.as_str()),
        "guest.disk" => {
            let cap: u64 = v.disks.iter().map(|d| d.capacity).sum();
            Ok(Some(prop(
                p,
                "ArrayOfGuestDiskInfo",
                &format!(
                    r#"<GuestDiskInfo xsi:type="GuestDiskInfo"><diskPath>/</diskPath>{}{}</GuestDiskInfo>"#,
                    t("capacity", cap),
                    t("freeSpace", cap / 2)
                ),
            )))
        }
        "datastore" => {
            let mut seen: Vec<usize> = v.disks.iter().map(|d| d.ds).collect();
            seen.dedup();
            let inner: String =
                seen.iter().map(|d| typed_mo("ManagedObjectReference", &w.datastores[*d].moref)).collect();
            Ok(Some(prop(p, "ArrayOfManagedObjectReference", &inner)))
        }
        // The tasks on this VM (the simulator keeps them all; a server keeps the last minutes').
        "recentTask" => {
            let mut tasks: Vec<&MoRef> = w.tasks.values().filter(|t| t.entity == v.moref).map(|t| &t.moref).collect();
            tasks.sort_by_key(|m| m.value.trim_start_matches("task-").parse::<u64>().unwrap_or(0));
            let inner: String = tasks.into_iter().map(|m| typed_mo("ManagedObjectReference", m)).collect();
            Ok(Some(prop(p, "ArrayOfManagedObjectReference", &inner)))
        }
        "snapshot" => {
            if v.snapshots.is_empty() {
                return Ok(None);
            }
            let mut inner = v.current.as_ref().map(|c| mo("currentSnapshot", c)).unwrap_or_default();
            inner.push_str(&snapshot_trees(v, None));
            Ok(Some(prop(p, "VirtualMachineSnapshotInfo", &inner)))
        }
        _ => Err(invalid_property(p)),
    }
}

fn snapshot_trees(v: &VmState, parent: Option<&MoRef>) -> String {
    let tag = if parent.is_none() { "rootSnapshotList" } else { "childSnapshotList" };
    let mut out = String::new();
    for s in v.snapshots.iter().filter(|s| s.parent.as_ref() == parent) {
        let _ = write!(
            out,
            "<{tag}>{}{}{}{}{}{}{}{}{}</{tag}>",
            mo("snapshot", &s.moref),
            mo("vm", &v.moref),
            t("name", &s.name),
            t("description", &s.description),
            t("id", s.id),
            t("createTime", &s.create_time),
            t("state", &v.power),
            t("quiesced", s.quiesced),
            snapshot_trees(v, Some(&s.moref)),
        );
    }
    out
}

/// The VM's devices now (`snap` None) or as of one of its snapshots.
pub(crate) fn devices(w: &World, v: &VmState, snap: Option<usize>) -> String {
    let mut out = String::new();
    for c in &v.controllers {
        let scsi_unit = if c.kind.bus() == "scsi" {
            "<sharedBus>noSharing</sharedBus><scsiCtlrUnitNumber>7</scsiCtlrUnitNumber>"
        } else {
            ""
        };
        let attached: String =
            v.disks.iter().filter(|d| d.controller_key == c.key).map(|d| t("device", d.key)).collect();
        let _ = write!(
            out,
            r#"<VirtualDevice xsi:type="{}"><key>{}</key><deviceInfo><label>{}</label><summary>{}</summary></deviceInfo><busNumber>{}</busNumber>{attached}{scsi_unit}</VirtualDevice>"#,
            c.kind.wire(),
            c.key,
            c.kind.label(c.bus),
            c.kind.summary(),
            c.bus,
        );
    }
    for (i, d) in v.disks.iter().enumerate() {
        let ds = &w.datastores[d.ds];
        let (file, change_id) = match snap {
            Some(si) => {
                let rec = &v.snapshots[si];
                match rec.disks.iter().find(|x| x.key == d.key) {
                    Some(sd) => (sd.file_name.clone(), sd.change_id.clone()),
                    None => (w.disk_file_name(v, d), None),
                }
            }
            None => (w.disk_file_name(v, d), d.track.as_ref().map(|t| t.change_id())),
        };
        let backing = match d.backing.as_str() {
            "rdm-physical" | "rdm-virtual" => format!(
                r#"<backing xsi:type="VirtualDiskRawDiskMappingVer1BackingInfo">{}{}{}{}{}{}</backing>"#,
                t("fileName", &file),
                mo("datastore", &ds.moref),
                t("lunUuid", "0200000000600508b1001c"),
                t("deviceName", "vml.0200000000600508b1001c"),
                t("compatibilityMode", if d.backing == "rdm-physical" { "physicalMode" } else { "virtualMode" }),
                t("diskMode", &d.mode),
            ),
            "sesparse" => format!(
                r#"<backing xsi:type="VirtualDiskSeSparseBackingInfo">{}{}{}{}</backing>"#,
                t("fileName", &file),
                mo("datastore", &ds.moref),
                t("diskMode", &d.mode),
                change_id.as_ref().map(|c| t("changeId", c)).unwrap_or_default(),
            ),
            _ => {
                // Under snapshots the chain leads down to the base disk, as on ESXi.
                let base = format!("[{}] {}", ds.name, d.base_name);
                let parent = if file == base {
                    String::new()
                } else {
                    format!(
                        r#"<parent xsi:type="VirtualDiskFlatVer2BackingInfo">{}{}{}</parent>"#,
                        t("fileName", &base),
                        mo("datastore", &ds.moref),
                        t("diskMode", &d.mode)
                    )
                };
                format!(
                    r#"<backing xsi:type="VirtualDiskFlatVer2BackingInfo">{}{}{}{}{}{}{}</backing>"#,
                    t("fileName", &file),
                    mo("datastore", &ds.moref),
                    t("diskMode", &d.mode),
                    t("thinProvisioned", true),
                    change_id.as_ref().map(|c| t("changeId", c)).unwrap_or_default(),
                    parent,
                    t("sharing", &d.sharing),
                )
            }
        };
        let _ = write!(
            out,
            r#"<VirtualDevice xsi:type="VirtualDisk"><key>{}</key><deviceInfo><label>Hard disk {}</label><summary>{} KB</summary></deviceInfo>{backing}<controllerKey>{}</controllerKey><unitNumber>{}</unitNumber><capacityInKB>{}</capacityInKB><capacityInBytes>{}</capacityInBytes></VirtualDevice>"#,
            d.key,
            i + 1,
            d.capacity / 1024,
            d.controller_key,
            d.unit,
            d.capacity / 1024,
            d.capacity
        );
    }
    for (i, n) in v.nics.iter().enumerate() {
        let net = n.network.map(|x| &w.networks[x]);
        let backing = net
            .map(|x| {
                format!(
                    r#"<backing xsi:type="VirtualEthernetCardNetworkBackingInfo">{}{}</backing>"#,
                    t("deviceName", &x.name),
                    mo("network", &x.moref)
                )
            })
            .unwrap_or_default();
        let _ = write!(
            out,
            r#"<VirtualDevice xsi:type="{}"><key>{}</key><deviceInfo><label>Network adapter {}</label><summary>{}</summary></deviceInfo>{backing}<connectable>{}{}{}{}</connectable><controllerKey>100</controllerKey><unitNumber>{}</unitNumber>{}{}{}</VirtualDevice>"#,
            n.kind.wire(),
            n.key,
            i + 1,
            escape(net.map_or("", |x| x.name.as_str())),
            t("startConnected", n.start_connected),
            t("allowGuestControl", n.allow_guest_control),
            t("connected", n.connected),
            t("status", if n.connected { "ok" } else { "untried" }),
            7 + i,
            t("addressType", &n.address_type),
            t("macAddress", &n.mac),
            t("wakeOnLanEnabled", true),
        );
    }
    for i in 0..v.usb {
        let _ = write!(
            out,
            r#"<VirtualDevice xsi:type="VirtualUSB"><key>{}</key><deviceInfo><label>USB {i}</label><summary>USB device</summary></deviceInfo><connected>true</connected></VirtualDevice>"#,
            4100 + i
        );
    }
    for i in 0..v.pci {
        let _ = write!(
            out,
            r#"<VirtualDevice xsi:type="VirtualPCIPassthrough"><key>{}</key><deviceInfo><label>PCI device {i}</label><summary>passthrough</summary></deviceInfo></VirtualDevice>"#,
            13000 + i
        );
    }
    out
}

fn task_info(task: &TaskRec) -> String {
    let mut s = format!(
        "{}{}{}{}{}{}{}{}{}",
        t("key", &task.moref.value),
        mo("task", &task.moref),
        t("descriptionId", &task.description),
        mo("entity", &task.entity),
        t("state", task.state),
        t("cancelled", task.cancelled),
        t("cancelable", true),
        t("queueTime", iso_now()),
        t("eventChainId", 1),
    );
    if let Some(r) = &task.result {
        s.push_str(&typed_mo("result", r));
    }
    if let Some(e) = &task.error {
        let _ = write!(
            s,
            r#"<error><fault xsi:type="{}">{}</fault>{}</error>"#,
            e.kind,
            fault_detail(e, Some(&task.entity)),
            t("localizedMessage", &e.message)
        );
    }
    s
}

/// Runs a task's operation on the world.
fn run_op(w: &mut World, method: &str, obj: &MoRef, call: &Element) -> Result<Option<MoRef>, SimFault> {
    if let Some(f) = w.faults.fail_next_task.take() {
        return Err(f);
    }
    let vm = || w.vm_index(obj).ok_or_else(|| SimFault::new("ManagedObjectNotFound", format!("no VM {}", obj.value)));
    match method {
        "CreateSnapshot_Task" => {
            let vi = vm()?;
            let name = call.text_of("name").unwrap_or_default().to_owned();
            let description = call.text_of("description").unwrap_or_default().to_owned();
            let quiesce = call.text_of("quiesce").is_some_and(|q| q.trim() == "true");
            w.create_snapshot(vi, &name, &description, quiesce).map(Some)
        }
        "RemoveSnapshot_Task" => w.remove_snapshot(obj).map(|()| None),
        "ReconfigVM_Task" => {
            let vi = vm()?;
            let spec = call.child("spec").map(crate::spec::vm_spec).transpose()?.unwrap_or_default();
            w.reconfigure_vm(vi, &spec).map(|()| None)
        }
        "CreateVM_Task" | "RegisterVM_Task" => {
            let pool = call
                .child("pool")
                .and_then(MoRef::from_element)
                .ok_or_else(|| SimFault::new("InvalidArgument", "a resource pool is required"))?;
            let host = call.child("host").and_then(MoRef::from_element);
            if method == "CreateVM_Task" {
                let spec = crate::spec::vm_spec(
                    call.child("config").ok_or_else(|| SimFault::new("InvalidArgument", "a config is required"))?,
                )?;
                w.create_vm(obj, spec, &pool, host.as_ref(), None).map(Some)
            } else {
                if call.text_of("asTemplate").is_some_and(|t| t.trim() == "true") {
                    return Err(SimFault::new("NotSupported", "the simulator has no templates"));
                }
                let path = call.text_of("path").unwrap_or_default().trim().to_owned();
                let name = call.text_of("name").map(str::trim);
                w.register_vm(obj, &path, name, &pool, host.as_ref()).map(Some)
            }
        }
        "PowerOnVM_Task" | "PowerOffVM_Task" => {
            let vi = vm()?;
            w.set_power_api(vi, method == "PowerOnVM_Task").map(|()| None)
        }
        "Destroy_Task" => {
            let vi = vm()?;
            w.destroy_vm(vi).map(|()| None)
        }
        "Rename_Task" => {
            let vi = vm()?;
            w.rename_vm(vi, call.text_of("newName").unwrap_or_default()).map(|()| None)
        }
        "CreateVirtualDisk_Task" | "CopyVirtualDisk_Task" | "DeleteVirtualDisk_Task" => {
            let dc = |tag: &str| call.child(tag).and_then(MoRef::from_element);
            let name = |tag: &str| call.text_of(tag).unwrap_or_default().trim().to_owned();
            match method {
                "CreateVirtualDisk_Task" => {
                    let kb: u64 = call.child("spec").and_then(|s| s.parse_of("capacityKb")).unwrap_or(0);
                    w.create_virtual_disk(&name("name"), dc("datacenter").as_ref(), kb.saturating_mul(1024))
                }
                "CopyVirtualDisk_Task" => w.copy_virtual_disk(
                    &name("sourceName"),
                    dc("sourceDatacenter").as_ref(),
                    &name("destName"),
                    dc("destDatacenter").as_ref(),
                    call.text_of("force").is_some_and(|f| f.trim() == "true"),
                ),
                _ => w.delete_virtual_disk(&name("name"), dc("datacenter").as_ref()),
            }
            .map(|()| None)
        }
        "ConsolidateVMDisks_Task" => {
            let vi = vm()?;
            w.vms[vi].consolidation_needed = false;
            Ok(None)
        }
        "ReconfigureComputeResource_Task" => {
            let specs = call
                .child("spec")
                .map(|spec| {
                    spec.children_named("drsVmConfigSpec")
                        .map(|d| {
                            let op = d.text_of("operation").unwrap_or_default().trim().to_owned();
                            let info = d.child("info");
                            let vm = info
                                .and_then(|i| i.child("key"))
                                .or_else(|| d.child("removeKey"))
                                .and_then(MoRef::from_element)
                                .unwrap_or_else(|| MoRef::new("VirtualMachine", ""));
                            let enabled = info.and_then(|i| i.text_of("enabled")).map(|e| e.trim() == "true");
                            let behavior =
                                info.and_then(|i| i.text_of("behavior")).map(|b| DrsBehavior::parse(b.trim()));
                            (op, vm, enabled, behavior)
                        })
                        .collect()
                })
                .unwrap_or_default();
            w.reconfigure_cluster(obj, specs).map(|()| None)
        }
        "DeleteDatastoreFile_Task" => {
            let name = call.text_of("name").unwrap_or_default().trim().to_owned();
            let dc = call
                .child("datacenter")
                .and_then(MoRef::from_element)
                .ok_or_else(|| SimFault::new("InvalidArgument", "a datacenter is required"))?;
            w.delete_datastore_file(&name, &dc).map(|()| None)
        }
        _ => Err(SimFault::new("MethodNotFound", method)),
    }
}

fn start_task(w: &mut World, state: &Shared, method: &str, obj: MoRef, call: &Element) -> Answer {
    // Faults about the object itself come back at once, as on real servers.
    let known = match method {
        "RemoveSnapshot_Task" => w.snapshot_owner(&obj).is_some(),
        "DeleteDatastoreFile_Task" => obj.kind == "FileManager",
        "ReconfigureComputeResource_Task" => w.clusters.iter().any(|c| c.moref == obj),
        "CreateVM_Task" | "RegisterVM_Task" => w.folder_dc(&obj).is_some(),
        "CreateVirtualDisk_Task" | "CopyVirtualDisk_Task" | "DeleteVirtualDisk_Task" => {
            obj.kind == "VirtualDiskManager"
        }
        _ => w.vm_index(&obj).is_some(),
    };
    if !known {
        let f = SimFault::new(
            "ManagedObjectNotFound",
            format!(
                "The object '{}:{}' has already been deleted or has not been completely created",
                obj.kind, obj.value
            ),
        );
        return fault(&f, Some(&obj));
    }
    // One task at a time per VM, as on ESXi.
    let vm_of =
        |w: &World, m: &MoRef| w.snapshot_owner(m).map(|(vi, _)| w.vms[vi].moref.clone()).unwrap_or_else(|| m.clone());
    let target = vm_of(w, &obj);
    if let Some(busy) = w.tasks.values().find(|t| t.state == "running" && vm_of(w, &t.entity) == target) {
        let f = SimFault::new(
            "TaskInProgress",
            format!("The operation is not allowed in the current state: {} is running", busy.moref.value),
        );
        return fault(&f, Some(&obj));
    }
    let id = format!("task-{}", w.id());
    let moref = MoRef::new("Task", &id);
    let description = match method {
        "CreateSnapshot_Task" => "VirtualMachine.createSnapshot",
        "RemoveSnapshot_Task" => "vm.Snapshot.remove",
        "ReconfigVM_Task" => "VirtualMachine.reconfigure",
        "DeleteDatastoreFile_Task" => "FileManager.deleteFile",
        "ReconfigureComputeResource_Task" => "ClusterComputeResource.reconfigureEx",
        "CreateVM_Task" => "Folder.createVm",
        "RegisterVM_Task" => "Folder.registerVm",
        "PowerOnVM_Task" => "VirtualMachine.powerOn",
        "PowerOffVM_Task" => "VirtualMachine.powerOff",
        "Destroy_Task" => "VirtualMachine.destroy",
        "Rename_Task" => "VirtualMachine.rename",
        "CreateVirtualDisk_Task" => "VirtualDiskManager.createVirtualDisk",
        "CopyVirtualDisk_Task" => "VirtualDiskManager.copyVirtualDisk",
        "DeleteVirtualDisk_Task" => "VirtualDiskManager.deleteVirtualDisk",
        _ => "VirtualMachine.consolidateDisks",
    };
    // TaskInfo.entity is a ManagedEntity: for a snapshot's removal, its VM (vcsim names the
    // snapshot there, which pyvmomi refuses).
    // A virtual disk's task is its datacenter's (the disk manager is no ManagedEntity).
    let entity = match w.snapshot_owner(&obj) {
        Some((vi, _)) => w.vms[vi].moref.clone(),
        None if obj.kind == "VirtualDiskManager" => ["datacenter", "sourceDatacenter"]
            .iter()
            .find_map(|tag| call.child(tag).and_then(MoRef::from_element))
            .or_else(|| w.datacenters.first().map(|d| d.moref.clone()))
            .unwrap_or_else(|| obj.clone()),
        None => obj.clone(),
    };
    let mut rec = TaskRec {
        moref: moref.clone(),
        description: description.to_owned(),
        entity,
        state: "running",
        result: None,
        error: None,
        cancelled: false,
    };
    let delay = w.faults.task_delay;
    if delay.is_zero() {
        finish(w, &mut rec, method, &obj, call);
        w.tasks.insert(id, rec);
    } else {
        w.tasks.insert(id.clone(), rec);
        let (state, method, call) = (state.clone(), method.to_owned(), call.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut w = lock(&state);
            if let Some(mut rec) = w.tasks.remove(&id) {
                finish(&mut w, &mut rec, &method, &obj, &call);
                w.tasks.insert(id, rec);
            }
        });
    }
    ok(method, &mo("returnval", &moref))
}

fn finish(w: &mut World, rec: &mut TaskRec, method: &str, obj: &MoRef, call: &Element) {
    if rec.cancelled {
        rec.state = "error";
        rec.error = Some(SimFault::new("RequestCanceled", "The task was canceled by a user."));
        return;
    }
    match run_op(w, method, obj, call) {
        Ok(r) => {
            rec.state = "success";
            rec.result = r;
        }
        Err(f) => {
            rec.state = "error";
            rec.error = Some(f);
        }
    }
}

async fn wait_for_updates(state: &Shared, method: &str, call: &Element) -> Answer {
    let pc = call.child("_this").and_then(MoRef::from_element).map(|m| m.value).unwrap_or_default();
    let max_wait = call.child("options").and_then(|o| o.parse_of::<u64>("maxWaitSeconds")).unwrap_or(60).min(60);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(max_wait);
    loop {
        {
            let mut w = lock(state);
            if w.faults.no_wait_for_updates {
                return fault(&SimFault::new("MethodNotFound", "WaitForUpdatesEx"), None);
            }
            let tasks: Vec<TaskRec> = match w.collectors.get(&pc) {
                Some(c) => c
                    .filters
                    .values()
                    .flatten()
                    .filter_map(|m| w.tasks.get(&m.value))
                    .filter(|t| c.told.get(&t.moref.value) != Some(&t.state))
                    .cloned()
                    .collect(),
                None => return fault(&SimFault::new("ManagedObjectNotFound", "no such property collector"), None),
            };
            if !tasks.is_empty() {
                let c = w.collectors.get_mut(&pc).expect("checked above");
                c.version += 1;
                let mut sets = String::new();
                for task in &tasks {
                    c.told.insert(task.moref.value.clone(), task.state);
                    let _ = write!(
                        sets,
                        r#"<objectSet><kind>modify</kind>{}<changeSet><name>info</name><op>assign</op><val xsi:type="TaskInfo">{}</val></changeSet></objectSet>"#,
                        mo("obj", &task.moref),
                        task_info(task)
                    );
                }
                let inner = format!(
                    r#"<returnval>{}<filterSet>{}{sets}</filterSet></returnval>"#,
                    t("version", c.version),
                    mo("filter", &MoRef::new("PropertyFilter", "filter"))
                );
                return ok(method, &inner);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return ok(method, "");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
