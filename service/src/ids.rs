//! The id rules, in one place: registration ids and enrollment group ids as DPS has them
//! (dps-protocol §1.1), device ids as IoT Hub has them. A DPS enrollment's `deviceId` becomes
//! a hub device id, so it follows the hub's rule.

/// Which id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Registration,
    EnrollmentGroup,
    Device,
}

/// An id that breaks its rule; the message names the id and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidId {
    pub kind: IdKind,
    pub message: String,
}

/// Registration ids (and individual enrollment ids): 1–128 of `A-Za-z0-9 - . _ :`, ending in an
/// alphanumeric or `-`. Case-insensitive (docs/dev/decisions.md 33).
pub fn registration_id(id: &str) -> Result<(), InvalidId> {
    dps_id(id, IdKind::Registration)
}

/// Enrollment group ids follow the registration id rule.
pub fn enrollment_group_id(id: &str) -> Result<(), InvalidId> {
    dps_id(id, IdKind::EnrollmentGroup)
}

fn dps_id(id: &str, kind: IdKind) -> Result<(), InvalidId> {
    const MAX: usize = 128;
    let chars_ok = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'));
    let last_ok = id
        .chars()
        .last()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-');
    if id.is_empty() || id.len() > MAX || !chars_ok || !last_ok {
        return Err(InvalidId {
            kind,
            message: format!(
                "{id:?} must be 1 to {MAX} characters of A-Z a-z 0-9 - . _ : ending in a letter, digit or -"
            ),
        });
    }
    Ok(())
}

/// IoT Hub device ids: up to 128 ASCII letters, digits and `- : . + % _ # * ? ! ( ) , = @ ; $ '`.
/// Case-sensitive.
pub fn device_id(id: &str) -> Result<(), InvalidId> {
    const SPECIAL: &str = "-:.+%_#*?!(),=@;$'";
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || SPECIAL.contains(c));
    if ok {
        Ok(())
    } else {
        Err(InvalidId {
            kind: IdKind::Device,
            message: format!(
                "device id {id:?} must be 1 to 128 ASCII letters, digits or - : . + % _ # * ? ! ( ) , = @ ; $ '"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_ids_follow_dps_rules() {
        for good in ["dev-01", "a", "x.y_z:1", "dev-", &"a".repeat(128)] {
            assert!(registration_id(good).is_ok(), "{good}");
            assert!(enrollment_group_id(good).is_ok(), "{good}");
        }
        for bad in ["", "dev_", "dev.", "a b", "dé", "a/b", &"a".repeat(129)] {
            let error = registration_id(bad).unwrap_err();
            assert_eq!(error.kind, IdKind::Registration, "{bad}");
            assert_eq!(
                enrollment_group_id(bad).unwrap_err().kind,
                IdKind::EnrollmentGroup
            );
        }
    }

    #[test]
    fn device_ids_follow_the_hub_rule() {
        assert!(device_id("dev-1.a+b%c_d#e*f?g!h(i)j,k=l@m$n'o:p;q").is_ok());
        for bad in ["", "a b", "a/b", "dé", "a\nb", &"a".repeat(129)] {
            assert_eq!(device_id(bad).unwrap_err().kind, IdKind::Device, "{bad:?}");
        }
    }
}
