//! `minitron-verify` says when the text it evaluates is the candidate's calibration text, or
//! shares much of it, and stays quiet on other text.

mod common;
use common::*;

#[test]
fn verify_warns_on_calibration_text_and_not_on_other_text() {
    let d = tempdir();
    let corpus = std::fs::read_to_string(root().join("src/model/default_corpus.txt")).unwrap();
    let cut = corpus[..corpus.len() / 2]
        .rfind('\n')
        .expect("a line break");
    let (calib, other) = (d.path().join("calib.txt"), d.path().join("other.txt"));
    std::fs::write(&calib, &corpus[..cut]).unwrap();
    std::fs::write(&other, &corpus[cut..]).unwrap();
    // The calibration text again, behind one new line: other bytes, the same content.
    let again = d.path().join("again.txt");
    std::fs::write(&again, format!("A new first line.\n{}", &corpus[..cut])).unwrap();
    let art = d.path().join("art");
    run_ok(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "fp8-static",
            "--calib",
            s(&calib),
            "--calib-samples",
            "4",
            "--calib-seq",
            "64",
            "--out",
            s(&art),
        ],
    );
    let verify = |text: &std::path::Path, report: &str| {
        let r = d.path().join(report);
        let out = run_ok(
            "minitron-verify",
            &[
                s(&art),
                "--ppl",
                s(text),
                "--ctx",
                "64",
                "--chunks",
                "4",
                "--report",
                s(&r),
            ],
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&r).unwrap()).unwrap();
        (out, json)
    };
    let (out, json) = verify(&calib, "same.json");
    assert!(
        out.contains("WARNING") && out.contains("is the artifact's calibration text"),
        "{out}"
    );
    assert_eq!(json["calibration_overlap"]["same_text"], true, "{json}");
    let (out, json) = verify(&again, "again.json");
    assert!(out.contains("WARNING") && out.contains("shares"), "{out}");
    let f = json["calibration_overlap"]["shared_fraction"]
        .as_f64()
        .unwrap();
    assert!(f > 0.5, "{json}");
    let (out, json) = verify(&other, "other.json");
    assert!(!out.contains("WARNING"), "{out}");
    assert!(json.get("calibration_overlap").is_none(), "{json}");
}
