//! Residual streams kept in a temporary file instead of memory, for calibration runs whose
//! hidden states pass a memory budget (`--calib-hidden-mib`). The file holds two copies of
//! every group's stream: a block reads one group from the current copy, runs it, and writes
//! its output to the other copy, so only one group's input and output are in memory at a
//! time; when every group has run, the copies swap roles. The file is unlinked as soon as it
//! is made, so nothing is left behind whatever stops the process.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where the residual streams go when they would hold more than `budget_bytes` of memory.
#[derive(Debug, Clone)]
pub struct SpillSpec {
    pub dir: PathBuf,
    pub budget_bytes: u64,
}

/// The spilled groups: `dims[i]` = `[g, t, hidden]` of group `i`, stored as f32.
pub struct SpillFile {
    file: File,
    path: PathBuf,
    dims: Vec<[usize; 3]>,
    /// Offset of each group inside one copy.
    offsets: Vec<u64>,
    /// Bytes of one copy.
    copy_bytes: u64,
    /// Which copy holds the current streams.
    current: u64,
}

impl SpillFile {
    /// Makes (and unlinks) the file in `dir` for groups of `dims`.
    pub fn create(dir: &Path, dims: Vec<[usize; 3]>) -> Result<Self> {
        let mut offsets = Vec::with_capacity(dims.len());
        let mut off = 0u64;
        for d in &dims {
            offsets.push(off);
            off += (d[0] * d[1] * d[2] * 4) as u64;
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(format!(".minitron-hidden-{}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // The open handle keeps the data; the name goes now.
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        file.set_len(2 * off).map_err(|e| Error::io(&path, e))?;
        Ok(SpillFile {
            file,
            path,
            dims,
            offsets,
            copy_bytes: off,
            current: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.dims.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dims.is_empty()
    }

    pub fn dims(&self, i: usize) -> [usize; 3] {
        self.dims[i]
    }

    /// Bytes of one copy of the streams.
    pub fn bytes(&self) -> u64 {
        self.copy_bytes
    }

    fn at(&self, copy: u64, i: usize) -> u64 {
        copy * self.copy_bytes + self.offsets[i]
    }

    /// Group `i` of the current streams, as a `dtype` tensor on `device`.
    pub fn read(&self, i: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let d = self.dims[i];
        let n = d[0] * d[1] * d[2];
        let mut raw = vec![0u8; n * 4];
        self.file
            .read_exact_at(&mut raw, self.at(self.current, i))
            .map_err(|e| Error::io(&self.path, e))?;
        let t = Tensor::from_raw_buffer(&raw, DType::F32, &d, device)?;
        Ok(t.to_dtype(dtype)?)
    }

    fn write_to(&self, copy: u64, i: usize, t: &Tensor) -> Result<()> {
        if t.dims() != self.dims[i] {
            return Err(Error::Internal(format!(
                "spilled group {i}: {:?} written where {:?} is kept",
                t.dims(),
                self.dims[i]
            )));
        }
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.file
            .write_all_at(&raw, self.at(copy, i))
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Replaces group `i` of the current streams.
    pub fn write_current(&self, i: usize, t: &Tensor) -> Result<()> {
        self.write_to(self.current, i, t)
    }

    /// Writes group `i` of the next streams (what [`Self::flip`] makes current).
    pub fn write_next(&self, i: usize, t: &Tensor) -> Result<()> {
        self.write_to(1 - self.current, i, t)
    }

    /// The next streams become the current ones.
    pub fn flip(&mut self) {
        self.current = 1 - self.current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_round_trip_through_both_copies() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let mut f = SpillFile::create(dir.path(), vec![[2, 3, 4], [1, 5, 4]]).unwrap();
        // Nothing is left under the folder, whatever happens next.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let a = Tensor::arange(0f32, 24., &dev)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let b = Tensor::arange(100f32, 120., &dev)
            .unwrap()
            .reshape((1, 5, 4))
            .unwrap();
        f.write_current(0, &a).unwrap();
        f.write_current(1, &b).unwrap();
        let a2 = (a.clone() * 2.0).unwrap();
        f.write_next(0, &a2).unwrap();
        let back = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(back(f.read(0, DType::F32, &dev).unwrap()), back(a.clone()));
        assert_eq!(back(f.read(1, DType::F32, &dev).unwrap()), back(b.clone()));
        f.flip();
        assert_eq!(back(f.read(0, DType::F32, &dev).unwrap()), back(a2));
        assert!(
            f.write_next(1, &a).is_err(),
            "a group of other dims is refused"
        );
    }
}
