//! Damaged or inconsistent checkpoints: each one exits with status 1 and a message that names
//! the file and the tensor or field at fault, with what was expected and what was found.

mod common;
use common::*;
use std::path::Path;

fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let t = tempdir();
    copy_dir(&tiny(), t.path());
    edit(t.path());
    t
}

fn inspect_err(dir: &Path) -> String {
    run_err("minitron-convert", &["inspect", s(dir)])
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites the safetensors header of `model.safetensors` through `f`, keeping the data.
fn edit_header(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut h);
    let mut hb = serde_json::to_vec(&h).unwrap();
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hb);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
}

#[test]
fn shard_truncated_by_one_byte() {
    let t = broken_copy(|d| {
        let p = d.join("model.safetensors");
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 1).unwrap();
    });
    let e = inspect_err(t.path());
    assert!(
        e.contains("model.safetensors") && e.contains("runs past the data section"),
        "{e}"
    );
    // The last tensor in the file is the one cut short, and it is named.
    assert!(e.contains("tensor `model.norm.weight`"), "{e}");
}

#[test]
fn header_offsets_past_end_of_file() {
    let t = broken_copy(|d| {
        edit_header(d, |h| {
            let e = &mut h["model.layers.0.mlp.up_proj.weight"]["data_offsets"];
            let end = e[1].as_u64().unwrap();
            *e = serde_json::json!([end + 100_000_000, end + 100_000_000 + (384 * 128 * 2)]);
        })
    });
    let e = inspect_err(t.path());
    assert!(
        e.contains("model.safetensors") && e.contains("model.layers.0.mlp.up_proj.weight"),
        "{e}"
    );
    assert!(e.contains("runs past the data section"), "{e}");
}

#[test]
fn header_is_not_json() {
    let t = broken_copy(|d| {
        let p = d.join("model.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[8] = b'#';
        std::fs::write(&p, bytes).unwrap();
    });
    let e = inspect_err(t.path());
    assert!(
        e.contains("model.safetensors") && e.contains("header is not valid JSON"),
        "{e}"
    );
}

#[test]
fn header_length_past_end_of_file() {
    let t = broken_copy(|d| {
        let p = d.join("model.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&p, bytes).unwrap();
    });
    let e = inspect_err(t.path());
    assert!(
        e.contains("model.safetensors") && e.contains("header length"),
        "{e}"
    );
}

#[test]
fn kv_heads_do_not_divide_heads() {
    let t = broken_copy(|d| edit_config(d, |c| c["num_key_value_heads"] = 3.into()));
    let e = inspect_err(t.path());
    assert!(
        e.contains("config.json") && e.contains("num_key_value_heads"),
        "{e}"
    );
    assert!(
        e.contains("must divide num_attention_heads = 4, found 3"),
        "{e}"
    );
}

#[test]
fn missing_tensor() {
    let t = broken_copy(|d| {
        edit_header(d, |h| {
            h.as_object_mut()
                .unwrap()
                .remove("model.layers.1.mlp.gate_proj.weight");
        })
    });
    let e = inspect_err(t.path());
    assert!(
        e.contains("model.safetensors") && e.contains("model.layers.1.mlp.gate_proj.weight"),
        "{e}"
    );
    assert!(e.contains("missing (expected shape [384, 128])"), "{e}");
}

#[test]
fn shape_mismatch() {
    let t = broken_copy(|d| {
        edit_header(d, |h| {
            // Same byte count, transposed shape: only the shape check can catch it.
            h["model.layers.0.self_attn.k_proj.weight"]["shape"] = serde_json::json!([128, 64]);
        })
    });
    let e = inspect_err(t.path());
    assert!(e.contains("model.layers.0.self_attn.k_proj.weight"), "{e}");
    assert!(
        e.contains("expected shape [64, 128], found shape [128, 64]"),
        "{e}"
    );
}

#[test]
fn unknown_rope_type() {
    let t = broken_copy(|d| edit_config(d, |c| c["rope_scaling"]["rope_type"] = "yarn".into()));
    let e = inspect_err(t.path());
    assert!(
        e.contains("config.json") && e.contains("rope_scaling.rope_type"),
        "{e}"
    );
    assert!(e.contains("unsupported rope type \"yarn\""), "{e}");
}

#[test]
fn verify_reports_bad_input_the_same_way() {
    let t = broken_copy(|d| edit_config(d, |c| c["num_key_value_heads"] = 3.into()));
    let text = root().join("src/model/default_corpus.txt");
    let e = run_err(
        "minitron-verify",
        &[s(t.path()), "--ppl", s(&text), "--ctx", "64"],
    );
    assert!(e.contains("num_key_value_heads"), "{e}");
}

#[test]
fn cuda_in_a_cpu_build_says_so() {
    if cfg!(feature = "cuda") {
        return;
    }
    let text = root().join("src/model/default_corpus.txt");
    let e = run_err(
        "minitron-verify",
        &[s(&tiny()), "--ppl", s(&text), "--device", "cuda"],
    );
    assert!(e.contains("built without CUDA"), "{e}");
}
