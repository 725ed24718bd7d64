//! The VM's configuration files captured with each copy: its `.vmx` and the `.nvram` beside it.

use vsphere::Vm;
use vsphere::datastore::DatastoreFile;

use crate::OrchError;

/// The VM's configuration files, by file name: its `.vmx` (a warning when it cannot be read)
/// and the `.nvram` beside it (its firmware settings; a VM that never booted may have none). The
/// warning goes to `warnings`.
pub(crate) async fn config_files(
    reader: &vsphere::datastore::DatastoreReader,
    datacenter: &str,
    vm: &Vm,
    warnings: &mut Vec<String>,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Some(vmx) = &vm.vmx_path else { return out };
    let name_of = |path: &str| path.rsplit('/').next().unwrap_or(path).trim_start_matches("] ").to_owned();
    match read_file(reader, datacenter, vmx).await {
        Ok(data) => out.push((name_of(vmx), data)),
        Err(e) => warnings.push(format!("the configuration file {vmx} was not captured: {e}")),
    }
    if let Some(stem) = vmx.strip_suffix(".vmx") {
        let nvram = format!("{stem}.nvram");
        match read_file(reader, datacenter, &nvram).await {
            Ok(data) => out.push((name_of(&nvram), data)),
            Err(e) => tracing::info!("{}: no firmware settings captured ({nvram}: {e})", vm.name),
        }
    }
    out
}

/// Reads a small datastore file whole (a `.vmx`).
async fn read_file(
    reader: &vsphere::datastore::DatastoreReader,
    dc: &str,
    ds_path: &str,
) -> Result<Vec<u8>, OrchError> {
    let f = DatastoreFile::from_ds_path(dc, ds_path)?;
    let size = reader.size(&f).await?;
    if size > repo::MAX_FILE as u64 {
        return Err(OrchError::Refused(format!("{ds_path} is {size} bytes")));
    }
    Ok(reader.read(&f, 0, size).await?.to_vec())
}
