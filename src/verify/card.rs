//! `minitron-verify --card`: a model card (Markdown) with what this run measured and where the
//! artifact came from, written beside the artifact and listed in its manifest
//! (formats/verify.md#card).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::export::manifest::{sidecar_path, MANIFEST_FILE};
use crate::verify::report::Report;

/// Where the card of `candidate` goes: `README.md` in a checkpoint folder, `FILE.gguf.md`
/// beside a GGUF file.
pub fn card_path(candidate: &Path) -> PathBuf {
    if candidate.is_dir() {
        candidate.join("README.md")
    } else {
        let mut n = candidate.file_name().unwrap_or_default().to_os_string();
        n.push(".md");
        candidate.with_file_name(n)
    }
}

/// The artifact's manifest: the folder's, or the GGUF file's sidecar.
fn manifest_path(candidate: &Path) -> PathBuf {
    if candidate.is_dir() {
        candidate.join(MANIFEST_FILE)
    } else {
        sidecar_path(candidate)
    }
}

fn text_of(v: &serde_json::Value, k: &str) -> String {
    v.get(k)
        .map(|x| match x {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_else(|| "—".into())
}

/// The card's Markdown for `r`, with the artifact's manifest `m` (when it has one).
pub fn render(r: &Report, m: Option<&serde_json::Value>) -> String {
    let mut s = String::new();
    let name = Path::new(&r.candidate)
        .file_name()
        .map_or(r.candidate.clone(), |n| n.to_string_lossy().into_owned());
    let _ = writeln!(s, "# {name}\n");
    if let Some(m) = m {
        let _ = writeln!(
            s,
            "Made by {} {} as `{}` from `{}`.\n",
            text_of(m, "tool"),
            text_of(m, "version"),
            text_of(m, "target"),
            m.get("input").map_or("—".into(), |i| text_of(i, "dir"))
        );
        let _ = writeln!(s, "```\n{}\n```\n", text_of(m, "command_line"));
    }
    let _ = writeln!(
        s,
        "Measured with {} {} on {} ({}, {} threads, {} compute){}.\n",
        r.tool,
        r.version,
        r.machine.cpu,
        r.settings.device,
        r.settings.threads,
        r.settings.compute_dtype,
        r.reference
            .as_ref()
            .map_or(String::new(), |x| format!(", against `{x}`"))
    );
    let _ = writeln!(s, "| measurement | value |\n|---|---|");
    if let Some(p) = &r.ppl {
        let _ = writeln!(
            s,
            "| perplexity ({} chunks × {} tokens of `{}`) | {:.4} ± {:.4} |",
            p.chunks, r.settings.ctx, p.text, p.perplexity.ppl, p.perplexity.stderr
        );
    }
    if let Some(k) = &r.kld {
        let d = &k.divergence;
        let _ = writeln!(
            s,
            "| reference perplexity | {:.4} (Δ {:+.3} %) |",
            k.reference_perplexity.ppl, k.delta_ppl_pct
        );
        let _ = writeln!(
            s,
            "| mean KL-divergence vs reference | {:.6} ± {:.6} |",
            d.mean_kld, d.mean_kld_stderr
        );
        let _ = writeln!(
            s,
            "| top-1 agreement | {:.3} ± {:.3} % |",
            d.top1_agreement_pct, d.top1_agreement_stderr_pct
        );
    }
    if let Some(t) = &r.tasks {
        let _ = writeln!(
            s,
            "| {} accuracy ({} tasks, {}) | {:.2} % [{:.2}, {:.2}] |",
            t.suite.name(),
            t.tasks,
            t.subset,
            t.candidate.acc,
            t.candidate.wilson95[0],
            t.candidate.wilson95[1]
        );
        let _ = writeln!(
            s,
            "| {} lm-eval acc / acc_norm | {:.2} % / {:.2} % |",
            t.suite.name(),
            t.candidate.lmeval_acc,
            t.candidate.lmeval_acc_norm
        );
        if let (Some(a), Some(p)) = (&t.reference, &t.paired) {
            let _ = writeln!(s, "| reference accuracy | {:.2} % |", a.acc);
            let _ = writeln!(
                s,
                "| recovery | {} (same choice {:.2} %, McNemar p = {:.4}) |",
                crate::verify::tasks::percent(p.recovery),
                p.same_choice,
                p.mcnemar_p
            );
        }
    }
    if let Some(g) = &r.gen {
        if let (Some(e), Some(rate)) = (g.exact_match, g.exact_match_rate) {
            let _ = writeln!(
                s,
                "| greedy generation identical to the reference | {e} of {} prompts ({:.1} %) |",
                g.prompts.len(),
                100.0 * rate
            );
        }
    }
    let _ = writeln!(s, "\n## Inputs\n\n| input | sha256 |\n|---|---|");
    for (k, v) in &r.inputs_sha256 {
        let _ = writeln!(s, "| `{k}` | `{v}` |");
    }
    let _ = writeln!(
        s,
        "\nMeasured by `{}`; the full report is its `--report FILE.json`.",
        r.command_line
    );
    s
}

/// Writes the card of `r` beside its artifact (temporary name, then renamed) and lists it in
/// the artifact's manifest, so `minitron-verify --manifest` still passes. Returns the card's
/// path.
pub fn write(r: &Report) -> Result<PathBuf> {
    let candidate = Path::new(&r.candidate);
    let path = card_path(candidate);
    let mp = manifest_path(candidate);
    let mut manifest: Option<serde_json::Value> = match std::fs::read_to_string(&mp) {
        Ok(t) => Some(serde_json::from_str(&t).map_err(|e| Error::format(&mp, e.to_string()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&mp, e)),
    };
    let text = render(r, manifest.as_ref());
    write_atomic(&path, text.as_bytes())?;
    if let Some(m) = manifest.as_mut() {
        let file = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let entry = serde_json::json!({
            "file": file,
            "bytes": text.len() as u64,
            "sha256": crate::model::checkpoint::sha256_file(&path)?,
        });
        let files = m
            .get_mut("files")
            .and_then(|f| f.as_array_mut())
            .ok_or_else(|| Error::format(&mp, "no `files` list"))?;
        files.retain(|f| f.get("file").and_then(|x| x.as_str()) != Some(file.as_str()));
        files.push(entry);
        let t = serde_json::to_string_pretty(m).map_err(|e| Error::Internal(e.to_string()))?;
        write_atomic(&mp, (t + "\n").as_bytes())?;
    }
    Ok(path)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.partial",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
