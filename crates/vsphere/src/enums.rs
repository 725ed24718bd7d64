//! The API's enumerated values that backup acts on, as types: power state, Tools running
//! status, disk mode, connection state and DRS behaviour. Each reads any string the server
//! sends: a value this client does not know is kept verbatim in `Other`, so a newer server
//! never fails a read and reports show what it said. `as_str` gives the wire value back, and
//! serde reads and writes them as that string.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

/// An enumeration of the API's string values, with `Other` for any value not listed.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $wire:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A value this client does not know, verbatim.
            Other(String),
        }

        impl $name {
            /// The value as the API spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $wire,)+
                    Self::Other(s) => s,
                }
            }

            /// Reads a value as the API spells it; one this client does not know is kept in
            /// `Other`.
            pub fn parse(s: &str) -> Self {
                match s {
                    $($wire => Self::$variant,)+
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl FromStr for $name {
            type Err = Infallible;
            fn from_str(s: &str) -> Result<Self, Infallible> {
                Ok(Self::parse(s))
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::parse(s)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self::parse(&s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <String as serde::Deserialize>::deserialize(d).map(Self::from)
            }
        }
    };
}

wire_enum! {
    /// `runtime.powerState` (`VirtualMachinePowerState`).
    PowerState {
        /// Running.
        PoweredOn = "poweredOn",
        /// Off.
        PoweredOff = "poweredOff",
        /// Suspended (its memory on disk).
        Suspended = "suspended",
    }
}

wire_enum! {
    /// `guest.toolsRunningStatus` (`VirtualMachineToolsRunningStatus`).
    ToolsRunningStatus {
        /// VMware Tools run in the guest.
        Running = "guestToolsRunning",
        /// They do not.
        NotRunning = "guestToolsNotRunning",
        /// They are starting (running the guest's scripts).
        ExecutingScripts = "guestToolsExecutingScripts",
        /// `toolsOk`, as the older `guest.toolsStatus` says running and current Tools: taken
        /// as running.
        ToolsOk = "toolsOk",
    }
}

impl ToolsRunningStatus {
    /// Whether Tools run, so a snapshot can quiesce the guest.
    pub fn running(&self) -> bool {
        matches!(self, Self::Running | Self::ToolsOk)
    }
}

wire_enum! {
    /// A virtual disk's `diskMode` (`VirtualDiskMode`).
    DiskMode {
        /// Dependent: in snapshots, changes kept.
        Persistent = "persistent",
        /// Dependent, changes dropped at power-off.
        Nonpersistent = "nonpersistent",
        /// Changes kept or dropped at power-off, as asked.
        Undoable = "undoable",
        /// Left out of snapshots, changes kept.
        IndependentPersistent = "independent_persistent",
        /// Left out of snapshots, changes dropped at power-off.
        IndependentNonpersistent = "independent_nonpersistent",
        /// Changes appended to a redo log.
        Append = "append",
    }
}

impl DiskMode {
    /// Independent disks are left out of snapshots (a mode this client does not know counts
    /// as independent when its name says so).
    pub fn independent(&self) -> bool {
        match self {
            Self::IndependentPersistent | Self::IndependentNonpersistent => true,
            Self::Other(s) => s.starts_with("independent"),
            _ => false,
        }
    }
}

wire_enum! {
    /// `runtime.connectionState` of a host (`HostSystemConnectionState`) or a VM
    /// (`VirtualMachineConnectionState`).
    ConnectionState {
        /// Connected to vCenter.
        Connected = "connected",
        /// Disconnected by a user.
        Disconnected = "disconnected",
        /// A host that stopped answering.
        NotResponding = "notResponding",
        /// A VM whose host no longer knows it.
        Orphaned = "orphaned",
        /// A VM whose files cannot be reached.
        Inaccessible = "inaccessible",
        /// A VM whose configuration is corrupt.
        Invalid = "invalid",
    }
}

wire_enum! {
    /// A cluster's default DRS behaviour or a VM's own (`DrsBehavior`).
    DrsBehavior {
        /// DRS only recommends.
        Manual = "manual",
        /// DRS places VMs at power-on, then only recommends.
        PartiallyAutomated = "partiallyAutomated",
        /// DRS moves VMs on its own.
        FullyAutomated = "fullyAutomated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_round_trip_and_unknown_ones_are_kept_verbatim() {
        for (s, p) in [
            ("poweredOn", PowerState::PoweredOn),
            ("poweredOff", PowerState::PoweredOff),
            ("suspended", PowerState::Suspended),
        ] {
            assert_eq!(PowerState::parse(s), p);
            assert_eq!(p.as_str(), s);
            assert_eq!(p.to_string(), s);
        }
        let odd = PowerState::parse("hibernating");
        assert_eq!(odd, PowerState::Other("hibernating".into()));
        assert_eq!(odd.to_string(), "hibernating");
        assert_eq!(format!("[{:<12}]", DiskMode::Persistent), "[persistent  ]", "widths apply");
        assert_eq!("notResponding".parse::<ConnectionState>(), Ok(ConnectionState::NotResponding));
        assert_eq!(DrsBehavior::from("fullyAutomated"), DrsBehavior::FullyAutomated);
        assert_eq!(DiskMode::parse("independent_nonpersistent"), DiskMode::IndependentNonpersistent);
        // Case matters on the wire: a differently spelled value is not taken for a known one.
        assert_eq!(DrsBehavior::parse("Manual"), DrsBehavior::Other("Manual".into()));
    }

    #[test]
    fn independence_and_tools_running_are_decided_by_the_type() {
        assert!(DiskMode::IndependentPersistent.independent());
        assert!(DiskMode::parse("independent_future").independent());
        assert!(!DiskMode::Persistent.independent() && !DiskMode::Nonpersistent.independent());
        assert!(ToolsRunningStatus::Running.running() && ToolsRunningStatus::parse("toolsOk").running());
        assert!(!ToolsRunningStatus::NotRunning.running());
        assert!(!ToolsRunningStatus::ExecutingScripts.running());
        assert!(!ToolsRunningStatus::parse("toolsNotInstalled").running());
    }

    #[test]
    fn serde_reads_and_writes_the_wire_string() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct S {
            b: DrsBehavior,
            p: Option<PowerState>,
        }
        let s = S { b: DrsBehavior::Manual, p: Some(PowerState::Other("new".into())) };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"b":"manual","p":"new"}"#);
        assert_eq!(serde_json::from_str::<S>(&json).unwrap(), s);
    }
}
