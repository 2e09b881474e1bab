//! Damaged or inconsistent inputs: each one exits with status 2 and a message that names
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
    with_header_text(dir, |t| {
        let mut h: serde_json::Value = serde_json::from_str(t).unwrap();
        f(&mut h);
        serde_json::to_string(&h).unwrap()
    });
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
        e.contains("model.safetensors") && e.contains("header is not a valid JSON object"),
        "{e}"
    );
}

#[test]
fn header_length_past_end_of_file() {
    let t = broken_copy(|d| {
        let p = d.join("model.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[..8].copy_from_slice(&50_000_000u64.to_le_bytes());
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
#[cfg_attr(feature = "cuda", ignore = "a CUDA build has the CUDA device")]
fn cuda_in_a_cpu_build_says_so() {
    let text = root().join("src/model/default_corpus.txt");
    let e = run_err(
        "minitron-verify",
        &[s(&tiny()), "--ppl", s(&text), "--device", "cuda"],
    );
    assert!(e.contains("built without CUDA"), "{e}");
}

/// A GGUF file built byte by byte: `kv` raw key/value records, then tensor infos
/// (name, dims, type id, offset), padding to 32, and `data`.
fn gguf_bytes(
    version: u32,
    n_tensors: u64,
    kv: &[Vec<u8>],
    tensors: &[(&str, Vec<u64>, u32, u64)],
    data: &[u8],
) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for r in kv {
        b.extend(r);
    }
    for (name, dims, ty, off) in tensors {
        b.extend((name.len() as u64).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(data);
    b
}

/// A key/value record: key, value type, value bytes.
fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = (key.len() as u64).to_le_bytes().to_vec();
    b.extend(key.as_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(value);
    b
}

#[test]
fn hostile_gguf_files_are_refused_with_the_reason() {
    let f32_4 = vec![0u8; 16];
    let one = |dims: Vec<u64>, ty: u32, off: u64| vec![("t", dims, ty, off)];
    // An array of arrays nested 10,000 deep.
    let mut nested = Vec::new();
    for _ in 0..10_000 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    let mut long_string = (1u64 << 62).to_le_bytes().to_vec();
    long_string.extend(b"abc");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("wrong magic", b"GGUX\x03\0\0\0".to_vec(), "magic"),
        (
            "version 1",
            gguf_bytes(1, 0, &[], &[], &[]),
            "GGUF version 1 is not supported",
        ),
        (
            "version 4",
            gguf_bytes(4, 0, &[], &[], &[]),
            "GGUF version 4 is not supported",
        ),
        (
            "tensor count 2^40",
            gguf_bytes(3, 1 << 40, &[], &[], &[]),
            "file ends while reading",
        ),
        (
            "string length 2^62",
            gguf_bytes(3, 0, &[kv("general.name", 8, &long_string)], &[], &[]),
            "string length 4611686018427387904 runs past the end",
        ),
        (
            "arrays nested 10,000 deep",
            gguf_bytes(3, 0, &[kv("a", 9, &nested)], &[], &[]),
            "arrays nested too deeply",
        ),
        (
            "offset past the end",
            gguf_bytes(3, 1, &[], &one(vec![4], 0, 0), &f32_4[..8]),
            "run past the end of the file",
        ),
        (
            "unknown ggml type",
            gguf_bytes(3, 1, &[], &one(vec![4], 99, 0), &f32_4),
            "unknown ggml type 99",
        ),
        (
            "misaligned data",
            gguf_bytes(3, 1, &[], &one(vec![4], 0, 1), &[0u8; 32]),
            "data offset 1 (expected 0",
        ),
        (
            "zero dimension",
            gguf_bytes(3, 1, &[], &one(vec![4, 0], 0, 0), &f32_4),
            "dimension 1 is 0",
        ),
        (
            "offset near 2^64",
            gguf_bytes(3, 1, &[], &one(vec![4], 0, u64::MAX - 15), &f32_4),
            "data offset 18446744073709551600 (expected 0",
        ),
        (
            "size past 2^64",
            gguf_bytes(
                3,
                1,
                &[],
                &one(vec![1 << 32, 1 << 32, 1 << 8], 0, 0),
                &f32_4,
            ),
            "does not fit in memory",
        ),
    ];
    let t = tempdir();
    let text = root().join("src/model/default_corpus.txt");
    for (what, bytes, want) in cases {
        let p = t.path().join("bad.gguf");
        std::fs::write(&p, &bytes).unwrap();
        let e = run_err(
            "minitron-verify",
            &[s(&p), "--ppl", s(&text), "--ctx", "64"],
        );
        assert!(
            e.contains("bad.gguf") && e.contains(want),
            "{what}: expected `{want}` in:\n{e}"
        );
        eprintln!("{what}: {}", e.trim());
    }
}

/// `model.safetensors` of the fixture with its header text replaced by `f(header)` (data kept).
fn with_header_text(dir: &Path, f: impl FnOnce(&str) -> String) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let mut hb = f(text).into_bytes();
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hb);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
}

#[test]
fn hostile_safetensors_headers_are_refused_with_the_reason() {
    type Edit = Box<dyn Fn(&Path)>;
    let norm = "model.layers.0.input_layernorm.weight";
    let norm2 = "model.layers.0.post_attention_layernorm.weight";
    let rename = |to: &'static str| -> Edit {
        Box::new(move |d: &Path| {
            edit_header(d, |h| {
                let v = h.as_object_mut().unwrap().remove(norm).unwrap();
                h[to] = v;
            })
        })
    };
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "200 MB header",
            Box::new(|d: &Path| {
                let p = d.join("model.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                b[..8].copy_from_slice(&200_000_000u64.to_le_bytes());
                std::fs::write(&p, b).unwrap();
            }),
            "larger than the 100000000 bytes",
        ),
        (
            "overlapping offsets",
            Box::new(move |d: &Path| {
                edit_header(d, |h| {
                    let o = h[norm]["data_offsets"].clone();
                    h[norm2]["data_offsets"] = o;
                })
            }),
            "overlap in the data section",
        ),
        (
            "unknown dtype",
            Box::new(move |d: &Path| edit_header(d, |h| h[norm]["dtype"] = "F128".into())),
            "unknown dtype",
        ),
        (
            "shape × dtype ≠ byte length",
            Box::new(move |d: &Path| {
                edit_header(d, |h| {
                    let n = h[norm]["shape"][0].as_u64().unwrap();
                    h[norm]["shape"][0] = (n + 1).into();
                })
            }),
            "expected",
        ),
        (
            "duplicate names",
            Box::new(move |d: &Path| {
                with_header_text(d, |t| {
                    let h: serde_json::Value = serde_json::from_str(t).unwrap();
                    let entry = h[norm].to_string();
                    format!(
                        "{},\"{norm}\":{entry}}}",
                        &t.trim_end()[..t.trim_end().len() - 1]
                    )
                })
            }),
            "appears twice",
        ),
        (
            "name with /",
            rename("model/layers.0.x"),
            "is not a dotted name",
        ),
        (
            "name with ..",
            rename("model..layers.0.x"),
            "is not a dotted name",
        ),
        (
            "name with NUL",
            rename("model.layers\u{0}.x"),
            "is not a dotted name",
        ),
    ];
    for (what, edit, want) in cases {
        let t = broken_copy(|d| edit(d));
        let e = inspect_err(t.path());
        assert!(
            e.contains("model.safetensors") && e.contains(want),
            "{what}: expected `{want}` in:\n{e}"
        );
        eprintln!("{what}: {}", e.trim());
    }
}

#[test]
fn inconsistent_shard_indexes_are_refused() {
    let index = |d: &Path, text: &str| {
        std::fs::rename(
            d.join("model.safetensors"),
            d.join("model-00001-of-00001.safetensors"),
        )
        .unwrap();
        std::fs::write(d.join("model.safetensors.index.json"), text).unwrap();
    };
    let one = "model-00001-of-00001.safetensors";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a missing shard",
            format!(
                r#"{{"weight_map": {{"model.norm.weight": "model-00002-of-00002.safetensors", "model.embed_tokens.weight": "{one}"}}}}"#
            ),
            "in model-00002-of-00002.safetensors, which is not in the folder",
        ),
        (
            "a tensor twice",
            format!(
                r#"{{"weight_map": {{"model.norm.weight": "{one}", "model.norm.weight": "{one}"}}}}"#
            ),
            "lists tensor `model.norm.weight` twice",
        ),
        (
            "a path outside the folder",
            r#"{"weight_map": {"model.norm.weight": "../model.safetensors"}}"#.to_owned(),
            "points outside the folder",
        ),
        (
            "a tensor the shard does not hold",
            format!(r#"{{"weight_map": {{"model.nonexistent.weight": "{one}"}}}}"#),
            "which does not hold it",
        ),
    ];
    for (what, text, want) in cases {
        let t = broken_copy(|d| index(d, &text));
        let e = inspect_err(t.path());
        assert!(e.contains(want), "{what}: expected `{want}` in:\n{e}");
        eprintln!("{what}: {}", e.trim());
    }
}

#[test]
fn nonfinite_weights_are_refused_unless_allowed() {
    for (what, bits) in [("NaN", 0x7fc0u16), ("-inf", 0xff80)] {
        let t = broken_copy(|d| {
            // The third value of the first layer norm becomes non-finite.
            let p = d.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
            let off = h["model.layers.0.input_layernorm.weight"]["data_offsets"][0]
                .as_u64()
                .unwrap() as usize;
            let at = 8 + n + off + 2 * 2;
            b[at..at + 2].copy_from_slice(&bits.to_le_bytes());
            std::fs::write(&p, b).unwrap();
        });
        let out = tempdir();
        let dest = out.path().join("x");
        let e = run_err(
            "minitron-convert",
            &[s(t.path()), "--to", "fp8", "--out", s(&dest)],
        );
        assert!(
            e.contains("model.safetensors")
                && e.contains("model.layers.0.input_layernorm.weight")
                && e.contains("value 2 (flat index) is NaN or infinite"),
            "{what}: {e}"
        );
        assert!(!dest.exists(), "{what}: output left behind");
        run_ok(
            "minitron-convert",
            &[
                s(t.path()),
                "--to",
                "fp8",
                "--out",
                s(&dest),
                "--allow-nonfinite",
            ],
        );
    }
}

#[test]
fn bad_targets_and_destinations_are_refused_before_anything_is_written() {
    let t = broken_copy(|_| ());
    let e = run_err(
        "minitron-convert",
        &[s(t.path()), "--to", "fp4", "--out", s(&t.path().join("x"))],
    );
    assert!(e.contains("fp4"), "{e}");
    let e = run_err(
        "minitron-convert",
        &[
            s(t.path()),
            "--to",
            "fp8",
            "--out",
            s(&t.path().join("fp8")),
        ],
    );
    assert!(e.contains("inside the input folder"), "{e}");
    assert!(!t.path().join("fp8").exists());
    assert!(!t.path().join(".fp8.partial").exists());
}

#[test]
fn unusable_configs_and_tokenizers_are_refused_with_the_field() {
    type Edit = Box<dyn Fn(&Path)>;
    let cfg =
        |f: fn(&mut serde_json::Value)| -> Edit { Box::new(move |d: &Path| edit_config(d, f)) };
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "missing field",
            cfg(|c| {
                c.as_object_mut().unwrap().remove("hidden_size");
            }),
            &["config.json", "hidden_size", "missing"],
        ),
        (
            "zero size",
            cfg(|c| c["intermediate_size"] = 0.into()),
            &["config.json", "intermediate_size", "positive integer"],
        ),
        (
            "negative size",
            cfg(|c| c["num_hidden_layers"] = (-2).into()),
            &["config.json", "num_hidden_layers", "positive integer"],
        ),
        (
            "vocab vs embedding",
            cfg(|c| {
                let v = c["vocab_size"].as_u64().unwrap();
                c["vocab_size"] = (v + 1).into();
            }),
            &["model.embed_tokens.weight", "expected shape"],
        ),
        (
            "tokenizer.json missing",
            Box::new(|d: &Path| std::fs::remove_file(d.join("tokenizer.json")).unwrap()),
            &["tokenizer.json"],
        ),
        (
            "tokenizer.json corrupt",
            Box::new(|d: &Path| {
                std::fs::write(d.join("tokenizer.json"), b"{\"model\": 7").unwrap()
            }),
            &["tokenizer.json"],
        ),
    ];
    let text = root().join("src/model/default_corpus.txt");
    for (what, edit, want) in cases {
        let t = broken_copy(|d| edit(d));
        let e = run_err(
            "minitron-verify",
            &[s(t.path()), "--ppl", s(&text), "--ctx", "64"],
        );
        for w in want {
            assert!(e.contains(w), "{what}: expected `{w}` in:\n{e}");
        }
        eprintln!("{what}: {}", e.trim());
    }
}

#[test]
fn tied_embeddings_with_a_different_head_are_refused() {
    // The fixture's head is untied and differs from its embeddings: declaring it tied makes
    // the config and the weights disagree.
    let t = broken_copy(|d| edit_config(d, |c| c["tie_word_embeddings"] = true.into()));
    let e = inspect_err(t.path());
    assert!(
        e.contains("model.safetensors") && e.contains("`lm_head.weight`"),
        "{e}"
    );
    assert!(
        e.contains("tie_word_embeddings = true") && e.contains("first difference at element"),
        "{e}"
    );
}

/// Bad calibration, perplexity and prompt texts: empty, not UTF-8, or binary.
#[test]
fn empty_and_binary_texts_are_refused() {
    let t = tempdir();
    let empty = t.path().join("empty.txt");
    std::fs::write(&empty, "  \n\n").unwrap();
    let latin1 = t.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
    // A model file passed where text belongs.
    let binary = t.path().join("weights.txt");
    std::fs::copy(tiny().join("model.safetensors"), &binary).unwrap();
    let out = t.path().join("out");
    let cases: [(&Path, &[&str]); 3] = [
        (&empty, &["empty.txt", "calibration text is empty"]),
        (&latin1, &["latin1.txt", "not UTF-8 text", "offset 3"]),
        (&binary, &["weights.txt", "binary data, not text"]),
    ];
    for (file, want) in cases {
        let e = run_err(
            "minitron-convert",
            &[
                s(&tiny()),
                "--to",
                "int8",
                "--calib",
                s(file),
                "--out",
                s(&out),
            ],
        );
        for w in want {
            assert!(e.contains(w), "--calib {file:?}: expected `{w}` in:\n{e}");
        }
        assert!(!out.exists());
        eprintln!("--calib {}: {}", file.display(), e.trim());
    }
    for flag in ["--ppl", "--gen"] {
        let e = run_err("minitron-verify", &[s(&tiny()), flag, s(&binary)]);
        assert!(
            e.contains("weights.txt") && e.contains("binary data, not text"),
            "{flag}: {e}"
        );
        eprintln!("{flag} binary: {}", e.trim());
    }
}

/// Importance matrices that cannot belong to this model or hold values no calibration makes.
#[test]
fn damaged_or_foreign_imatrices_are_refused() {
    use minitron::calib::imatrix::Imatrix;
    let t = tempdir();
    let good = t.path().join("good.imatrix.gguf");
    run_ok(
        "minitron-convert",
        &[
            "imatrix",
            s(&tiny()),
            "--out",
            s(&good),
            "--calib-samples",
            "2",
            "--calib-seq",
            "64",
        ],
    );
    let im = Imatrix::read(&good).unwrap();
    let first = im.entries.keys().next().unwrap().clone();
    type Edit = fn(&mut Imatrix, &str);
    let cases: [(&str, Edit, &[&str]); 5] = [
        (
            "NaN sum",
            |m, k| m.entries.get_mut(k).unwrap().sum_sq[3] = f32::NAN,
            &["NaN at input channel 3", "finite, non-negative"],
        ),
        (
            "zero count",
            |m, k| m.entries.get_mut(k).unwrap().count = 0.0,
            &["count 0", "recorded no activations"],
        ),
        (
            "negative sum",
            |m, k| m.entries.get_mut(k).unwrap().sum_sq[0] = -1.0,
            &["-1 at input channel 0"],
        ),
        (
            "another model (width)",
            |m, k| m.entries.get_mut(k).unwrap().sum_sq.push(1.0),
            &["the imatrix was made for another model"],
        ),
        (
            "another model (layers)",
            |m, _| {
                let e = m.entries["blk.0.attn_q.weight"].clone();
                m.entries.insert("blk.40.attn_q.weight".into(), e);
            },
            &["blk.40.attn_q.weight", "another model"],
        ),
    ];
    for (what, edit, want) in cases {
        let mut bad = im.clone();
        edit(&mut bad, &first);
        let path = t.path().join("bad.imatrix.gguf");
        bad.write_gguf(&path).unwrap();
        let out = t.path().join("out.gguf");
        let e = run_err(
            "minitron-convert",
            &[
                s(&tiny()),
                "--to",
                "gguf:q4_k_m",
                "--imatrix",
                s(&path),
                "--out",
                s(&out),
            ],
        );
        assert!(e.contains("bad.imatrix.gguf"), "{what}: {e}");
        for w in want {
            assert!(e.contains(w), "{what}: expected `{w}` in:\n{e}");
        }
        assert!(!out.exists(), "{what}");
        eprintln!("{what}: {}", e.trim());
    }
}

#[test]
fn damaged_nvfp4_layers_are_refused_with_the_tensor() {
    let t = tempdir();
    let art = t.path().join("nv");
    run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "nvfp4-a16", "--out", s(&art)],
    );
    let damaged = |name: &str, shape: serde_json::Value| {
        let d = t.path().join(name.replace('.', "-"));
        copy_dir(&art, &d);
        edit_header(&d, |h| h[name]["shape"] = shape);
        d
    };
    // A quantized artifact is not an input to convert again.
    let e = run_err(
        "minitron-convert",
        &[s(&art), "--to", "fp8", "--out", s(&t.path().join("again"))],
    );
    assert!(
        e.contains("config.json: field `quantization_config`: expected an unquantized (bf16, f16 or f32) checkpoint, found one already quantized (compressed-tensors)"),
        "{e}"
    );
    assert!(!t.path().join("again").exists());
    // Codes with the right byte count in the wrong shape: the checkpoint check names them.
    let codes = "model.layers.0.self_attn.k_proj.weight_packed";
    let e = inspect_err(&damaged(codes, serde_json::json!([32, 128])));
    assert!(
        e.contains(codes)
            && e.contains("expected U8 [64, 64] (two FP4 codes per byte), found U8 [32, 128]"),
        "{e}"
    );
    // Group scales transposed: the runner names them before it reads a value.
    let scales = "model.layers.0.self_attn.k_proj.weight_scale";
    let e = run_err(
        "minitron-verify",
        &[
            s(&damaged(scales, serde_json::json!([8, 64]))),
            "--ppl",
            "fixtures/prompts.txt",
            "--ctx",
            "16",
        ],
    );
    assert!(
        e.contains(scales)
            && e.contains(
                "expected F8_E4M3 [64, 8] (one scale per 16 values), found F8_E4M3 [8, 64]"
            ),
        "{e}"
    );
}
