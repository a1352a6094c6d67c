//! Enrollments and enrollment groups, as the service works with them.
//!
//! [`Enrollment`] is parsed once from the stored JSON, which is DPS's service-API shape with
//! the secrets kept (the HTTP layer's `http::enrollments::input` checks a PUT body and writes
//! it). Reads, queries and the allocation webhook see [`Enrollment::without_secrets`].

mod model;

pub use model::*;

/// Which of the two enrollment resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Individual,
    Group,
}

impl Kind {
    pub fn id_field(self) -> &'static str {
        match self {
            Kind::Individual => "registrationId",
            Kind::Group => "enrollmentGroupId",
        }
    }
}
