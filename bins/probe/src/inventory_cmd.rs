//! `probe inventory --url URL --user U --password-file F`: logs in to vCenter or ESXi and
//! lists the VMs with their disks, as a table or `--json`, plus what the server is and how its
//! TLS was trusted.

use std::io::Write;

use crate::server_args::ServerArgs;
use crate::vmdk_cmd::human;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use vsphere::{BackingKind, DrsBehavior, PowerState, Vm};

/// Arguments of `probe inventory`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    server: ServerArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(inventory(args))
}

async fn inventory(args: &Args) -> Result<()> {
    let client = args.server.login().await?;
    let result = async {
        let vms = client.vms().await.context("cannot list the VMs")?;
        let hosts = client.hosts().await.context("cannot list the hosts")?;
        let datastores = client.datastores().await.context("cannot list the datastores")?;
        // Standalone ESXi has no clusters; an account may not see them either.
        let clusters = client.clusters().await.unwrap_or_default();
        anyhow::Ok((vms, hosts, datastores, clusters))
    }
    .await;
    if let Err(e) = client.logout().await {
        eprintln!("probe: logging out: {e}");
    }
    let (mut vms, hosts, datastores, clusters) = result?;
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    let about = &client.content().about;
    let tls = client.server_tls();
    let report = json!({
        "server": {
            "url": args.server.url,
            "name": about.name,
            "version": about.version,
            "build": about.build,
            "api_type": about.api_type,
            "api_version": about.api_version,
            "instance_uuid": about.instance_uuid,
            "support": format!("{:?}", client.support()),
            "tls_version": tls.as_ref().map(|t| t.version.clone()),
            "thumbprint_sha1": tls.as_ref().map(|t| t.sha1.to_string()),
            "thumbprint_sha256": tls.as_ref().map(|t| t.sha256.to_string()),
        },
        "hosts": hosts.iter().map(|h| json!({
            "name": h.name, "moref": h.moref.value, "version": h.version, "api_version": h.api_version,
            "connection_state": h.connection_state, "thumbprint_sha1": h.thumbprint.as_ref().map(ToString::to_string),
        })).collect::<Vec<_>>(),
        "datastores": datastores.iter().map(|d| json!({
            "name": d.name, "moref": d.moref.value, "type": d.kind, "vmfs_version": d.vmfs_version,
            "capacity": d.capacity, "free": d.free,
        })).collect::<Vec<_>>(),
        "clusters": clusters.iter().map(|c| json!({
            "name": c.name, "moref": c.moref.value, "drs_enabled": c.drs_enabled, "drs_behavior": c.drs_behavior,
        })).collect::<Vec<_>>(),
        "vms": vms.iter().map(vm_json).collect::<Vec<_>>(),
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    writeln!(out, "{} {} (API {}, {})", about.name, about.version, about.api_version, about.api_type)?;
    if let Some(t) = &tls {
        writeln!(out, "TLS {}, SHA-1 {}", t.version, t.sha1)?;
    }
    for h in &hosts {
        writeln!(out, "host {} (ESXi {})", h.name, h.version.as_deref().unwrap_or("?"))?;
    }
    for d in &datastores {
        let v = d.vmfs_version.as_deref().map(|v| format!(" {v}")).unwrap_or_default();
        writeln!(out, "datastore {} ({}{v})", d.name, d.kind.as_deref().unwrap_or("?"))?;
    }
    for c in &clusters {
        writeln!(
            out,
            "cluster {} (DRS {})",
            c.name,
            c.drs_behavior.as_ref().map_or(if c.drs_enabled == Some(true) { "on" } else { "off" }, DrsBehavior::as_str)
        )?;
    }
    writeln!(out, "{} VMs\n", vms.len())?;
    writeln!(out, "{:<28} {:<10} {:<8} {:<5} {:<6} DISKS", "VM", "POWER", "HW", "CBT", "SNAPS")?;
    for vm in &vms {
        let cbt = match vm.cbt_enabled {
            Some(true) => "on",
            Some(false) => "off",
            None => "-",
        };
        writeln!(
            out,
            "{:<28} {:<10} {:<8} {:<5} {:<6} {}",
            vm.name,
            vm.power_state.as_ref().map_or("-", PowerState::as_str),
            vm.hardware_version.as_deref().unwrap_or("-"),
            cbt,
            vm.all_snapshots().len(),
            vm.disks.len()
        )?;
        for d in &vm.disks {
            writeln!(
                out,
                "    {:<8} {:>10} {:<10} {:<22} {}",
                d.bus_slot.as_deref().unwrap_or("-"),
                human(d.capacity),
                backing_name(&d.backing),
                d.mode,
                d.file_name
            )?;
        }
    }
    if vms.is_empty() {
        bail!("the account sees no VMs")
    }
    Ok(())
}

fn backing_name(b: &BackingKind) -> String {
    match b {
        BackingKind::Flat => "flat".into(),
        BackingKind::Sparse => "sparse".into(),
        BackingKind::SeSparse => "sesparse".into(),
        BackingKind::RdmPhysical => "rdm-phys".into(),
        BackingKind::RdmVirtual => "rdm-virt".into(),
        BackingKind::RawDisk => "raw".into(),
        BackingKind::Other(o) => o.clone(),
    }
}

fn vm_json(vm: &Vm) -> Value {
    json!({
        "name": vm.name,
        "moref": vm.moref.value,
        "instance_uuid": vm.instance_uuid,
        "bios_uuid": vm.bios_uuid,
        "hardware_version": vm.hardware_version,
        "power_state": vm.power_state,
        "connection_state": vm.connection_state,
        "cbt_enabled": vm.cbt_enabled,
        "cbt_supported": vm.cbt_supported,
        "consolidation_needed": vm.consolidation_needed,
        "encrypted": vm.key_id.is_some(),
        "tools": vm.tools,
        "guest_id": vm.guest_id,
        "vmx_path": vm.vmx_path,
        "host": vm.host.as_ref().map(|h| h.value.clone()),
        "snapshots": vm.all_snapshots().iter().map(|s| json!({
            "moref": s.moref.value, "name": s.name, "description": s.description,
            "create_time": s.create_time, "quiesced": s.quiesced,
        })).collect::<Vec<_>>(),
        "snapshot_depth": vm.snapshot_depth(),
        "usb_devices": vm.usb.len(),
        "pci_passthrough_devices": vm.pci_passthrough.len(),
        "shared_bus_controllers": vm.shared_bus_controllers.len(),
        "guest_disks": vm.guest_disks.iter().map(|g| json!({"path": g.path, "capacity": g.capacity, "free": g.free})).collect::<Vec<_>>(),
        "disks": vm.disks.iter().map(|d| json!({
            "key": d.key,
            "label": d.label,
            "slot": d.bus_slot,
            "capacity": d.capacity,
            "file_name": d.file_name,
            "base_file_name": d.base_file_name,
            "backing": backing_name(&d.backing),
            "mode": d.mode,
            "independent": d.independent(),
            "sharing": d.sharing,
            "change_id": d.change_id,
            "thin": d.thin,
            "datastore": d.datastore.as_ref().map(|m| m.value.clone()),
            "encrypted": d.key_id.is_some(),
        })).collect::<Vec<_>>(),
    })
}
