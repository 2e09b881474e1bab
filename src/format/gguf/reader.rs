//! The bounds-checked GGUF reader (memory-mapped).

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{keys, GgmlType, Value, DEFAULT_ALIGNMENT, MAGIC};
use crate::error::{Error, Result};

/// One tensor's entry in the tensor-info table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (row length).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Bytes of the tensor's data (0 when its size cannot be computed; a file whose tensors
    /// have such sizes is refused by [`GgufFile::open`]).
    pub fn nbytes(&self) -> usize {
        self.checked_nbytes().unwrap_or(0)
    }

    /// Bytes of the tensor's data, `None` when they overflow or the row is not whole blocks.
    pub fn checked_nbytes(&self) -> Option<usize> {
        let ne0 = usize::try_from(self.dims.first().copied().unwrap_or(1)).ok()?;
        let mut rows = 1usize;
        for &d in self.dims.iter().skip(1) {
            rows = rows.checked_mul(usize::try_from(d).ok()?)?;
        }
        self.ty.nbytes(ne0, rows)
    }
}

/// A GGUF file opened for reading (memory-mapped).
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    data_start: usize,
    mmap: Mmap,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn fail(&self, what: &str) -> Error {
        Error::format(self.path, format!("GGUF: {what} at byte {}", self.pos))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.fail(&format!("file ends while reading {n} bytes")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(self.fail(&format!("string length {n} runs past the end of the file")));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.fail("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        let b = |c: &mut Self, n| c.take(n);
        Ok(match ty {
            0 => Value::U8(b(self, 1)?[0]),
            1 => Value::I8(b(self, 1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(b(self, 2)?.try_into().expect("2"))),
            3 => Value::I16(i16::from_le_bytes(b(self, 2)?.try_into().expect("2"))),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => match b(self, 1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                v => return Err(self.fail(&format!("bool value {v}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth > 8 {
                    return Err(self.fail("arrays nested too deeply"));
                }
                let et = self.u32()?;
                let n = self.u64()?;
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(self.fail(&format!("array of {n} elements cannot fit in the file")));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(et, depth + 1)?);
                }
                Value::Array(et, items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.fail(&format!("unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Opens and validates `path`: header, metadata, tensor infos, and that every tensor's data
    /// lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping; see SafetensorsFile::open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
        };
        if c.take(4).ok() != Some(MAGIC.as_slice()) {
            return Err(Error::format(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        let mut metadata = Vec::new();
        for _ in 0..n_kv {
            let k = c.string()?;
            let t = c.u32()?;
            let v = c.value(t, 0)?;
            metadata.push((k, v));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == keys::GENERAL_ALIGNMENT) {
            Some((_, Value::U32(a))) if a.is_power_of_two() => *a as u64,
            Some((_, v)) => {
                return Err(Error::format(
                    path,
                    format!(
                        "{} {v:?} is not a power of two u32",
                        keys::GENERAL_ALIGNMENT
                    ),
                ))
            }
            None => DEFAULT_ALIGNMENT,
        };
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()?;
            if nd > 4 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}`: {nd} dimensions (at most 4)"),
                ));
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let tid = c.u32()?;
            let ty = GgmlType::from_id(tid).ok_or_else(|| {
                Error::format(path, format!("tensor `{name}`: unknown ggml type {tid}"))
            })?;
            let offset = c.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        // Each tensor's offset must be the running sum of the padded sizes before it (the
        // layout every GGUF writer produces and llama.cpp requires); all sums checked.
        let mut expected = 0u64;
        for t in &tensors {
            if let Some(i) = t.dims.iter().position(|&d| d == 0) {
                return Err(Error::format(
                    path,
                    format!("tensor `{}`: dimension {i} is 0", t.name),
                ));
            }
            let ne0 = t.dims.first().copied().unwrap_or(1);
            if !ne0.is_multiple_of(t.ty.block_size() as u64) {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{}`: row length {ne0} is not a multiple of {}'s block size {}",
                        t.name,
                        t.ty.name(),
                        t.ty.block_size()
                    ),
                ));
            }
            let size = t.checked_nbytes().ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "tensor `{}`: dimensions {:?} of {} give a size that does not fit in memory",
                        t.name,
                        t.dims,
                        t.ty.name()
                    ),
                )
            })? as u64;
            if t.offset != expected {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{}`: data offset {} (expected {expected}, the padded sum of the tensors before it)",
                        t.name, t.offset
                    ),
                ));
            }
            data_start
                .checked_add(t.offset)
                .and_then(|v| v.checked_add(size))
                .filter(|&e| e <= mmap.len() as u64)
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!(
                            "tensor `{}`: {size} bytes at data offset {} run past the end of the file ({} bytes)",
                            t.name,
                            t.offset,
                            mmap.len()
                        ),
                    )
                })?;
            expected = size
                .div_ceil(alignment)
                .checked_mul(alignment)
                .and_then(|v| v.checked_add(expected))
                .ok_or_else(|| Error::format(path, "tensor sizes overflow"))?;
        }
        Ok(GgufFile {
            path: path.to_owned(),
            version,
            metadata,
            tensors,
            alignment,
            data_start: data_start as usize,
            mmap,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Raw bytes of a tensor.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let s = self.data_start + t.offset as usize;
        &self.mmap[s..s + t.nbytes()]
    }

    /// Drops this process's resident pages of tensor `name` (the file cache keeps them; later
    /// reads fault them back in).
    pub fn release(&self, name: &str) {
        let Some(t) = self.tensor(name) else {
            return;
        };
        let page = 4096;
        let lo = self.data_start + t.offset as usize;
        let start = lo.div_ceil(page) * page;
        let end = (lo + t.nbytes()) / page * page;
        if end > start {
            // SAFETY: DONTNEED on a read-only file mapping only discards our page-table entries;
            // later reads fault the unchanged file contents back in.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    /// An F32 tensor's values.
    pub fn f32_values(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensor(name)
            .ok_or_else(|| Error::format(&self.path, format!("no tensor `{name}`")))?;
        if t.ty.id() != 0 {
            return Err(Error::format(
                &self.path,
                format!("tensor `{name}`: expected F32, found {}", t.ty.name()),
            ));
        }
        Ok(self
            .data(t)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
            .collect())
    }
}
