pub mod inject_failure;

pub use self::inject_failure::{Distribution, FailureResponse, InjectFailure};
