//! How many VMs a process works on at once, over all its jobs: in all, per ESXi host, per
//! datastore, and one job per VM at a time. Below the flow and the job's context, which hold it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use vsphere::{MoRef, Vm};

use crate::OrchError;

/// How many VMs may be worked on at once, over every job of a process: in all, per ESXi host,
/// and per datastore (so one host's or one datastore's production I/O is not starved).
#[derive(Debug)]
pub struct Limits {
    vms: Arc<Semaphore>,
    per_host: Option<usize>,
    per_datastore: Option<usize>,
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// One VM is worked on by one job of the process at a time: the others wait this long.
    pub vm_wait: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(100, None, None)
    }
}

impl Limits {
    /// At most `vms` VMs at once, `per_host` on one host and `per_datastore` touching one
    /// datastore.
    pub fn new(vms: usize, per_host: Option<usize>, per_datastore: Option<usize>) -> Self {
        Self {
            vms: Arc::new(Semaphore::new(vms.max(1))),
            per_host,
            per_datastore,
            gates: Mutex::default(),
            vm_wait: std::time::Duration::from_secs(24 * 3600),
        }
    }

    fn gate(&self, key: String, n: usize) -> Arc<Semaphore> {
        let mut g = self.gates.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        g.entry(key).or_insert_with(|| Arc::new(Semaphore::new(n.max(1)))).clone()
    }

    /// Waits until no other job of this process works on `vm` (two jobs naming one VM would
    /// each find the other's snapshot), at most [`Limits::vm_wait`]; then the VM is this
    /// caller's until the permit is dropped.
    pub async fn claim_vm(&self, vm: &MoRef) -> Result<OwnedSemaphorePermit, OrchError> {
        let gate = self.gate(format!("vm {}", vm.value), 1);
        match tokio::time::timeout(self.vm_wait, gate.acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(OrchError::Refused(format!("{vm}: the per-VM gate closed"))),
            Err(_) => Err(OrchError::Refused(format!(
                "{vm}: another job of this proxy worked on it for longer than {} (the wait for it)",
                humantime::format_duration(self.vm_wait)
            ))),
        }
    }

    /// Waits until `vm` may start: a slot overall, on its host and on each of its datastores
    /// (taken in one order, so two VMs never hold each other's).
    pub async fn admit(&self, vm: Option<&Vm>) -> Vec<OwnedSemaphorePermit> {
        let mut keys: Vec<(String, usize)> = Vec::new();
        if let Some(vm) = vm {
            if let (Some(n), Some(h)) = (self.per_host, &vm.host) {
                keys.push((format!("host {}", h.value), n));
            }
            if let Some(n) = self.per_datastore {
                let mut ds: Vec<String> = vm
                    .disks
                    .iter()
                    .filter_map(|d| d.datastore.as_ref())
                    .map(|d| format!("datastore {}", d.value))
                    .collect();
                ds.sort();
                ds.dedup();
                keys.extend(ds.into_iter().map(|k| (k, n)));
            }
        }
        keys.sort();
        let mut permits = Vec::new();
        for (k, n) in keys {
            if let Ok(p) = self.gate(k, n).acquire_owned().await {
                permits.push(p);
            }
        }
        if let Ok(p) = self.vms.clone().acquire_owned().await {
            permits.push(p);
        }
        permits
    }
}
