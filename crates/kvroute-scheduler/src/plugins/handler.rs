//! Profile handlers.

use crate::{Plugin, Profile, ProfileHandler, SchedulingRequest};

/// Runs the one configured profile (`single-profile-handler`).
#[derive(Debug)]
pub(crate) struct SingleProfileHandler;

impl Plugin for SingleProfileHandler {
    fn type_name(&self) -> &'static str {
        "single-profile-handler"
    }

    fn profile_handler(&self) -> Option<&dyn ProfileHandler> {
        Some(self)
    }
}

impl ProfileHandler for SingleProfileHandler {
    fn profile(&self, _: &SchedulingRequest<'_>, _: &[Profile]) -> usize {
        0
    }
}
