//! The replica target: what keeps a replica of a disk in step with its source. Its sinks (a
//! sparse raw file or block device, an NBD export) are `blockio`'s.
