//! The vSphere SOAP client and session model: TLS trust (CA, pinned thumbprint or a loud
//! insecure mode), login with re-login on expiry, the property collector with paging, the
//! typed VM model backup and `probe` need, and vSphere faults as typed errors.
//!
//! It speaks the small subset of the `urn:vim25` API a backup needs, written by hand: a
//! generated binding of the whole API would be hundreds of thousands of lines.
//!
//! Also: tasks and `WaitForUpdatesEx`, snapshots, CBT reconfiguration,
//! `QueryChangedDiskAreas`, datastore HTTP reads and service tickets, host, datastore and
//! cluster facts, the account's privileges, and the legacy TLS 1.0 path; and the calls a
//! restore needs (`provision`): placement, networks, VM creation and registration, disks
//! attached, copied and made, power, rename, destroy, and datastore uploads.

pub mod datastore;
pub mod enums;
pub mod error;
pub mod facts;
pub mod guest;
pub mod http;
mod legacy;
pub mod model;
pub mod nfc;
pub mod pc;
pub mod privileges;
pub mod provision;
pub mod session;
pub mod soap;
pub mod task;
pub mod tls;
pub mod version;
pub mod xml;

pub use enums::{ConnectionState, DiskMode, DrsBehavior, PowerState, ToolsRunningStatus};
pub use error::{Error, Fault, FaultKind, Retry};
pub use model::{BackingKind, Disk, NotCopyable, Vm};
pub use session::{Client, ConnectOptions, Credentials, Secret};
pub use soap::MoRef;
pub use tls::{Thumbprint, Trust};
