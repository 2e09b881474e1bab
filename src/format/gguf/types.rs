//! ggml tensor types: one enum with each type's id, name, block shape and float-ness. A test
//! checks it against `formats/ggml-types.tsv`.

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

use GgmlType::*;

impl GgmlType {
    pub const ALL: [GgmlType; 20] = [
        F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, I8, I16,
        I32, I64, F64, BF16,
    ];

    /// ggml's type id (the value stored in a tensor info).
    pub const fn id(self) -> u32 {
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
        }
    }

    /// ggml's spelling (`Q4_K`).
    pub const fn name(self) -> &'static str {
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
        }
    }

    /// Values per block.
    pub const fn block_size(self) -> usize {
        match self {
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K => 256,
            _ => 1,
        }
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            I8 => 1,
            I64 | F64 => 8,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            Q8_K => 292,
        }
    }

    /// Plain floating-point storage (no blocks, no scales).
    pub const fn is_float(self) -> bool {
        matches!(self, F32 | F16 | BF16 | F64)
    }

    /// The candle dtype that holds this type's values unchanged, for the float types.
    pub fn candle_dtype(self) -> Option<candle_core::DType> {
        match self {
            F32 => Some(candle_core::DType::F32),
            F16 => Some(candle_core::DType::F16),
            BF16 => Some(candle_core::DType::BF16),
            F64 => Some(candle_core::DType::F64),
            _ => None,
        }
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
