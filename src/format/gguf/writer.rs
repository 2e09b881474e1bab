//! The streaming GGUF writer: header up front, tensors at fixed places in any order, a
//! temporary name until finished.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use super::value::write_str;
use super::{keys, GgmlType, TensorInfo, Value, DEFAULT_ALIGNMENT, MAGIC, VERSION};
use crate::error::{Error, Result};

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

/// The tensors' places in the data section (in plan order), the data section's length and the
/// alignment, after checking the keys and names.
fn lay_out(
    metadata: &[(String, Value)],
    tensors: &[PlannedTensor],
) -> Result<(Vec<TensorInfo>, u64, u64)> {
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
    Ok((plan, off, alignment))
}

/// Magic, version, counts, metadata and tensor infos (no padding).
fn write_header(
    w: &mut impl Write,
    metadata: &[(String, Value)],
    plan: &[TensorInfo],
) -> std::io::Result<()> {
    w.write_all(MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    w.write_all(&(plan.len() as u64).to_le_bytes())?;
    w.write_all(&(metadata.len() as u64).to_le_bytes())?;
    for (k, v) in metadata {
        write_str(w, k)?;
        w.write_all(&v.type_id().to_le_bytes())?;
        v.write(w)?;
    }
    for t in plan {
        write_str(w, &t.name)?;
        w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
        for d in &t.dims {
            w.write_all(&d.to_le_bytes())?;
        }
        w.write_all(&t.ty.id().to_le_bytes())?;
        w.write_all(&t.offset.to_le_bytes())?;
    }
    Ok(())
}

/// The length in bytes of the file [`GgufWriter::create`] writes for `metadata` and `tensors`.
pub fn file_size(metadata: &[(String, Value)], tensors: &[PlannedTensor]) -> Result<u64> {
    let (plan, data, alignment) = lay_out(metadata, tensors)?;
    let mut head = Vec::new();
    write_header(&mut head, metadata, &plan).expect("writing to memory");
    Ok((head.len() as u64).div_ceil(alignment) * alignment + data)
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
        let (plan, off, alignment) = lay_out(metadata, tensors)?;
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
        write_header(&mut w, metadata, &plan).map_err(io)?;
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
