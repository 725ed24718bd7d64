//! The replica target: the sync state beside a replica ([`state`]), written through `durable`
//! only after a sink's commit, and the replication flow that plans, copies, checkpoints and
//! commits one disk ([`replicate`]). The sinks a replica is written through (a sparse raw file
//! or block device, an NBD export) are `blockio`'s.

pub mod replicate;
pub mod state;
