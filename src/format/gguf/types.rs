//! ggml tensor types: one table with each type's id, name, block shape, float dtype and
//! candle type. A test checks it against `formats/ggml-types.tsv`.

use std::str::FromStr;

/// A ggml tensor type.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

use candle_core::quantized::GgmlDType as Q;
use candle_core::DType;
use GgmlType::*;

/// One ggml type: everything the reader, the writer, the encoders and the runner need to know
/// of it. A new type is one row here (and its row encoder in `quant::ggml`).
#[derive(Debug)]
pub struct TypeInfo {
    pub ty: GgmlType,
    /// ggml's type id (the value stored in a tensor info).
    pub id: u32,
    /// ggml's spelling (`Q4_K`).
    pub name: &'static str,
    /// Values per block.
    pub block: usize,
    /// Bytes per block.
    pub bytes: usize,
    /// For plain floating-point storage (no blocks, no scales): the candle dtype that holds
    /// the values unchanged.
    pub float: Option<DType>,
    /// candle's type, for the types this tool writes, reads back and runs.
    pub ggml: Option<Q>,
}

/// The ggml types, in [`GgmlType`]'s order (a test checks both, and checks the ids, names
/// and sizes against `formats/ggml-types.tsv`).
pub const TABLE: [TypeInfo; 20] = [
    TypeInfo {
        ty: F32,
        id: 0,
        name: "F32",
        block: 1,
        bytes: 4,
        float: Some(DType::F32),
        ggml: Some(Q::F32),
    },
    TypeInfo {
        ty: F16,
        id: 1,
        name: "F16",
        block: 1,
        bytes: 2,
        float: Some(DType::F16),
        ggml: Some(Q::F16),
    },
    TypeInfo {
        ty: Q4_0,
        id: 2,
        name: "Q4_0",
        block: 32,
        bytes: 18,
        float: None,
        ggml: Some(Q::Q4_0),
    },
    TypeInfo {
        ty: Q4_1,
        id: 3,
        name: "Q4_1",
        block: 32,
        bytes: 20,
        float: None,
        ggml: Some(Q::Q4_1),
    },
    TypeInfo {
        ty: Q5_0,
        id: 6,
        name: "Q5_0",
        block: 32,
        bytes: 22,
        float: None,
        ggml: Some(Q::Q5_0),
    },
    TypeInfo {
        ty: Q5_1,
        id: 7,
        name: "Q5_1",
        block: 32,
        bytes: 24,
        float: None,
        ggml: Some(Q::Q5_1),
    },
    TypeInfo {
        ty: Q8_0,
        id: 8,
        name: "Q8_0",
        block: 32,
        bytes: 34,
        float: None,
        ggml: Some(Q::Q8_0),
    },
    TypeInfo {
        ty: Q8_1,
        id: 9,
        name: "Q8_1",
        block: 32,
        bytes: 36,
        float: None,
        ggml: None,
    },
    TypeInfo {
        ty: Q2_K,
        id: 10,
        name: "Q2_K",
        block: 256,
        bytes: 84,
        float: None,
        ggml: Some(Q::Q2K),
    },
    TypeInfo {
        ty: Q3_K,
        id: 11,
        name: "Q3_K",
        block: 256,
        bytes: 110,
        float: None,
        ggml: Some(Q::Q3K),
    },
    TypeInfo {
        ty: Q4_K,
        id: 12,
        name: "Q4_K",
        block: 256,
        bytes: 144,
        float: None,
        ggml: Some(Q::Q4K),
    },
    TypeInfo {
        ty: Q5_K,
        id: 13,
        name: "Q5_K",
        block: 256,
        bytes: 176,
        float: None,
        ggml: Some(Q::Q5K),
    },
    TypeInfo {
        ty: Q6_K,
        id: 14,
        name: "Q6_K",
        block: 256,
        bytes: 210,
        float: None,
        ggml: Some(Q::Q6K),
    },
    TypeInfo {
        ty: Q8_K,
        id: 15,
        name: "Q8_K",
        block: 256,
        bytes: 292,
        float: None,
        ggml: None,
    },
    TypeInfo {
        ty: I8,
        id: 24,
        name: "I8",
        block: 1,
        bytes: 1,
        float: None,
        ggml: None,
    },
    TypeInfo {
        ty: I16,
        id: 25,
        name: "I16",
        block: 1,
        bytes: 2,
        float: None,
        ggml: None,
    },
    TypeInfo {
        ty: I32,
        id: 26,
        name: "I32",
        block: 1,
        bytes: 4,
        float: None,
        ggml: None,
    },
    TypeInfo {
        ty: I64,
        id: 27,
        name: "I64",
        block: 1,
        bytes: 8,
        float: None,
        ggml: None,
    },
    TypeInfo {
        ty: F64,
        id: 28,
        name: "F64",
        block: 1,
        bytes: 8,
        float: Some(DType::F64),
        ggml: None,
    },
    TypeInfo {
        ty: BF16,
        id: 30,
        name: "BF16",
        block: 1,
        bytes: 2,
        float: Some(DType::BF16),
        ggml: Some(Q::BF16),
    },
];

impl GgmlType {
    pub const ALL: [GgmlType; 20] = [
        F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, I8, I16,
        I32, I64, F64, BF16,
    ];

    /// This type's row of [`TABLE`].
    pub const fn info(self) -> &'static TypeInfo {
        &TABLE[self as usize]
    }

    /// ggml's type id (the value stored in a tensor info).
    pub const fn id(self) -> u32 {
        self.info().id
    }

    /// ggml's spelling (`Q4_K`).
    pub const fn name(self) -> &'static str {
        self.info().name
    }

    /// Values per block.
    pub const fn block_size(self) -> usize {
        self.info().block
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        self.info().bytes
    }

    /// Plain floating-point storage (no blocks, no scales).
    pub const fn is_float(self) -> bool {
        self.info().float.is_some()
    }

    /// The candle dtype that holds this type's values unchanged, for the float types.
    pub fn candle_dtype(self) -> Option<DType> {
        self.info().float
    }

    /// candle's type, for the types this tool writes, reads back and runs.
    pub fn ggml_dtype(self) -> Option<Q> {
        self.info().ggml
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// Case-insensitive name lookup.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Bytes of a tensor with `ne0` elements per row and `rows` rows, or `None` when `ne0` is not
    /// a multiple of the block size.
    /// Bytes of `rows` rows of `ne0` values; `None` when `ne0` is not a whole number of blocks
    /// or the size does not fit in a `usize`.
    pub fn nbytes(self, ne0: usize, rows: usize) -> Option<usize> {
        if !ne0.is_multiple_of(self.block_size()) {
            return None;
        }
        (ne0 / self.block_size())
            .checked_mul(self.type_size())?
            .checked_mul(rows)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GgmlType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        GgmlType::from_name(s).ok_or_else(|| {
            format!(
                "unknown ggml type `{s}` (available: {})",
                GgmlType::ALL.map(|t| t.name()).join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_follows_the_enum() {
        for (i, t) in GgmlType::ALL.into_iter().enumerate() {
            assert_eq!(TABLE[i].ty, t);
            assert_eq!(t as usize, i);
            assert_eq!(t.info().ty, t);
        }
    }

    #[test]
    fn enum_matches_the_ggml_types_table() {
        let table = include_str!("../../../formats/ggml-types.tsv");
        let rows: Vec<Vec<&str>> = table
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.split('\t').collect())
            .collect();
        assert_eq!(rows.len(), GgmlType::ALL.len());
        for r in rows {
            let t = GgmlType::from_id(r[0].parse().unwrap()).expect("id known");
            assert_eq!(t.name(), r[1]);
            assert_eq!(t.block_size().to_string(), r[2], "{t}");
            assert_eq!(t.type_size().to_string(), r[3], "{t}");
        }
    }
}
