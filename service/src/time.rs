//! Timestamps as the Azure APIs write them: RFC 3339, UTC, seven fractional digits.

use time::OffsetDateTime;
use time::format_description::FormatItem;
use time::macros::format_description;

const AZURE: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z");

/// `2022-08-31T22:02:50.5163352Z`
pub fn rfc3339(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    // Formatting a UTC date with a fixed description only fails for years beyond 9999.
    at.format(AZURE)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

pub fn now_rfc3339() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

/// A unix time (seconds) in the Azure format; the epoch for out-of-range values.
pub fn rfc3339_of_unix(seconds: u64) -> String {
    let at = i64::try_from(seconds)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    rfc3339(at)
}

/// An RFC 3339 time (any offset, any number of fractional digits), as stored documents and
/// clients write them.
pub fn parse_rfc3339(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

pub fn now_unix() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0)
}

/// Unix milliseconds, now.
pub fn now_unix_ms() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seven_fractional_digits_in_utc() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_661_983_370_516_335_200).unwrap();
        assert_eq!(rfc3339(at), "2022-08-31T22:02:50.5163352Z");
    }
}
