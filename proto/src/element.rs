//! Tensor element types: the protocol strings (`"FP32"`), Triton's config enum
//! (`TYPE_FP32`) and byte widths, in one table so that no two crates disagree.

use crate::inference::DataType;

/// The element type of a tensor, as the KServe v2 protocol names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElementType {
    /// `BOOL`, one byte per element.
    Bool,
    /// `UINT8`.
    Uint8,
    /// `UINT16`.
    Uint16,
    /// `UINT32`.
    Uint32,
    /// `UINT64`.
    Uint64,
    /// `INT8`.
    Int8,
    /// `INT16`.
    Int16,
    /// `INT32`.
    Int32,
    /// `INT64`.
    Int64,
    /// `FP16`, IEEE half precision.
    Fp16,
    /// `BF16`, bfloat16.
    Bf16,
    /// `FP32`.
    Fp32,
    /// `FP64`.
    Fp64,
    /// `BYTES`: variable-length elements, each prefixed by a 4-byte little-endian length.
    Bytes,
}

const TABLE: [(ElementType, &str, DataType, Option<usize>); 14] = [
    (ElementType::Bool, "BOOL", DataType::TypeBool, Some(1)),
    (ElementType::Uint8, "UINT8", DataType::TypeUint8, Some(1)),
    (ElementType::Uint16, "UINT16", DataType::TypeUint16, Some(2)),
    (ElementType::Uint32, "UINT32", DataType::TypeUint32, Some(4)),
    (ElementType::Uint64, "UINT64", DataType::TypeUint64, Some(8)),
    (ElementType::Int8, "INT8", DataType::TypeInt8, Some(1)),
    (ElementType::Int16, "INT16", DataType::TypeInt16, Some(2)),
    (ElementType::Int32, "INT32", DataType::TypeInt32, Some(4)),
    (ElementType::Int64, "INT64", DataType::TypeInt64, Some(8)),
    (ElementType::Fp16, "FP16", DataType::TypeFp16, Some(2)),
    (ElementType::Bf16, "BF16", DataType::TypeBf16, Some(2)),
    (ElementType::Fp32, "FP32", DataType::TypeFp32, Some(4)),
    (ElementType::Fp64, "FP64", DataType::TypeFp64, Some(8)),
    (ElementType::Bytes, "BYTES", DataType::TypeString, None),
];

impl ElementType {
    /// Parses the protocol spelling (`"FP32"`); `None` for anything else.
    pub fn from_wire(s: &str) -> Option<Self> {
        TABLE.iter().find(|row| row.1 == s).map(|row| row.0)
    }

    /// Converts Triton's config enum; `None` for `TYPE_INVALID` or an unknown number.
    pub fn from_config(data_type: i32) -> Option<Self> {
        let dt = DataType::try_from(data_type).ok()?;
        TABLE.iter().find(|row| row.2 == dt).map(|row| row.0)
    }

    /// The protocol spelling, for example `"FP32"`.
    pub fn as_str(self) -> &'static str {
        self.row().1
    }

    /// Triton's config enum value.
    pub fn to_config(self) -> DataType {
        self.row().2
    }

    /// Bytes per element; `None` for `BYTES`, whose elements vary in length.
    pub fn byte_size(self) -> Option<usize> {
        self.row().3
    }

    fn row(self) -> &'static (ElementType, &'static str, DataType, Option<usize>) {
        // Invariant: TABLE has one row per variant, in declaration order.
        &TABLE[self as usize]
    }
}

impl std::fmt::Display for ElementType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The number of elements of a tensor of this shape; `None` if a dimension is negative or
/// the product overflows `usize`, so request shapes can never cause a panic or a huge
/// allocation by arithmetic alone.
pub fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d).ok()?;
        acc.checked_mul(d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_are_in_variant_order_and_round_trip() {
        for (i, row) in TABLE.iter().enumerate() {
            assert_eq!(row.0 as usize, i, "{} out of order", row.1);
            assert_eq!(ElementType::from_wire(row.1), Some(row.0));
            assert_eq!(ElementType::from_config(row.2 as i32), Some(row.0));
            assert_eq!(row.0.as_str(), row.1);
        }
        assert_eq!(ElementType::from_wire("fp32"), None);
        assert_eq!(ElementType::from_config(0), None);
    }

    #[test]
    fn element_count_rejects_negative_and_overflow() {
        assert_eq!(element_count(&[2, 64]), Some(128));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[-1, 64]), None);
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
    }
}
