//! Small helpers every layer of the per-VM flow uses, kept below them all so that none of the
//! higher modules (the flow, DRS pinning, CBT resets) has to import another: the blocking pool,
//! a VM's key in a target's records, the VM as the server has it, its datacenter.

use vsphere::{Client, MoRef, Vm};

use crate::OrchError;

/// The datacenter whose datastores hold `vm`'s disks (its name is part of datastore paths).
pub(crate) async fn datacenter_of(client: &Client, vm: &Vm) -> Result<String, OrchError> {
    Ok(datacenter_for(client, vm).await?.name)
}

/// The datacenter whose datastores hold `vm`'s disks.
pub(crate) async fn datacenter_for(client: &Client, vm: &Vm) -> Result<vsphere::facts::Datacenter, OrchError> {
    let mut dcs = client.datacenters().await?;
    let ds = vm.disks.iter().find_map(|d| d.datastore.clone());
    let found = match &ds {
        Some(ds) => dcs.iter().position(|dc| dc.datastores.contains(ds)),
        None if dcs.len() == 1 => Some(0),
        None => None,
    };
    found
        .map(|i| dcs.swap_remove(i))
        .ok_or_else(|| OrchError::Refused(format!("no datacenter holds the datastore of {}'s disks ({ds:?})", vm.name)))
}

/// The name of `vm` in a target's per-VM records (sessions, reset marks): the vCenter's
/// instance UUID and the VM's (none without an instance UUID to name it by).
pub fn vm_key(client: &vsphere::Client, vm: &Vm) -> Option<String> {
    vm_key_in(&client.content().about.instance_uuid, vm)
}

/// [`vm_key`], from the vCenter's instance UUID.
pub(crate) fn vm_key_in(vcenter: &str, vm: &Vm) -> Option<String> {
    let uuid = vm.instance_uuid.as_deref().filter(|u| !u.is_empty())?;
    let key: String = format!("{}-{uuid}", if vcenter.is_empty() { "esx" } else { vcenter })
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .take(128)
        .collect();
    Some(key)
}

/// `vm` as the server has it now.
pub(crate) async fn one_vm(client: &Client, vm: &MoRef) -> Result<Vm, OrchError> {
    client
        .vms_by_moref(std::slice::from_ref(vm))
        .await?
        .pop()
        .ok_or_else(|| OrchError::Refused(format!("{vm} is not a virtual machine on this server")))
}

/// Runs a repository, lease or block-layer call on the blocking pool (the repository is
/// synchronous, and on S3 it waits for the network).
pub(crate) async fn blocking<T: Send + 'static, E: Into<OrchError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, OrchError> {
    pipeline::blocking_as(move || f().map_err(Into::into)).await
}
