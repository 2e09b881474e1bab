//! safetensors (formats/hf-llama.md#safetensors): a memory-mapped reader that validates every
//! header itself (so a damaged file is reported with the file and tensor at fault), a writer of
//! small files in one go (calibration statistics), the streaming sharded writer for model
//! artifacts, and the one shard planner both the writer and the synthetic checkpoints use.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::numerics::Dtype;

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the file's data section.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One memory-mapped safetensors file with its validated header.
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    /// Tensors by name, in name order.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// The optional `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Maps `path` and validates its header against the file's size.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; a file changed underneath us by another process
        // could change the bytes we read, which is the documented risk of every mmap reader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (data_start, tensors, metadata) = parse_header(&mmap, path)?;
        Ok(SafetensorsFile {
            path: path.to_owned(),
            mmap,
            data_start,
            tensors,
            metadata,
        })
    }

    /// Drops this process's resident pages of tensor `name` (the page cache keeps them). Streaming
    /// conversions call it after each tensor so that resident memory stays at one tensor's worth
    /// instead of growing to the size of the checkpoint.
    pub fn release(&self, name: &str) {
        if let Some(t) = self.tensors.get(name) {
            self.release_range(name, 0..t.end - t.start);
        }
    }

    /// sha256 of the whole file, hashed straight from the mapping (no copy through a read
    /// buffer), each 16 MiB released after it is hashed so the hash never holds the file.
    pub fn sha256(&self) -> String {
        use sha2::Digest;
        const STEP: usize = 1 << 24;
        let mut h = sha2::Sha256::new();
        let mut off = 0;
        while off < self.mmap.len() {
            let end = (off + STEP).min(self.mmap.len());
            h.update(&self.mmap[off..end]);
            let whole = (end - off) / 4096 * 4096;
            if whole > 0 {
                // SAFETY: as in `release_range`: DONTNEED on a read-only file mapping only
                // drops our page-table entries; `off` is a multiple of STEP, so page-aligned.
                let _ = unsafe {
                    self.mmap
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, whole)
                };
            }
            off = end;
        }
        crate::numerics::hex(&h.finalize())
    }

    /// [`SafetensorsFile::release`] for bytes `range` of tensor `name` (whole pages inside it).
    pub fn release_range(&self, name: &str, range: std::ops::Range<usize>) {
        let Some(t) = self.tensors.get(name) else {
            return;
        };
        let page = 4096;
        let lo = (t.start + range.start).min(t.end);
        let hi = (t.start + range.end).min(t.end);
        let start = (self.data_start + lo).div_ceil(page) * page;
        let end = (self.data_start + hi) / page * page;
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

    /// The raw little-endian bytes of tensor `name`.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let t = self.tensors.get(name)?;
        Some(&self.mmap[self.data_start + t.start..self.data_start + t.end])
    }
}

/// Data-section start, tensors and `__metadata__` of a safetensors header.
type ParsedHeader = (
    usize,
    BTreeMap<String, TensorInfo>,
    BTreeMap<String, String>,
);

fn parse_header(buf: &[u8], path: &Path) -> Result<ParsedHeader> {
    let fail = |msg: String| Error::format(path, msg);
    if buf.len() < 8 {
        return Err(fail(format!(
            "not a safetensors file: {} bytes, expected at least 8 for the header length",
            buf.len()
        )));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    let file_len = buf.len() as u64;
    if n > MAX_HEADER_BYTES {
        return Err(fail(format!(
            "safetensors header of {n} bytes is larger than the {MAX_HEADER_BYTES} bytes the format allows"
        )));
    }
    if n > file_len - 8 {
        return Err(fail(format!(
            "safetensors header length {n} runs past the end of the file ({file_len} bytes)"
        )));
    }
    let data_start = 8 + n as usize;
    let header: Entries = serde_json::from_slice(&buf[8..data_start]).map_err(|e| {
        fail(format!(
            "safetensors header is not a valid JSON object: {e}"
        ))
    })?;
    let data_len = buf.len() - data_start;
    let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in &header.0 {
        if tensors.contains_key(name) || (name == "__metadata__" && !metadata.is_empty()) {
            return Err(fail(format!("tensor `{name}` appears twice in the header")));
        }
        if name.contains(['\0', '/', '\\']) || name.split('.').any(|p| p.is_empty()) {
            return Err(fail(format!(
                "tensor name {:?} is not a dotted name (no `/`, `\\`, NUL or empty parts)",
                name
            )));
        }
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, v) in m {
                    metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
                }
            }
            continue;
        }
        let bad = |what: &str| fail(format!("tensor `{name}`: {what} in the header entry {v}"));
        let dtype_s = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype"))?;
        let dtype = Dtype::parse(dtype_s).ok_or_else(|| bad("unknown dtype"))?;
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("a non-integer dimension"))?;
        let offs = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)))
            .ok_or_else(|| bad("no [begin, end] data_offsets"))?;
        let (start, end) = offs;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("an overflowing shape"))?;
        let want = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| bad("an overflowing shape"))?;
        if end < start || end - start != want {
            return Err(fail(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] span {} bytes, expected {want} for {dtype} {shape:?}",
                end.wrapping_sub(start)
            )));
        }
        if end > data_len {
            return Err(fail(format!(
                "tensor `{name}`: data_offsets end {end} runs past the data section ({data_len} bytes; file truncated?)"
            )));
        }
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                start,
                end,
            },
        );
    }
    let mut spans: Vec<(&String, usize, usize)> =
        tensors.iter().map(|(n, t)| (n, t.start, t.end)).collect();
    spans.sort_by_key(|&(_, a, b)| (a, b));
    for w in spans.windows(2) {
        if w[1].1 < w[0].2 {
            return Err(fail(format!(
                "tensors `{}` [{}, {}] and `{}` [{}, {}] overlap in the data section",
                w[0].0, w[0].1, w[0].2, w[1].0, w[1].1, w[1].2
            )));
        }
    }
    Ok((data_start, tensors, metadata))
}

/// The largest header the safetensors format accepts (its reference reader's limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A JSON object's entries in file order, duplicates kept (a plain map would keep only the
/// last of two equal keys, hiding a malformed header).
pub(crate) struct Entries(pub(crate) Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry::<String, Value>()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Whether `name` is one plain file name inside a folder (no separator, `..`, root or NUL).
pub fn is_plain_file_name(name: &str) -> bool {
    let p = Path::new(name);
    !name.contains('\0')
        && p.components().count() == 1
        && matches!(p.components().next(), Some(std::path::Component::Normal(_)))
}

/// A tensor held in memory for writing.
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// `dir/.NAME.tmp` beside `dest`, the name outputs are written under before the final rename.
pub fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.tmp"))
}

/// Writes `tensors` (name order) with `metadata` to `dest`, atomically.
pub fn write_file(
    dest: &Path,
    tensors: &BTreeMap<String, OwnedTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut off = 0usize;
    for (name, t) in tensors {
        let want = t.shape.iter().product::<usize>() * t.dtype.size();
        if want != t.data.len() {
            return Err(Error::Invalid(format!(
                "tensor `{name}`: {} bytes for {} {:?} (expected {want})",
                t.data.len(),
                t.dtype,
                t.shape
            )));
        }
        header.insert(
            name.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + t.data.len()]}),
        );
        off += t.data.len();
    }
    let mut hb = serde_json::to_vec(&serde_json::Value::Object(header)).expect("header serialises");
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let tmp = temp_path(dest);
    let io = |e| Error::io(&tmp, e);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    f.write_all(&(hb.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(&hb).map_err(io)?;
    for t in tensors.values() {
        f.write_all(&t.data).map_err(io)?;
    }
    f.flush().map_err(io)?;
    f.get_ref().sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
}

/// Writes the tensors of `plan` (in that order) to `dest` atomically, asking `fill(i)` for
/// tensor `i`'s bytes one at a time, so only one tensor is in memory beside the file.
pub fn write_streamed(
    dest: &Path,
    plan: &[PlannedTensor],
    fill: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for t in plan {
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + t.nbytes()]}),
        );
        off += t.nbytes();
    }
    let mut hb = serde_json::to_vec(&serde_json::Value::Object(header)).expect("header serialises");
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let tmp = temp_path(dest);
    let io = |e| Error::io(&tmp, e);
    let mut f = std::io::BufWriter::new(File::create(&tmp).map_err(io)?);
    f.write_all(&(hb.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(&hb).map_err(io)?;
    for (i, t) in plan.iter().enumerate() {
        let data = fill(i)?;
        if data.len() as u64 != t.nbytes() {
            return Err(Error::Internal(format!(
                "tensor `{}`: {} bytes made, {} planned",
                t.name,
                data.len(),
                t.nbytes()
            )));
        }
        f.write_all(&data).map_err(io)?;
    }
    f.flush().map_err(io)?;
    f.get_ref().sync_data().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
}

/// One tensor of a planned output.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// Hugging Face's shard layout: tensors (of `sizes` bytes, in order) fill a shard greedily
/// until the next one would pass `max_bytes`, as transformers' `save_pretrained` does; returns
/// the tensor indices of each shard.
pub fn plan_shards(sizes: impl IntoIterator<Item = u64>, max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0u64;
    for (i, b) in sizes.into_iter().enumerate() {
        if size + b > max_bytes && !shards.last().expect("one shard").is_empty() {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        size += b;
    }
    shards
}

/// File name of shard `i` of `n`.
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".to_owned()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// A written output file and its sha256.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WrittenFile {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Streams a sharded safetensors checkpoint into a folder, Hugging Face style: tensors in the
/// planned order, a new shard when the next tensor would pass `max_shard_bytes`, files named
/// `model-0000i-of-0000n.safetensors` (or `model.safetensors` when one suffices) with an index.
/// Every header is known up front, so each tensor is written once, as it is produced, and each
/// file is hashed while it is written.
///
/// Names and sizes are checked on the caller's thread; the bytes go to one I/O thread that
/// writes, hashes and syncs the shards, so quantizing the next tensor overlaps writing this
/// one. At most [`IN_FLIGHT`] pieces of at most [`PIECE`] bytes wait for it.
pub struct ShardedWriter {
    dir: PathBuf,
    shards: Vec<(String, Vec<PlannedTensor>)>,
    shard: usize,
    pos: usize,
    total: u64,
    io: Option<IoThread>,
}

/// The channel to the I/O thread and the thread itself.
type IoThread = (
    std::sync::mpsc::SyncSender<IoMsg>,
    std::thread::JoinHandle<Result<Vec<WrittenFile>>>,
);

impl Drop for ShardedWriter {
    /// An unfinished writer still waits for its I/O thread, so whoever removes the partial
    /// folder afterwards finds nothing more being written into it.
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.io.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// Bytes per message to the I/O thread.
const PIECE: usize = 1 << 26;
/// Messages the I/O thread may have queued.
const IN_FLIGHT: usize = 4;

enum IoMsg {
    /// Start a shard file with this header (length prefix included).
    Open {
        path: PathBuf,
        name: String,
        header: Vec<u8>,
    },
    Data(Vec<u8>),
    /// Flush, sync and record the open shard.
    Close,
    /// Reopen shard `path` of an interrupted run: cut it to `len` bytes, hash those, append.
    Reopen {
        path: PathBuf,
        name: String,
        len: u64,
    },
    /// Flush and sync the open shard; answer with the closed shards and the open one's length.
    Mark(std::sync::mpsc::SyncSender<(Vec<WrittenFile>, u64)>),
}

/// Where a [`ShardedWriter`] stands between two tensors, enough to [`ShardedWriter::resume`]
/// it after the process was killed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WriterMark {
    /// The shard being written and the next tensor in it.
    pub shard: usize,
    pub pos: usize,
    /// Bytes of the open shard on disk (its header included).
    pub file_bytes: u64,
    /// The shards already closed.
    pub closed: Vec<WrittenFile>,
}

/// Asks the kernel to start writing `file`'s dirty pages back now (without waiting), so a
/// final sync has little left to do.
pub fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range only schedules write-back of this open file's pages.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// The I/O thread: writes and hashes what it is sent, in order.
fn io_thread(
    rx: std::sync::mpsc::Receiver<IoMsg>,
    mut written: Vec<WrittenFile>,
) -> Result<Vec<WrittenFile>> {
    use sha2::Digest;
    let mut file: Option<(PathBuf, String, std::io::BufWriter<File>, sha2::Sha256, u64)> = None;
    for m in rx {
        match m {
            IoMsg::Open { path, name, header } => {
                let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
                let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
                w.write_all(&header).map_err(|e| Error::io(&path, e))?;
                let mut h = sha2::Sha256::new();
                h.update(&header);
                let n = header.len() as u64;
                file = Some((path, name, w, h, n));
            }
            IoMsg::Data(d) => {
                let (path, _, w, h, n) = file.as_mut().expect("a shard is open");
                w.write_all(&d).map_err(|e| Error::io(&*path, e))?;
                h.update(&d);
                let before = *n;
                *n += d.len() as u64;
                if before >> 28 != *n >> 28 {
                    start_writeback(w.get_ref());
                }
            }
            IoMsg::Close => {
                let (path, name, mut w, h, bytes) = file.take().expect("a shard is open");
                w.flush().map_err(|e| Error::io(&path, e))?;
                w.get_ref().sync_all().map_err(|e| Error::io(&path, e))?;
                written.push(WrittenFile {
                    file: name,
                    bytes,
                    sha256: crate::numerics::hex(&h.finalize()),
                });
            }
            IoMsg::Reopen { path, name, len } => {
                use std::io::{Read, Seek};
                let io = |e| Error::io(&path, e);
                let mut f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io)?;
                let have = f.metadata().map_err(io)?.len();
                if have < len {
                    return Err(Error::format(
                        &path,
                        format!("the journal counts {len} bytes written, the file holds {have}"),
                    ));
                }
                f.set_len(len).map_err(io)?;
                let mut h = sha2::Sha256::new();
                let mut buf = vec![0u8; 1 << 22];
                let mut left = len;
                while left > 0 {
                    let n = (left as usize).min(buf.len());
                    f.read_exact(&mut buf[..n]).map_err(io)?;
                    h.update(&buf[..n]);
                    left -= n as u64;
                }
                f.seek(std::io::SeekFrom::Start(len)).map_err(io)?;
                let w = std::io::BufWriter::with_capacity(1 << 22, f);
                file = Some((path, name, w, h, len));
            }
            IoMsg::Mark(reply) => {
                let mut len = 0;
                if let Some((path, _, w, _, n)) = file.as_mut() {
                    w.flush().map_err(|e| Error::io(&*path, e))?;
                    w.get_ref().sync_data().map_err(|e| Error::io(&*path, e))?;
                    len = *n;
                }
                // The writer waits for this answer; if it has gone, so has the run.
                let _ = reply.send((written.clone(), len));
            }
        }
    }
    Ok(written)
}

impl ShardedWriter {
    pub fn create(dir: &Path, plan: Vec<PlannedTensor>, max_shard_bytes: u64) -> Result<Self> {
        let mut w = Self::start(dir, plan, max_shard_bytes, Vec::new())?;
        w.open_shard()?;
        Ok(w)
    }

    /// Continues the writer of an interrupted run over the same plan from `mark` (what
    /// [`Self::mark`] returned): the open shard is cut back to the marked length and written on.
    pub fn resume(
        dir: &Path,
        plan: Vec<PlannedTensor>,
        max_shard_bytes: u64,
        mark: WriterMark,
    ) -> Result<Self> {
        let mut w = Self::start(dir, plan, max_shard_bytes, mark.closed.clone())?;
        let fits = mark.shard < w.shards.len() && mark.pos < w.shards[mark.shard].1.len()
            || mark.shard == w.shards.len();
        if !fits || mark.closed.len() != mark.shard {
            return Err(Error::Invalid(format!(
                "{}: the journal's writer position (shard {}, tensor {}) does not fit this output's {} shards",
                dir.display(),
                mark.shard,
                mark.pos,
                w.shards.len()
            )));
        }
        w.shard = mark.shard;
        w.pos = mark.pos;
        if w.shard < w.shards.len() {
            let name = w.shards[w.shard].0.clone();
            w.send(IoMsg::Reopen {
                path: dir.join(&name),
                name,
                len: mark.file_bytes,
            })?;
        }
        Ok(w)
    }

    /// The writer with its I/O thread started and no shard open.
    fn start(
        dir: &Path,
        plan: Vec<PlannedTensor>,
        max_shard_bytes: u64,
        closed: Vec<WrittenFile>,
    ) -> Result<Self> {
        let total = plan.iter().map(PlannedTensor::nbytes).sum();
        let groups = plan_shards(plan.iter().map(PlannedTensor::nbytes), max_shard_bytes);
        let n = groups.len();
        let mut plan = plan.into_iter();
        let shards = groups
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                let members: Vec<PlannedTensor> = plan.by_ref().take(g.len()).collect();
                (shard_name(i, n), members)
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::sync_channel(IN_FLIGHT);
        let handle = std::thread::Builder::new()
            .name("minitron-writer".into())
            .spawn(move || io_thread(rx, closed))
            .map_err(|e| Error::io(dir, e))?;
        Ok(ShardedWriter {
            dir: dir.to_owned(),
            shards,
            shard: 0,
            pos: 0,
            total,
            io: Some((tx, handle)),
        })
    }

    /// Waits until every tensor handed over so far is in its file (and synced); returns where
    /// the writer stands, for [`Self::resume`].
    pub fn mark(&mut self) -> Result<WriterMark> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.send(IoMsg::Mark(tx))?;
        let (closed, file_bytes) = match rx.recv() {
            Ok(v) => v,
            Err(_) => {
                // The I/O thread stopped: its error says why.
                let (_, handle) = self.io.take().expect("writer open");
                return match handle.join() {
                    Ok(Err(e)) => Err(e),
                    _ => Err(Error::Internal("the output writer stopped".into())),
                };
            }
        };
        Ok(WriterMark {
            shard: self.shard,
            pos: self.pos,
            file_bytes,
            closed,
        })
    }

    /// Sends `m` to the I/O thread; if it has stopped, returns the error it stopped with.
    fn send(&mut self, m: IoMsg) -> Result<()> {
        let (tx, _) = self.io.as_ref().expect("writer open");
        if tx.send(m).is_ok() {
            return Ok(());
        }
        let (_, handle) = self.io.take().expect("writer open");
        match handle.join() {
            Ok(Err(e)) => Err(e),
            _ => Err(Error::Invalid("the output writer stopped".into())),
        }
    }

    fn open_shard(&mut self) -> Result<()> {
        let (name, tensors) = &self.shards[self.shard];
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0u64;
        for t in tensors {
            header.insert(t.name.clone(), json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + t.nbytes()]}));
            off += t.nbytes();
        }
        let mut hb =
            serde_json::to_vec(&serde_json::Value::Object(header)).expect("header serialises");
        while !hb.len().is_multiple_of(8) {
            hb.push(b' ');
        }
        let mut bytes = (hb.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&hb);
        let msg = IoMsg::Open {
            path: self.dir.join(name),
            name: name.clone(),
            header: bytes,
        };
        let empty = tensors.is_empty();
        self.pos = 0;
        self.send(msg)?;
        if empty {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        self.send(IoMsg::Close)?;
        self.shard += 1;
        if self.shard < self.shards.len() {
            self.open_shard()?;
        }
        Ok(())
    }

    /// Name of the next tensor the writer expects, if any.
    pub fn next_name(&self) -> Option<&str> {
        self.shards
            .get(self.shard)
            .and_then(|(_, t)| t.get(self.pos))
            .map(|t| t.name.as_str())
    }

    /// Writes the next planned tensor.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let (_, tensors) = self.shards.get(self.shard).ok_or_else(|| {
            Error::Invalid(format!(
                "tensor `{name}` written after the last planned one"
            ))
        })?;
        let t = &tensors[self.pos];
        if t.name != name || t.nbytes() != data.len() as u64 {
            return Err(Error::Invalid(format!(
                "writer expected `{}` ({} bytes), got `{name}` ({} bytes)",
                t.name,
                t.nbytes(),
                data.len()
            )));
        }
        let last = self.pos + 1 == tensors.len();
        for piece in data.chunks(PIECE) {
            self.send(IoMsg::Data(piece.to_vec()))?;
        }
        self.pos += 1;
        if last {
            self.close_shard()?;
        }
        Ok(())
    }

    /// Checks every tensor was written and writes the index when sharded.
    pub fn finish(mut self) -> Result<Vec<WrittenFile>> {
        if self.shard < self.shards.len() {
            return Err(Error::Invalid(format!(
                "output incomplete: next tensor would have been {:?}",
                self.next_name()
            )));
        }
        let (tx, handle) = self.io.take().expect("writer open");
        drop(tx);
        let mut written = handle
            .join()
            .map_err(|_| Error::Invalid("the output writer panicked".into()))??;
        if self.shards.len() > 1 {
            let mut map = BTreeMap::new();
            for (f, ts) in &self.shards {
                for t in ts {
                    map.insert(t.name.clone(), f.clone());
                }
            }
            let idx = self.dir.join("model.safetensors.index.json");
            let text = serde_json::to_string_pretty(
                &json!({"metadata": {"total_size": self.total}, "weight_map": map}),
            )
            .expect("json")
                + "\n";
            std::fs::write(&idx, &text).map_err(|e| Error::io(&idx, e))?;
            written.push(WrittenFile {
                file: "model.safetensors.index.json".into(),
                bytes: text.len() as u64,
                sha256: sha256_bytes(text.as_bytes()),
            });
        }
        Ok(written)
    }
}

/// sha256 of bytes as lowercase hex.
pub fn sha256_bytes(b: &[u8]) -> String {
    use sha2::Digest;
    crate::numerics::hex(&sha2::Sha256::digest(b))
}

/// `.NAME.partial` beside output folder `NAME`: where it is filled before it takes its name.
pub fn partial_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.partial"))
}

/// Starts an output folder: returns the `.NAME.partial` folder to fill. `out` must not exist
/// unless `force`.
pub fn begin_dir(out: &Path, force: bool) -> Result<PathBuf> {
    if out.exists() && !force {
        return Err(Error::Invalid(format!(
            "{} already exists (pass --force to replace it)",
            out.display()
        )));
    }
    if out.exists() {
        replaceable(out)?;
    }
    let tmp = partial_dir(out);
    for stale in [tmp.clone(), tmp.with_extension("old")] {
        if stale.exists() {
            std::fs::remove_dir_all(&stale).map_err(|e| Error::io(&stale, e))?;
        }
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    Ok(tmp)
}

/// Checks that `--force` may replace folder `out`: it must be empty or an artifact we wrote
/// (it holds our manifest), so that a mistyped `--out` never deletes a user's files.
pub fn replaceable(out: &Path) -> Result<()> {
    if !out.is_dir() {
        return Err(Error::Invalid(format!(
            "{} exists and is not a folder; --force replaces only folders this tool wrote",
            out.display()
        )));
    }
    let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    let empty = entries.next().is_none();
    if empty || out.join("minitron-manifest.json").is_file() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{} is not an artifact this tool wrote (no minitron-manifest.json in it), so --force will not delete it; choose another --out",
        out.display()
    )))
}

/// Moves a finished partial folder into place, replacing `out` if it exists. The replacement
/// swaps the two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`) and then deletes the
/// old one from the partial name, so an interrupted replacement never leaves a half-deleted
/// folder under `out`'s name; where the swap is not available the old folder is renamed aside
/// first.
pub fn commit_dir(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        replaceable(out)?;
        if exchange(tmp, out).is_ok() {
            return std::fs::remove_dir_all(tmp).map_err(|e| Error::io(tmp, e));
        }
        let aside = tmp.with_extension("old");
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
        }
        std::fs::rename(out, &aside).map_err(|e| Error::io(out, e))?;
        std::fs::rename(tmp, out).map_err(|e| Error::io(out, e))?;
        return std::fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e));
    }
    std::fs::rename(tmp, out).map_err(|e| Error::io(out, e))
}

/// Swaps two paths in one step.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
        let (ca, cb) = (c(a)?, c(b)?);
        // SAFETY: two NUL-terminated paths relative to the working directory; no memory is
        // shared with the kernel beyond the call.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        Err(std::io::Error::last_os_error())
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (a, b);
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// Builds an output folder atomically: `f` fills the partial folder, which becomes `out` only
/// when `f` succeeds; on failure it is removed.
pub fn build_dir<T>(out: &Path, force: bool, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let tmp = begin_dir(out, force)?;
    match f(&tmp) {
        Ok(v) => {
            commit_dir(&tmp, out)?;
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
