//! `static`: the single hub named on the enrollment (dps-protocol §5.2).
//!
//! The enrollment must name exactly one distinct hub (host names compare case-insensitively);
//! that hub is always chosen if it is a candidate. Naming none, or naming one that is not a
//! healthy linked hub, is [`AllocationError::NoHub`]; naming several is
//! [`AllocationError::Ambiguous`], even if only one of them is currently a candidate, so the
//! outcome does not depend on the health of other hubs.

use crate::{AllocationError, Hub, Request};

/// The hub a static enrollment names.
pub fn allocate<'a>(candidates: &[&'a Hub], request: &Request) -> Result<&'a Hub, AllocationError> {
    let named = request.named_hubs().ok_or(AllocationError::NoHub)?;
    let mut distinct: Vec<&str> = Vec::with_capacity(named.len());
    for name in named {
        if !distinct.iter().any(|d| d.eq_ignore_ascii_case(name)) {
            distinct.push(name);
        }
    }
    let [only] = distinct.as_slice() else {
        return Err(AllocationError::Ambiguous {
            count: distinct.len(),
        });
    };
    candidates
        .iter()
        .copied()
        .find(|hub| hub.name.eq_ignore_ascii_case(only))
        .ok_or(AllocationError::NoHub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Policy, hub};

    #[test]
    fn table() {
        let a = hub("a.example");
        let b = hub("b.example");
        let both = [&a, &b];
        let only_a = [&a];
        let list = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let named_a = list(&["A.Example"]);
        let named_a_twice = list(&["a.example", "A.EXAMPLE"]);
        let named_ab = list(&["a.example", "b.example"]);
        let named_x = list(&["x.example"]);
        let empty: Vec<String> = vec![];
        type Case<'a> = (
            &'a [&'a Hub],
            Option<&'a [String]>,
            Result<&'a str, AllocationError>,
        );
        let cases: Vec<Case> = vec![
            (&only_a, Some(&named_a), Ok("a.example")),
            (&both, Some(&named_a), Ok("a.example")),
            (&only_a, Some(&named_a_twice), Ok("a.example")),
            (
                &both,
                Some(&named_ab),
                Err(AllocationError::Ambiguous { count: 2 }),
            ),
            (
                &only_a,
                Some(&named_ab),
                Err(AllocationError::Ambiguous { count: 2 }),
            ),
            (&both, Some(&named_x), Err(AllocationError::NoHub)),
            (&both, Some(&empty), Err(AllocationError::NoHub)),
            (&both, None, Err(AllocationError::NoHub)),
            (&[], Some(&named_a), Err(AllocationError::NoHub)),
        ];
        for (candidates, enrollment_hubs, expected) in cases {
            let request = Request {
                enrollment_hubs,
                ..Request::new("dev", Policy::Static)
            };
            let got = allocate(candidates, &request).map(|h| h.name.as_str());
            assert_eq!(got, expected, "{enrollment_hubs:?}");
        }
    }
}
