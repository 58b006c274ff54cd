//! Error helpers: every error names the parameter (or argument) and what is wrong.
//!
//! The crate reports errors as [`candle_core::Error`] so that it composes with
//! `candle_nn::Optimizer::step`, which returns `candle_core::Result`.

use candle_core::Error;

/// An error about a named parameter or argument: `"<who>: <what>"`.
pub(crate) fn invalid(who: &str, what: impl std::fmt::Display) -> Error {
    Error::Msg(format!("steepest: {who}: {what}"))
}

/// Early-return an [`invalid`] error.
macro_rules! fail {
    ($who:expr, $($fmt:tt)+) => {
        return Err($crate::error::invalid(&$who, format!($($fmt)+)))
    };
}
pub(crate) use fail;
