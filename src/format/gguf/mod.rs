//! GGUF v3: one table of value types and ggml types shared by a bounds-checked reader and a
//! streaming writer (formats/gguf.md).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

pub mod keys;
pub mod llama;
pub mod types;

pub use types::GgmlType;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type id and elements.
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// An integer value of any width, widened.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn strings(v: impl IntoIterator<Item = String>) -> Value {
        Value::Array(8, v.into_iter().map(Value::String).collect())
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            Value::U8(v) => w.write_all(&[*v]),
            Value::I8(v) => w.write_all(&v.to_le_bytes()),
            Value::U16(v) => w.write_all(&v.to_le_bytes()),
            Value::I16(v) => w.write_all(&v.to_le_bytes()),
            Value::U32(v) => w.write_all(&v.to_le_bytes()),
            Value::I32(v) => w.write_all(&v.to_le_bytes()),
            Value::F32(v) => w.write_all(&v.to_le_bytes()),
            Value::Bool(v) => w.write_all(&[*v as u8]),
            Value::String(s) => write_str(w, s),
            Value::Array(t, items) => {
                w.write_all(&t.to_le_bytes())?;
                w.write_all(&(items.len() as u64).to_le_bytes())?;
                for it in items {
                    it.write(w)?;
                }
                Ok(())
            }
            Value::U64(v) => w.write_all(&v.to_le_bytes()),
            Value::I64(v) => w.write_all(&v.to_le_bytes()),
            Value::F64(v) => w.write_all(&v.to_le_bytes()),
        }
    }
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

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

/// A tensor to be written: its info (offset filled in by the writer).
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

/// Bytes per piece handed to a [`GgufWriter`]'s writing thread, and pieces it may have queued.
const WRITE_PIECE: usize = 1 << 26;
const WRITE_PIECES_IN_FLIGHT: usize = 4;
/// Where pieces `(file offset, bytes)` go to be written.
type PieceSender = std::sync::mpsc::SyncSender<(u64, Vec<u8>)>;

/// Writer: all metadata and tensor infos are known up front, so the header is written once and
/// every tensor's place in the file is fixed; tensors are then written in any order
/// ([`GgufWriter::write_at`]) or in plan order ([`GgufWriter::write_tensor`]), and the padding
/// between them is zeros. Written to a temporary name and renamed by [`GgufWriter::finish`];
/// dropped unfinished, the temporary file is removed.
pub struct GgufWriter {
    tmp: PathBuf,
    dest: PathBuf,
    file: File,
    /// The thread that writes pieces `(offset, bytes)` at their offsets, while the caller
    /// quantizes the next tensor.
    io: Option<(PieceSender, std::thread::JoinHandle<Result<OrderedHash>>)>,
    /// The writing thread's hash, once it has stopped.
    hash: Option<OrderedHash>,
    plan: Vec<TensorInfo>,
    /// Which planned tensors have been written.
    written: Vec<bool>,
    /// File offset of the data section.
    data_start: u64,
    finished: bool,
}

impl GgufWriter {
    pub fn create(
        dest: &Path,
        metadata: &[(String, Value)],
        tensors: &[PlannedTensor],
    ) -> Result<Self> {
        let tmp = crate::format::safetensors::temp_path(dest);
        let made = Self::create_at(dest, &tmp, metadata, tensors, None);
        if made.is_err() {
            // A header that could not be written leaves no temporary behind.
            let _ = std::fs::remove_file(&tmp);
        }
        made
    }

    /// Reopens the temporary file of an interrupted [`Self::create`] with the same metadata and
    /// plan: the tensors `written` marks (as [`Self::mark`] returned them) are kept, the rest
    /// are written again. The header is written again too (the same bytes).
    pub fn resume(
        dest: &Path,
        metadata: &[(String, Value)],
        tensors: &[PlannedTensor],
        written: &[bool],
    ) -> Result<Self> {
        let tmp = crate::format::safetensors::temp_path(dest);
        if written.len() != tensors.len() {
            return Err(Error::Invalid(format!(
                "{}: the journal records {} tensors, the plan has {}",
                tmp.display(),
                written.len(),
                tensors.len()
            )));
        }
        Self::create_at(dest, &tmp, metadata, tensors, Some(written))
    }

    fn create_at(
        dest: &Path,
        tmp: &Path,
        metadata: &[(String, Value)],
        tensors: &[PlannedTensor],
        resume: Option<&[bool]>,
    ) -> Result<Self> {
        let tmp = tmp.to_owned();
        let alignment = match metadata.iter().find(|(k, _)| k == keys::GENERAL_ALIGNMENT) {
            Some((_, Value::U32(a))) => *a as u64,
            _ => DEFAULT_ALIGNMENT,
        };
        let mut seen = BTreeMap::new();
        for (k, _) in metadata {
            if seen.insert(k.clone(), ()).is_some() {
                return Err(Error::Invalid(format!("duplicate GGUF key {k}")));
            }
        }
        let mut plan = Vec::with_capacity(tensors.len());
        let mut off = 0u64;
        for t in tensors {
            if t.name.len() >= 64 {
                return Err(Error::Invalid(format!(
                    "GGUF tensor name `{}` is 64 bytes or longer",
                    t.name
                )));
            }
            let info = TensorInfo {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
                offset: off,
            };
            let ne0 = t.dims.first().copied().unwrap_or(1) as usize;
            if !ne0.is_multiple_of(t.ty.block_size()) {
                return Err(Error::Invalid(format!(
                    "tensor `{}`: row length {ne0} is not a multiple of {}'s block size",
                    t.name,
                    t.ty.name()
                )));
            }
            off += (info.nbytes() as u64).div_ceil(alignment) * alignment;
            plan.push(info);
        }
        // Readable too: the file's hash reads back what was not hashed in order.
        let had = match resume {
            Some(_) => Some(
                std::fs::metadata(&tmp)
                    .map_err(|e| Error::io(&tmp, e))?
                    .len(),
            ),
            None => None,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(resume.is_none())
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, f);
        let io = |e| Error::io(&tmp, e);
        w.write_all(MAGIC).map_err(io)?;
        w.write_all(&VERSION.to_le_bytes()).map_err(io)?;
        w.write_all(&(plan.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&(metadata.len() as u64).to_le_bytes())
            .map_err(io)?;
        for (k, v) in metadata {
            write_str(&mut w, k).map_err(io)?;
            w.write_all(&v.type_id().to_le_bytes()).map_err(io)?;
            v.write(&mut w).map_err(io)?;
        }
        for t in &plan {
            write_str(&mut w, &t.name).map_err(io)?;
            w.write_all(&(t.dims.len() as u32).to_le_bytes())
                .map_err(io)?;
            for d in &t.dims {
                w.write_all(&d.to_le_bytes()).map_err(io)?;
            }
            w.write_all(&t.ty.id().to_le_bytes()).map_err(io)?;
            w.write_all(&t.offset.to_le_bytes()).map_err(io)?;
        }
        let pos = w.stream_position().map_err(io)?;
        let data_start = pos.div_ceil(alignment) * alignment;
        w.write_all(&vec![0u8; (data_start - pos) as usize])
            .map_err(io)?;
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        if let Some(have) = had.filter(|&h| h != data_start + off) {
            return Err(Error::format(
                &tmp,
                format!(
                    "an interrupted GGUF file of this plan holds {} bytes, this one {have}",
                    data_start + off
                ),
            ));
        }
        // The data section's final length; unwritten gaps (padding) read as zeros.
        file.set_len(data_start + off)
            .map_err(|e| Error::io(&tmp, e))?;
        let mut extents: Vec<(u64, u64)> = plan
            .iter()
            .map(|t| {
                (
                    data_start + t.offset,
                    data_start + t.offset + t.nbytes() as u64,
                )
            })
            .collect();
        extents.sort_unstable();
        let file_len = data_start + off;
        let mut hash = OrderedHash::start(&file, &tmp, data_start, extents, file_len)?;
        if resume.is_some() {
            // What was written before the interruption is read back at the end.
            hash.in_order = false;
        }
        let io = spawn_writer(&file, &tmp, hash)?;
        Ok(GgufWriter {
            tmp,
            dest: dest.to_owned(),
            file,
            io: Some(io),
            hash: None,
            written: resume.map_or_else(|| vec![false; plan.len()], <[bool]>::to_vec),
            plan,
            data_start,
            finished: false,
        })
    }

    /// The planned tensors, in file order.
    pub fn plan(&self) -> &[TensorInfo] {
        &self.plan
    }

    /// Waits until every tensor handed over so far is in the file (and synced); returns which
    /// planned tensors are written, for [`Self::resume`].
    pub fn mark(&mut self) -> Result<Vec<bool>> {
        self.join_io()?;
        self.file.sync_data().map_err(|e| Error::io(&self.tmp, e))?;
        let hash = self
            .hash
            .take()
            .expect("the writing thread returned its hash");
        self.io = Some(spawn_writer(&self.file, &self.tmp, hash)?);
        Ok(self.written.clone())
    }

    /// Writes planned tensor `index`'s bytes at its place in the file (copied, in pieces, to the
    /// writing thread).
    pub fn write_at(&mut self, index: usize, bytes: &[u8]) -> Result<()> {
        let at = self.check_write(index, bytes.len())?;
        for (i, piece) in bytes.chunks(WRITE_PIECE).enumerate() {
            self.send(at + (i * WRITE_PIECE) as u64, piece.to_vec())?;
        }
        self.written[index] = true;
        Ok(())
    }

    /// [`Self::write_at`] for bytes the caller no longer needs (handed over without a copy).
    pub fn write_owned(&mut self, index: usize, bytes: Vec<u8>) -> Result<()> {
        let at = self.check_write(index, bytes.len())?;
        self.send(at, bytes)?;
        self.written[index] = true;
        Ok(())
    }

    /// The file offset of planned tensor `index`, after checking it takes `len` bytes and has
    /// not been written.
    fn check_write(&self, index: usize, len: usize) -> Result<u64> {
        let t = self
            .plan
            .get(index)
            .ok_or_else(|| Error::Invalid(format!("no planned tensor #{index}")))?;
        if len != t.nbytes() {
            return Err(Error::Invalid(format!(
                "tensor `{}`: {len} bytes given, {} planned",
                t.name,
                t.nbytes()
            )));
        }
        if self.written[index] {
            return Err(Error::Invalid(format!("tensor `{}` written twice", t.name)));
        }
        Ok(self.data_start + t.offset)
    }

    /// Queues a piece for the writing thread; if the thread has stopped, returns its error.
    fn send(&mut self, at: u64, bytes: Vec<u8>) -> Result<()> {
        let (tx, _) = self.io.as_ref().expect("writer open");
        if tx.send((at, bytes)).is_ok() {
            return Ok(());
        }
        self.join_io()?;
        Err(Error::Invalid(format!(
            "{}: the writing thread stopped",
            self.tmp.display()
        )))
    }

    /// Waits for every queued piece to be written; returns the writing thread's error, if any.
    fn join_io(&mut self) -> Result<()> {
        let Some((tx, handle)) = self.io.take() else {
            return Ok(());
        };
        drop(tx);
        match handle.join() {
            Ok(r) => {
                self.hash = Some(r?);
                Ok(())
            }
            Err(_) => Err(Error::Invalid(format!(
                "{}: the writing thread panicked",
                self.tmp.display()
            ))),
        }
    }

    /// Writes the first tensor not yet written (plan order).
    pub fn write_tensor(&mut self, bytes: &[u8]) -> Result<()> {
        let next = self
            .written
            .iter()
            .position(|w| !w)
            .ok_or_else(|| Error::Invalid("more tensors written than planned".into()))?;
        self.write_at(next, bytes)
    }

    /// Syncs and renames into place; returns the file's name, size and sha256. Fails if a
    /// planned tensor was not written.
    pub fn finish(self) -> Result<crate::format::safetensors::WrittenFile> {
        self.finish_then(|_| Ok(()))
    }

    /// [`Self::finish`], running `before_rename` with the finished file's record just before
    /// the rename (a sidecar written there exists whenever the file does).
    pub fn finish_then(
        mut self,
        before_rename: impl FnOnce(&crate::format::safetensors::WrittenFile) -> Result<()>,
    ) -> Result<crate::format::safetensors::WrittenFile> {
        let done = self.written.iter().filter(|w| **w).count();
        if done != self.plan.len() {
            return Err(Error::Invalid(format!(
                "{done} of {} planned tensors written",
                self.plan.len()
            )));
        }
        self.join_io()?;
        let hash = self
            .hash
            .take()
            .expect("the writing thread returned its hash");
        let (bytes, sha256) = hash.finish(&self.file, &self.tmp)?;
        self.file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        let record = crate::format::safetensors::WrittenFile {
            file: self
                .dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes,
            sha256,
        };
        before_rename(&record)?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.finished = true;
        Ok(record)
    }
}

/// Starts the thread that writes pieces `(offset, bytes)` into `file` and feeds `hash`.
fn spawn_writer(
    file: &File,
    path: &Path,
    mut hash: OrderedHash,
) -> Result<(PieceSender, std::thread::JoinHandle<Result<OrderedHash>>)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(WRITE_PIECES_IN_FLIGHT);
    let out = file.try_clone().map_err(|e| Error::io(path, e))?;
    let owned = path.to_owned();
    let handle = std::thread::Builder::new()
        .name("minitron-gguf-writer".into())
        .spawn(move || -> Result<OrderedHash> {
            use std::os::unix::fs::FileExt;
            let mut since = 0usize;
            for (at, bytes) in rx {
                out.write_all_at(&bytes, at)
                    .map_err(|e| Error::io(&owned, e))?;
                hash.feed(at, &bytes);
                since += bytes.len();
                if since >= 1 << 28 {
                    crate::format::safetensors::start_writeback(&out);
                    since = 0;
                }
            }
            Ok(hash)
        })
        .map_err(|e| Error::io(path, e))?;
    Ok((tx, handle))
}

/// The sha256 of a GGUF file being written, taken as its pieces arrive while they arrive in
/// file order (the padding between tensors hashed as the zeros it is); from the first piece
/// out of order on, the rest is read back from the file at the end.
struct OrderedHash {
    h: sha2::Sha256,
    /// Bytes hashed so far (a file offset).
    pos: u64,
    /// Every tensor's (start, end) in the file, sorted.
    extents: Vec<(u64, u64)>,
    /// The tensor `pos` is in.
    k: usize,
    file_len: u64,
    in_order: bool,
}

impl OrderedHash {
    /// Hashes the header already in `file` (`[0, data_start)`).
    fn start(
        file: &File,
        path: &Path,
        data_start: u64,
        extents: Vec<(u64, u64)>,
        file_len: u64,
    ) -> Result<Self> {
        use sha2::Digest;
        let mut o = OrderedHash {
            h: sha2::Sha256::new(),
            pos: 0,
            extents,
            k: 0,
            file_len,
            in_order: true,
        };
        o.read_back(file, path, data_start)?;
        o.skip_padding();
        Ok(o)
    }

    fn feed(&mut self, at: u64, bytes: &[u8]) {
        use sha2::Digest;
        if !self.in_order || at != self.pos {
            self.in_order = false;
            return;
        }
        self.h.update(bytes);
        self.pos += bytes.len() as u64;
        self.skip_padding();
    }

    /// Past the end of finished tensors, hashes the zeros up to the next one (or the end).
    fn skip_padding(&mut self) {
        use sha2::Digest;
        while self.k < self.extents.len() && self.pos >= self.extents[self.k].1 {
            let next = self.extents.get(self.k + 1).map_or(self.file_len, |e| e.0);
            while self.pos < next {
                let n = (next - self.pos).min(4096);
                self.h.update(&[0u8; 4096][..n as usize]);
                self.pos += n;
            }
            self.k += 1;
        }
    }

    /// Hashes the file's bytes from `pos` up to `end`.
    fn read_back(&mut self, file: &File, path: &Path, end: u64) -> Result<()> {
        use sha2::Digest;
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 1 << 24];
        while self.pos < end {
            let n = ((end - self.pos) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], self.pos)
                .map_err(|e| Error::io(path, e))?;
            self.h.update(&buf[..n]);
            self.pos += n as u64;
        }
        Ok(())
    }

    /// The file's length and sha256 (hex), reading back what was not hashed in order.
    fn finish(mut self, file: &File, path: &Path) -> Result<(u64, String)> {
        use sha2::Digest;
        let end = self.file_len;
        self.read_back(file, path, end)?;
        Ok((end, crate::numerics::hex(&self.h.finalize())))
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        let _ = self.join_io();
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        let md = vec![
            (
                keys::GENERAL_TYPE.to_owned(),
                Value::String("imatrix".into()),
            ),
            (
                "a.list".to_owned(),
                Value::strings(["x".to_owned(), "yz".to_owned()]),
            ),
            ("a.n".to_owned(), Value::U32(7)),
        ];
        let f32t = GgmlType::F32;
        let plan = vec![
            PlannedTensor {
                name: "t0".into(),
                dims: vec![3],
                ty: f32t,
            },
            PlannedTensor {
                name: "t1".into(),
                dims: vec![2, 2],
                ty: f32t,
            },
        ];
        let mut w = GgufWriter::create(&p, &md, &plan).unwrap();
        w.write_tensor(
            &[1f32, 2., 3.]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        w.write_tensor(
            &[4f32, 5., 6., 7.]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let wf = w.finish().unwrap();
        assert_eq!(
            wf.sha256,
            crate::model::checkpoint::sha256_file(&p).unwrap()
        );
        assert_eq!(wf.bytes, std::fs::metadata(&p).unwrap().len());
        let r = GgufFile::open(&p).unwrap();
        assert_eq!(r.metadata, md);
        assert_eq!(r.tensors[1].offset, 32);
        assert_eq!(r.f32_values("t1").unwrap(), vec![4., 5., 6., 7.]);
    }

    #[test]
    fn file_hash_holds_for_any_write_order() {
        let dir = tempfile::tempdir().unwrap();
        // Tensors of 5, 0, 70 and 3 f32 values: padding after each, an empty one in between.
        let sizes = [5usize, 0, 70, 3];
        let plan: Vec<PlannedTensor> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| PlannedTensor {
                name: format!("t{i}"),
                dims: vec![n as u64],
                ty: GgmlType::F32,
            })
            .collect();
        let bytes = |i: usize| -> Vec<u8> {
            (0..sizes[i])
                .flat_map(|v| ((i * 100 + v) as f32).to_le_bytes())
                .collect()
        };
        let mut shas = Vec::new();
        for order in [[0, 1, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0]] {
            let p = dir.path().join(format!("x{order:?}.gguf"));
            let mut w = GgufWriter::create(&p, &[], &plan).unwrap();
            for i in order {
                w.write_at(i, &bytes(i)).unwrap();
            }
            let wf = w.finish().unwrap();
            assert_eq!(
                wf.sha256,
                crate::model::checkpoint::sha256_file(&p).unwrap()
            );
            shas.push(wf.sha256);
        }
        assert!(shas.iter().all(|s| *s == shas[0]), "{shas:?}");
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        let plan = vec![PlannedTensor {
            name: "t0".into(),
            dims: vec![3],
            ty: GgmlType::F32,
        }];
        let w = GgufWriter::create(&p, &[], &plan).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
