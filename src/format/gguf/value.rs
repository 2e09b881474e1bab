//! GGUF metadata values and their encoding.

use std::io::Write;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type id and elements.
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// An integer value of any width, widened.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn strings(v: impl IntoIterator<Item = String>) -> Value {
        Value::Array(8, v.into_iter().map(Value::String).collect())
    }

    pub(super) fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            Value::U8(v) => w.write_all(&[*v]),
            Value::I8(v) => w.write_all(&v.to_le_bytes()),
            Value::U16(v) => w.write_all(&v.to_le_bytes()),
            Value::I16(v) => w.write_all(&v.to_le_bytes()),
            Value::U32(v) => w.write_all(&v.to_le_bytes()),
            Value::I32(v) => w.write_all(&v.to_le_bytes()),
            Value::F32(v) => w.write_all(&v.to_le_bytes()),
            Value::Bool(v) => w.write_all(&[*v as u8]),
            Value::String(s) => write_str(w, s),
            Value::Array(t, items) => {
                w.write_all(&t.to_le_bytes())?;
                w.write_all(&(items.len() as u64).to_le_bytes())?;
                for it in items {
                    it.write(w)?;
                }
                Ok(())
            }
            Value::U64(v) => w.write_all(&v.to_le_bytes()),
            Value::I64(v) => w.write_all(&v.to_le_bytes()),
            Value::F64(v) => w.write_all(&v.to_le_bytes()),
        }
    }
}

pub(super) fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}
