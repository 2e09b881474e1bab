//! GGUF v3: one table of value types and ggml types shared by a bounds-checked reader and a
//! streaming writer (formats/gguf.md).

pub mod keys;
pub mod llama;
mod reader;
pub mod types;
mod value;
mod writer;

pub use reader::{GgufFile, TensorInfo};
pub use types::GgmlType;
pub use value::Value;
pub use writer::{file_size, GgufWriter, PlannedTensor};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;

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
