//! Reliability: runs killed at random moments, a full disk, an unwritable destination,
//! manifests that catch a changed byte, and `--force` that never deletes what we did not write.
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;
use minitron::numerics::rng::SplitMix64;

/// Whether `minitron-verify --manifest path` accepts the artifact.
fn manifest_ok(path: &Path) -> bool {
    run("minitron-verify", &["--manifest", s(path)])
        .status
        .success()
}

/// Every entry of `dir`: (name, is a temporary of ours).
fn entries(dir: &Path) -> Vec<(String, bool)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(String, bool)> = rd
        .map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            let tmp = n.starts_with('.')
                && (n.ends_with(".tmp") || n.ends_with(".partial") || n.ends_with(".old"));
            (n, tmp)
        })
        .collect();
    v.sort();
    v
}

/// After an interrupted run: every artifact under `out` that carries its final name is whole
/// (its manifest accepts it). A GGUF's sidecar is written before the file takes its name, so
/// a sidecar alone is a leftover, not an artifact.
fn assert_no_half_artifact(out: &Path, when: &str) {
    for (name, tmp) in entries(out) {
        let p = out.join(&name);
        if tmp || name.ends_with(".manifest.json") {
            continue;
        }
        if p.is_dir() || name.ends_with(".gguf") {
            assert!(manifest_ok(&p), "{when}: {} is not whole", p.display());
        }
    }
}

/// Kills `minitron-convert model --to targets --out out --force` at `n` random moments inside
/// a run (drawn over one uninterrupted run's duration); after each kill, checks what is left,
/// and at the end that one more run succeeds and leaves no temporaries.
fn kill_at_random_moments(model: &Path, targets: &str, n: usize, seed: u64) {
    let t = tempdir();
    let out = t.path().join("out");
    let args = |force: bool| -> Vec<String> {
        let mut a = vec![
            s(model).to_owned(),
            "--to".into(),
            targets.into(),
            "--out".into(),
            s(&out).to_owned(),
        ];
        if force {
            a.push("--force".into());
        }
        a
    };
    let start = Instant::now();
    let a = args(false);
    run_ok(
        "minitron-convert",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let full = start.elapsed();
    std::fs::remove_dir_all(&out).unwrap();
    let mut rng = SplitMix64::new(seed);
    // (kills inside a run, kills after it ended). Kills are drawn until `n` have landed inside
    // a run; a run that ends before its kill shortens the window the next ones are drawn from
    // (a loaded machine makes the first, timed run slower than the rest).
    let mut outcomes = (0, 0);
    let mut window = full;
    let mut i = 0;
    while outcomes.0 < n && i < 4 * n {
        let frac = (rng.next_u64() % 1000) as f64 / 1000.0;
        let delay = window.mul_f64(frac);
        let mut child = Command::new(bin("minitron-convert"))
            .args(args(true))
            .env_remove("RAYON_NUM_THREADS")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let killed = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        child.wait().unwrap();
        if killed {
            outcomes.0 += 1;
        } else {
            outcomes.1 += 1;
            window = window.mul_f64(0.8);
        }
        assert_no_half_artifact(&out, &format!("kill {i} after {delay:?}"));
        i += 1;
    }
    eprintln!(
        "{} kills: {} interrupted a run, {} came after it ended (the first run took {full:?})",
        i, outcomes.0, outcomes.1
    );
    assert_eq!(outcomes.0, n, "too few kills landed inside a run");
    let a = args(true);
    run_ok(
        "minitron-convert",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let left: Vec<String> = entries(&out)
        .into_iter()
        .filter(|e| e.1)
        .map(|e| e.0)
        .collect();
    assert!(
        left.is_empty(),
        "temporaries left after a good run: {left:?}"
    );
    assert_no_half_artifact(&out, "after the last run");
}

#[test]
fn killed_conversions_leave_nothing_or_a_whole_artifact() {
    kill_at_random_moments(&tiny(), "fp8,int8,gguf:q8_0", 20, 7);
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn killed_smollm2_conversions_leave_nothing_or_a_whole_artifact() {
    kill_at_random_moments(&assets().join("smollm2-135m"), "fp8,gguf:q8_0", 20, 11);
}

/// Runs the converter under a file-size limit of `kib` KiB (RLIMIT_FSIZE, as a full disk would
/// stop it).
fn convert_limited(kib: u64, args: &[&str]) -> std::process::Output {
    let mut cmd = format!("ulimit -f {kib} && exec '{}'", s(&bin("minitron-convert")));
    for a in args {
        cmd.push_str(&format!(" '{a}'"));
    }
    Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .unwrap()
}

#[test]
fn a_full_disk_is_an_error_that_leaves_nothing() {
    for target in ["fp8", "gguf:q8_0"] {
        let t = tempdir();
        let out = t
            .path()
            .join(if target == "fp8" { "out" } else { "out.gguf" });
        let o = convert_limited(256, &[s(&tiny()), "--to", target, "--out", s(&out)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{target}: {err}");
        assert!(err.contains("File too large"), "{target}: {err}");
        assert!(!err.contains("panicked"), "{target}: {err}");
        assert!(
            entries(t.path()).is_empty(),
            "{target}: left behind {:?}",
            entries(t.path())
        );
    }
}

#[test]
fn an_unwritable_destination_is_an_error_that_leaves_nothing() {
    let t = tempdir();
    let file = t.path().join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    for (target, name) in [("fp8", "out"), ("gguf:q8_0", "out.gguf")] {
        let out = file.join(name);
        let err = run_err_code(
            "minitron-convert",
            &[s(&tiny()), "--to", target, "--out", s(&out)],
            1,
        );
        assert!(err.contains("a-file"), "{target}: {err}");
    }
    assert_eq!(entries(t.path()), vec![("a-file".to_owned(), false)]);
}

#[test]
fn the_manifest_catches_any_changed_byte_and_any_missing_or_extra_file() {
    let t = tempdir();
    let out = t.path().join("fp8");
    let gguf = t.path().join("q.gguf");
    run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "fp8", "--out", s(&out)],
    );
    run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "gguf:q8_0", "--out", s(&gguf)],
    );
    let ok = run_ok("minitron-verify", &["--manifest", s(&out)]);
    assert!(ok.contains("ok") && !ok.contains("CHANGED"), "{ok}");
    assert!(manifest_ok(&gguf));
    // Every file but the manifest itself (which cannot hold its own hash).
    let mut files: Vec<std::path::PathBuf> = entries(&out)
        .into_iter()
        .filter(|(n, _)| n != "minitron-manifest.json")
        .map(|(n, _)| out.join(n))
        .collect();
    files.push(gguf.clone());
    let mut rng = SplitMix64::new(3);
    for f in &files {
        let orig = std::fs::read(f).unwrap();
        let mut b = orig.clone();
        let at = (rng.next_u64() % b.len() as u64) as usize;
        b[at] ^= 1 << (rng.next_u64() % 8);
        std::fs::write(f, &b).unwrap();
        let target = if f == &gguf { &gguf } else { &out };
        let err = run_err("minitron-verify", &["--manifest", s(target)]);
        let o = run("minitron-verify", &["--manifest", s(target)]);
        let table = String::from_utf8_lossy(&o.stdout);
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(
            table.contains(&format!("CHANGED  {name}")),
            "byte {at} of {name}:\n{table}\n{err}"
        );
        assert!(err.contains("1 changed"), "{err}");
        std::fs::write(f, &orig).unwrap();
    }
    assert!(manifest_ok(&out) && manifest_ok(&gguf));
    std::fs::write(out.join("stray.txt"), b"x").unwrap();
    let err = run_err("minitron-verify", &["--manifest", s(&out)]);
    assert!(err.contains("1 extra"), "{err}");
    std::fs::remove_file(out.join("stray.txt")).unwrap();
    std::fs::remove_file(out.join("config.json")).unwrap();
    let err = run_err("minitron-verify", &["--manifest", s(&out)]);
    assert!(err.contains("1 missing"), "{err}");
}

#[test]
fn force_never_deletes_a_folder_we_did_not_write() {
    let t = tempdir();
    let out = t.path().join("models");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    let err = run_err(
        "minitron-convert",
        &[s(&tiny()), "--to", "fp8", "--out", s(&out), "--force"],
    );
    assert!(err.contains("not an artifact this tool wrote"), "{err}");
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
    // An artifact of ours is replaced.
    let ours = t.path().join("fp8");
    for _ in 0..2 {
        run_ok(
            "minitron-convert",
            &[s(&tiny()), "--to", "fp8", "--out", s(&ours), "--force"],
        );
    }
    assert!(manifest_ok(&ours));
}

/// Every file under `dir` (recursively) with its sha256, the manifests' run records aside: a
/// manifest differs between runs by its command line and times, so only its `files` list (the
/// sha256 of every other file) and its per-tensor errors and α are kept.
fn artifact_digest(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if p.is_dir() {
                stack.push(p);
            } else if rel.ends_with("manifest.json") {
                let m: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                let kept = serde_json::json!([m["files"], m["tensor_error"], m["smoothquant"]]);
                out.push((rel, kept.to_string()));
            } else {
                out.push((rel, minitron::model::checkpoint::sha256_file(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Converts `model` with `args` once uninterrupted, then again with `--resume`, killing each
/// attempt at a random moment (10 … 35 % of the uninterrupted run's duration) until one
/// finishes: the resumed artifacts must equal the uninterrupted ones byte for byte, and at
/// least `min_resumed` attempts must have continued from a journal (the kills land between
/// records as well as at the start, so a resumed attempt is not guaranteed by each kill).
fn resume_after_kills(
    model: &Path,
    args: &[&str],
    seed: u64,
    max_kills: usize,
    min_resumed: usize,
) {
    let t = tempdir();
    let reference = t.path().join("reference");
    let out = t.path().join("out");
    let with_out = |o: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![s(model).to_owned()];
        a.extend(args.iter().map(|x| x.to_string()));
        a.extend(["--out".to_owned(), s(o).to_owned()]);
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let start = Instant::now();
    let a = with_out(&reference, &[]);
    run_ok(
        "minitron-convert",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let full = start.elapsed();
    let want = artifact_digest(&reference);
    let mut rng = SplitMix64::new(seed);
    let (mut kills, mut resumed, mut finished) = (0, 0, false);
    while kills < max_kills && !finished {
        // 10 … 35 % of a whole run: most attempts are killed, after some blocks are written.
        let frac = 0.1 + (rng.next_u64() % 250) as f64 / 1000.0;
        let log = t.path().join(format!("attempt-{kills}.log"));
        let mut child = Command::new(bin("minitron-convert"))
            .args(with_out(&out, &["--resume", "--journal-every", "0"]))
            .env_remove("RAYON_NUM_THREADS")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(frac));
        finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        resumed += usize::from(text.contains("resuming from the journal"));
        if finished {
            assert!(status.success(), "attempt {kills} failed:\n{text}");
        } else {
            kills += 1;
        }
    }
    if !finished {
        let a = with_out(&out, &["--resume"]);
        let o = run(
            "minitron-convert",
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let text = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "the last resumed run failed:\n{text}");
        resumed += usize::from(text.contains("resuming from the journal"));
    }
    eprintln!(
        "{kills} kills, {resumed} attempts resumed from a journal (uninterrupted run: {full:?})"
    );
    assert!(
        resumed >= min_resumed,
        "only {resumed} attempts resumed from a journal"
    );
    assert_eq!(artifact_digest(&out), want, "resumed output differs");
    let left: Vec<String> = entries(t.path())
        .into_iter()
        .filter(|e| e.1)
        .map(|e| e.0)
        .collect();
    assert!(
        left.is_empty(),
        "temporaries left after the resumed run: {left:?}"
    );
}

const TINY_MULTI: [&str; 8] = [
    "--to",
    "fp8,int8,w4a16,gguf:q4_k_m",
    "--int4-weights",
    "gptq",
    "--calib-samples",
    "8",
    "--calib-seq",
    "64",
];

#[test]
fn resumed_multi_target_runs_write_the_same_bytes() {
    // The tiny model's run is short: most kills land before its first journal record, so this
    // checks that --resume without a record starts over and still writes the same bytes.
    resume_after_kills(&tiny(), &TINY_MULTI, 5, 4, 0);
}

/// A run that dies right after journal record `n` (the fault-injection variable aborts the
/// process there, leaving everything as SIGKILL would), then `--resume`: same bytes as an
/// uninterrupted run. The tiny model has two blocks, so its records come after block 0
/// (block 1 next) and after block 1 (the final norm and head next).
#[test]
fn runs_that_die_after_each_journal_record_resume_to_the_same_bytes() {
    let t = tempdir();
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![s(&tiny()).to_owned()];
        a.extend(TINY_MULTI.iter().map(|x| x.to_string()));
        a.extend(["--out".to_owned(), s(out).to_owned()]);
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let reference = t.path().join("reference");
    let a = args(&reference, &[]);
    run_ok(
        "minitron-convert",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let want = artifact_digest(&reference);
    for n in 1..=2 {
        let out = t.path().join(format!("out{n}"));
        let a = args(&out, &["--journal-every", "0"]);
        let o = Command::new(bin("minitron-convert"))
            .args(&a)
            .env("MINITRON_ABORT_AFTER_JOURNAL", n.to_string())
            .env_remove("RAYON_NUM_THREADS")
            .output()
            .unwrap();
        assert!(!o.status.success(), "record {n}: the run was not stopped");
        assert_no_half_artifact(&out, &format!("stopped after record {n}"));
        // Without --resume (or --force) the journal is not thrown away silently.
        let a = args(&out, &[]);
        let err = run_err(
            "minitron-convert",
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert!(err.contains("--resume"), "{err}");
        let a = args(&out, &["--resume"]);
        let o = run(
            "minitron-convert",
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let text = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success(),
            "record {n}: the resumed run failed:\n{text}"
        );
        assert!(
            text.contains("resuming from the journal"),
            "record {n}: {text}"
        );
        assert_eq!(
            artifact_digest(&out),
            want,
            "record {n}: resumed output differs"
        );
    }
    let left: Vec<String> = entries(t.path())
        .into_iter()
        .filter(|e| e.1)
        .map(|e| e.0)
        .collect();
    assert!(
        left.is_empty(),
        "temporaries left after the resumed runs: {left:?}"
    );
}

/// A journal is for the command that wrote it: `--resume` with other options is refused.
#[test]
fn a_journal_from_other_options_is_refused() {
    let t = tempdir();
    let out = t.path().join("out");
    let mut a: Vec<String> = vec![s(&tiny()).to_owned()];
    a.extend(TINY_MULTI.iter().map(|x| x.to_string()));
    a.extend([
        "--out".to_owned(),
        s(&out).to_owned(),
        "--journal-every".into(),
        "0".into(),
    ]);
    let o = Command::new(bin("minitron-convert"))
        .args(&a)
        .env("MINITRON_ABORT_AFTER_JOURNAL", "1")
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let i = a.iter().position(|x| x == "8").unwrap();
    a[i] = "6".into();
    a.push("--resume".into());
    let err = run_err(
        "minitron-convert",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(err.contains("other options"), "{err}");
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn resumed_smollm2_gptq_runs_killed_at_random_moments_write_the_same_bytes() {
    resume_after_kills(
        &assets().join("smollm2-135m"),
        &[
            "--to",
            "w4a16",
            "--int4-weights",
            "gptq",
            "--group-size",
            "64",
            "--calib-samples",
            "4",
            "--calib-seq",
            "256",
            "--calib-inputs",
            "quantized",
        ],
        13,
        4,
        2,
    );
}

/// Hidden states past `--calib-hidden-mib` live in a temporary file instead of memory: the
/// same bytes come out (for original and quantized inputs), and no file is left behind.
#[test]
fn spilled_hidden_states_write_the_same_bytes() {
    let t = tempdir();
    let model = tiny();
    for (k, args) in [
        &[
            "--to",
            "w4a16",
            "--int4-weights",
            "gptq",
            "--calib-inputs",
            "quantized",
        ][..],
        &["--to", "fp8,int8,gguf:q4_k_m", "--int8-weights", "gptq"][..],
    ]
    .into_iter()
    .enumerate()
    {
        let convert = |out: &Path, extra: &[&str]| {
            let mut a: Vec<&str> = vec![s(&model)];
            a.extend(args);
            a.extend(["--calib-samples", "6", "--calib-seq", "64", "--out", s(out)]);
            a.extend(extra);
            let o = run("minitron-convert", &a);
            let text = String::from_utf8_lossy(&o.stderr).into_owned();
            assert!(o.status.success(), "{a:?}:\n{text}");
            text
        };
        let held = t.path().join(format!("held{k}"));
        let text = convert(&held, &[]);
        assert!(!text.contains("temporary file"), "{text}");
        let spilled = t.path().join(format!("spilled{k}"));
        let text = convert(&spilled, &["--calib-hidden-mib", "0"]);
        assert!(text.contains("kept in a temporary file"), "{text}");
        assert_eq!(
            artifact_digest(&spilled),
            artifact_digest(&held),
            "{args:?}"
        );
    }
    let left: Vec<String> = entries(t.path())
        .into_iter()
        .filter(|e| e.0.starts_with('.'))
        .map(|e| e.0)
        .collect();
    assert!(left.is_empty(), "files left: {left:?}");
}
