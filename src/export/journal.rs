//! `--resume`: the journal of a long export. Between two blocks (at most every
//! `--journal-every` seconds) the export records where every writer stands, the calibration's
//! hidden states and statistics, and what each artifact has gathered for its manifest; a run
//! killed at any moment continues with `--resume` from the last such record and writes the
//! same bytes as a run that was never interrupted.
//!
//! The journal is the folder `.NAME.resume.partial` beside the output `NAME`; its
//! `journal.json` is replaced atomically, and names the files it needs (hidden states and
//! statistics carry the block number), so a kill while the journal is written leaves the
//! previous record whole. A finished run, or a run that fails with an error (its partial
//! outputs are removed then), removes the journal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::calib::pipeline::CalibCheckpoint;
use crate::error::{Error, Result};
use crate::export::manifest::LayerAlpha;
use crate::export::options::ExportOptions;
use crate::format::safetensors::WriterMark;
use crate::model::Checkpoint;

const JOURNAL_FILE: &str = "journal.json";
const FORMAT: u32 = 2;

/// Where one checkpoint artifact stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CkRecord {
    pub target: String,
    pub writer: WriterMark,
    /// Relative weight error per tensor so far (the manifest's `tensor_error`), as f64 bit
    /// patterns: JSON numbers need not read back to the same bits.
    pub errors: BTreeMap<String, u64>,
    /// SmoothQuant/AWQ α per block: (block, site → f64 bits).
    pub alphas: Vec<(usize, BTreeMap<String, u64>)>,
}

impl CkRecord {
    pub fn errors(&self) -> BTreeMap<String, f64> {
        self.errors
            .iter()
            .map(|(k, v)| (k.clone(), f64::from_bits(*v)))
            .collect()
    }

    pub fn alphas(&self) -> Vec<LayerAlpha> {
        self.alphas
            .iter()
            .map(|(layer, sites)| LayerAlpha {
                layer: *layer,
                sites: sites
                    .iter()
                    .map(|(k, v)| (k.clone(), f64::from_bits(*v)))
                    .collect(),
            })
            .collect()
    }

    /// Bits of every number, which JSON keeps exactly.
    pub fn new(
        target: &str,
        writer: WriterMark,
        errors: &BTreeMap<String, f64>,
        alphas: &[LayerAlpha],
    ) -> Self {
        let bits = |m: &BTreeMap<String, f64>| -> BTreeMap<String, u64> {
            m.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect()
        };
        CkRecord {
            target: target.to_owned(),
            writer,
            errors: bits(errors),
            alphas: alphas.iter().map(|a| (a.layer, bits(&a.sites))).collect(),
        }
    }
}

/// Where one GGUF artifact stands: which planned tensors are in its file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GgufRecord {
    pub target: String,
    pub written: Vec<bool>,
}

/// One record: the export stands between two blocks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub format: u32,
    /// What the run was asked to do, and on which input files (see [`fingerprint`]).
    pub fingerprint: String,
    /// The next input tensor (an index into the export plan's inputs).
    pub next_item: usize,
    /// Input tensors and bytes read so far.
    pub tensors_read: usize,
    pub bytes_read: u64,
    pub ck: Vec<CkRecord>,
    pub gguf: Vec<GgufRecord>,
    pub calib: CalibCheckpoint,
}

/// The journal of this run.
pub(crate) struct Journal {
    dir: PathBuf,
    fingerprint: String,
    every: Duration,
    last: Instant,
    /// Records written by this run.
    records: usize,
}

/// The journal folder of output `out`.
pub fn journal_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.resume.partial"))
}

/// A digest of everything that decides the output bytes: the options (less those that do not:
/// `--force`, `--resume`, `--journal-every`, `--calib-hidden-mib`, the command line), the
/// tool's version, and each
/// input file's path, size and modification time.
fn fingerprint(ck: &Checkpoint, o: &ExportOptions) -> String {
    let mut n = o.clone();
    n.force = false;
    n.resume = false;
    n.journal_every_s = 0;
    n.command_line.clear();
    // Where the hidden states are kept does not change a byte either.
    n.calib.hidden_budget_bytes = 0;
    n.calib.spill_dir = PathBuf::new();
    let mut text = format!("{}\n{n:?}\n", crate::VERSION);
    let mut files: Vec<PathBuf> = ck.files.iter().map(|f| f.path.clone()).collect();
    files.extend(
        [&o.calib.calib, &o.calib.load, &o.gguf.imatrix]
            .into_iter()
            .flatten()
            .cloned(),
    );
    files.push(ck.dir.join("config.json"));
    for p in files {
        let (len, modified) = std::fs::metadata(&p)
            .map(|m| {
                let t = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                (m.len(), t)
            })
            .unwrap_or((0, 0));
        text.push_str(&format!("{} {len} {modified}\n", p.display()));
    }
    crate::format::safetensors::sha256_bytes(text.as_bytes())
}

impl Journal {
    /// Opens the journal of this run: with `--resume`, the record of an interrupted run of the
    /// same request (an error if it was another request), or none (the run starts from the
    /// beginning); without, a journal left by an interrupted run is refused unless `--force`
    /// (which starts over and removes it).
    pub fn open(ck: &Checkpoint, o: &ExportOptions) -> Result<(Journal, Option<Record>)> {
        let dir = journal_dir(&o.out);
        let fp = fingerprint(ck, o);
        let mut found = None;
        let file = dir.join(JOURNAL_FILE);
        if o.resume && file.is_file() {
            let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
            let r: Record = serde_json::from_str(&text)
                .map_err(|e| Error::format(&file, format!("not a minitron journal: {e}")))?;
            if r.format != FORMAT {
                return Err(Error::format(
                    &file,
                    format!("journal format {}, this build reads {FORMAT}", r.format),
                ));
            }
            if r.fingerprint != fp {
                return Err(Error::Invalid(format!(
                    "{} records a run with other options or other input files than this one; run the same command with --resume, or start over with --force instead of --resume",
                    file.display()
                )));
            }
            found = Some(r);
        } else if dir.exists() {
            if !o.force && !o.resume {
                return Err(Error::Invalid(format!(
                    "{} holds the journal of an interrupted run: pass --resume to continue it, or --force to start over",
                    dir.display()
                )));
            }
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Ok((
            Journal {
                dir,
                fingerprint: fp,
                every: Duration::from_secs(o.journal_every_s),
                last: Instant::now(),
                records: 0,
            },
            found,
        ))
    }

    /// The journal's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a record is due (`--journal-every` has passed since the last one).
    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.every
    }

    /// Makes the folder (before the first record's files are saved into it).
    pub fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }

    /// Writes `r` as the latest record (atomically) and removes the files of older ones.
    pub fn write(&mut self, mut r: Record) -> Result<()> {
        r.format = FORMAT;
        r.fingerprint = self.fingerprint.clone();
        let file = self.dir.join(JOURNAL_FILE);
        let tmp = crate::format::safetensors::temp_path(&file);
        let text = serde_json::to_string_pretty(&r).expect("journal serialises") + "\n";
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.write_all(text.as_bytes())
                .map_err(|e| Error::io(&tmp, e))?;
            f.sync_data().map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &file).map_err(|e| Error::io(&file, e))?;
        let keep: Vec<&String> = [&r.calib.hidden, &r.calib.stats]
            .into_iter()
            .flatten()
            .collect();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n != JOURNAL_FILE && !keep.iter().any(|k| **k == n) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.last = Instant::now();
        self.records += 1;
        // Fault injection for the tests: die (no clean-up, as SIGKILL) right after record N.
        if std::env::var("MINITRON_ABORT_AFTER_JOURNAL")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            == Some(self.records)
        {
            std::process::abort();
        }
        Ok(())
    }

    /// Removes the journal (the run finished, or failed and removed its partial outputs).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
