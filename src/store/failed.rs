//! Failed and dead-lettered events: what could not be delivered, why, and what happens next.
