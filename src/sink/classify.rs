//! Sorts failed ClickHouse inserts by what fixes them.
//!
//! - **Content**: ClickHouse refused the data itself (a value it cannot parse or store, a
//!   `throwIf` default). Retrying the same rows fails forever, so the batch is split to
//!   find the rows at fault and only those are set aside.
//! - **Schema**: the table, database, a column or the grant is missing. No row is at
//!   fault and retrying does not help until an operator acts; the sink pauses, reports it
//!   and retries slowly, and resumes by itself when fixed.
//! - **Transient**: everything else (connection refused, timeouts, "too many parts",
//!   overload): retry the same batch with backoff.
//!
//! The codes are ClickHouse's `ErrorCodes` numbers, which are stable across versions
//! (18.16 and 24.x share them).

use crate::sink::SinkError;

/// What kind of failure an insert error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Content,
    Schema,
    Transient,
}

/// Codes meaning "this data cannot be stored".
const CONTENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    36,  // BAD_ARGUMENTS (e.g. a value outside an Enum8)
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
];

/// Codes meaning "the destination is not there or not ours".
const SCHEMA_CODES: &[u32] = &[
    16,  // NO_SUCH_COLUMN_IN_TABLE
    47,  // UNKNOWN_IDENTIFIER
    60,  // UNKNOWN_TABLE
    81,  // UNKNOWN_DATABASE
    164, // READONLY
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

/// Classifies an insert failure, or a failed dedup query before an insert. A dedup
/// query reads no row of the batch, so it is never a content failure: the ledger table
/// missing is a schema failure, anything else an outage.
pub fn classify(err: &SinkError) -> FailureKind {
    match err {
        SinkError::Insert { source, .. } => match server_code(&source.to_string()) {
            Some(code) if CONTENT_CODES.contains(&code) => FailureKind::Content,
            Some(code) if SCHEMA_CODES.contains(&code) => FailureKind::Schema,
            _ => FailureKind::Transient,
        },
        SinkError::Dedup { source, .. } => match server_code(&source.to_string()) {
            Some(code) if SCHEMA_CODES.contains(&code) => FailureKind::Schema,
            _ => FailureKind::Transient,
        },
        _ => FailureKind::Transient,
    }
}

/// The `Code: N` ClickHouse puts at the start of an exception text.
fn server_code(message: &str) -> Option<u32> {
    let start = message.find("Code: ")? + "Code: ".len();
    let digits: String = message[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert_error(text: &str) -> SinkError {
        SinkError::Insert {
            table: "events".into(),
            rows: 1,
            source: clickhouse::error::Error::BadResponse(text.into()),
        }
    }

    #[test]
    fn reads_codes_from_18_16_and_24_messages() {
        assert_eq!(
            server_code("Code: 395, e.displayText() = DB::Exception: Value"),
            Some(395)
        );
        assert_eq!(
            server_code("Code: 60. DB::Exception: Table x doesn't exist"),
            Some(60)
        );
        assert_eq!(server_code("connection refused"), None);
    }

    #[test]
    fn sorts_failures_by_what_fixes_them() {
        let throw_if = insert_error("Code: 395, e.displayText() = DB::Exception: throwIf");
        assert_eq!(classify(&throw_if), FailureKind::Content);
        let missing =
            insert_error("Code: 60, e.displayText() = DB::Exception: Table doesn't exist");
        assert_eq!(classify(&missing), FailureKind::Schema);
        let parts = insert_error("Code: 252, e.displayText() = DB::Exception: Too many parts");
        assert_eq!(classify(&parts), FailureKind::Transient);
        let timeout = SinkError::InsertTimeout {
            table: "events".into(),
            rows: 1,
            timeout_ms: 10,
        };
        assert_eq!(classify(&timeout), FailureKind::Transient);
    }

    #[test]
    fn dedup_queries_fail_as_schema_or_outage_never_content() {
        let dedup = |text: &str| SinkError::Dedup {
            what: "check the ledger",
            partition: 0,
            source: clickhouse::error::Error::BadResponse(text.into()),
        };
        let missing = dedup("Code: 60, e.displayText() = DB::Exception: Table doesn't exist");
        assert_eq!(classify(&missing), FailureKind::Schema);
        let parse = dedup("Code: 6, e.displayText() = DB::Exception: Cannot parse");
        assert_eq!(classify(&parse), FailureKind::Transient);
    }
}
