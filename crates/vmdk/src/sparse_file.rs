//! One sparse extent file on its own (hosted sparse, COWD or SEsparse), opened from any byte
//! source: what fuzzers and tools that receive a single file use. Unallocated grains read as
//! zeros here, since there is no parent.

use std::sync::Arc;

use cbt::ExtentSet;

use crate::error::{Result, VmdkError};
use crate::grains::{Run, SparseExtent};
use crate::io::ReadAt;

/// Which sparse format a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseKind {
    /// Hosted sparse (`KDMV`), including streamOptimized.
    Hosted,
    /// COWD (vmfsSparse).
    Cowd,
    /// SEsparse.
    SeSparse,
}

/// A sparse extent file, opened and checked.
#[derive(Debug, Clone)]
pub struct SparseFile {
    kind: SparseKind,
    extent: SparseExtent,
    warnings: Vec<String>,
}

impl SparseFile {
    /// Opens `file`, telling the format by its magic.
    pub fn open(file: Arc<dyn ReadAt>, name: &str) -> Result<Self> {
        let mut magic = [0u8; 8];
        if file.len() < 8 {
            return Err(VmdkError::corrupt(name, "too short for any sparse header"));
        }
        file.read_exact_at(&mut magic, 0).map_err(|e| VmdkError::io(name, e))?;
        let m32 = u32::from_le_bytes([magic[0], magic[1], magic[2], magic[3]]);
        if m32 == crate::kdmv::KDMV_MAGIC {
            let k = crate::kdmv::KdmvExtent::open(file, name)?;
            Ok(Self { kind: SparseKind::Hosted, extent: k.extent, warnings: k.warnings })
        } else if m32 == crate::cowd::COWD_MAGIC {
            Ok(Self { kind: SparseKind::Cowd, extent: crate::cowd::open(file, name)?, warnings: Vec::new() })
        } else if u64::from_le_bytes(magic) == crate::sesparse::CONST_MAGIC {
            Ok(Self { kind: SparseKind::SeSparse, extent: crate::sesparse::open(file, name)?, warnings: Vec::new() })
        } else {
            Err(VmdkError::corrupt(name, "not a KDMV, COWD or SEsparse file"))
        }
    }

    /// The format.
    pub fn kind(&self) -> SparseKind {
        self.kind
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.extent.tables.geometry().capacity
    }

    /// What was odd but readable.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Fills `buf` from `offset`; unallocated grains read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.capacity()) {
            return Err(VmdkError::corrupt(&self.extent.name, format!("read at {offset} runs past the capacity")));
        }
        let mut done = 0;
        while done < buf.len() {
            let n = match self.extent.read_run(offset + done as u64, &mut buf[done..])? {
                Run::Data(n) | Run::Zero(n) => n,
                Run::Unallocated(n) => {
                    buf[done..done + n].fill(0);
                    n
                }
            };
            if n == 0 {
                return Err(VmdkError::corrupt(&self.extent.name, "no progress"));
            }
            done += n;
        }
        Ok(())
    }

    /// The bytes holding data, and those marked zero.
    pub fn allocation(&self) -> (ExtentSet, ExtentSet) {
        let (data, zero) = self.extent.allocation(self.capacity());
        (ExtentSet::from_ranges(data), ExtentSet::from_ranges(zero))
    }
}
