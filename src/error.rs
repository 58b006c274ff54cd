//! The crate's error type: what went wrong, and which parameter or argument.
//!
//! Every fallible function of the crate returns [`Result`]. A caller can match
//! the kind (skip a batch on [`Error::NonFiniteGradient`], stop on
//! [`Error::Checkpoint`]); the message always names the parameter, field or
//! checkpoint key and what is wrong: `steepest: <who>: <what>`.
//!
//! `candle_nn::Optimizer::step` must return a [`candle_core::Error`]; there the
//! error is wrapped (same message). Use the optimizers' `try_step` to keep the
//! typed error. Conversions go both ways, so `?` works in functions returning
//! either type.

use std::fmt;

/// What went wrong. Each variant but [`Error::Candle`] carries `who` (the
/// parameter, config field or checkpoint key) and `what` (a sentence).
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A gradient holds NaN or ±Inf: the step was refused and no parameter or
    /// state changed. `param` names the first such parameter.
    NonFiniteGradient {
        /// The parameter's name.
        param: String,
    },
    /// A tensor's shape, rank or dtype does not fit its use.
    Shape {
        /// The parameter or argument.
        who: String,
        /// What is wrong.
        what: String,
    },
    /// A configuration value is out of range, or a combination makes no
    /// sense; also a learning rate that is not finite or is negative.
    Config {
        /// The config field or argument.
        who: String,
        /// What is wrong.
        what: String,
    },
    /// A checkpoint cannot be loaded: foreign, of an old format, truncated,
    /// corrupted (checksum), or written for other parameters or settings.
    /// Nothing was changed.
    Checkpoint {
        /// The checkpoint key or section.
        who: String,
        /// What is wrong.
        what: String,
    },
    /// The device cannot do this: tensors on different devices, a dtype the
    /// device path does not support, a kernel launch that failed.
    Device {
        /// The parameter or operation.
        who: String,
        /// What is wrong.
        what: String,
    },
    /// A numerical procedure failed (e.g. a retraction of a rank-deficient
    /// matrix). Inside an optimizer step, nothing was changed.
    Numerical {
        /// The parameter or operation.
        who: String,
        /// What is wrong.
        what: String,
    },
    /// An error from candle itself.
    Candle(candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A [`Error::Shape`] error.
    pub fn shape(who: impl Into<String>, what: impl fmt::Display) -> Self {
        Self::Shape {
            who: who.into(),
            what: what.to_string(),
        }
    }

    /// A [`Error::Config`] error.
    pub fn config(who: impl Into<String>, what: impl fmt::Display) -> Self {
        Self::Config {
            who: who.into(),
            what: what.to_string(),
        }
    }

    /// A [`Error::Checkpoint`] error.
    pub fn checkpoint(who: impl Into<String>, what: impl fmt::Display) -> Self {
        Self::Checkpoint {
            who: who.into(),
            what: what.to_string(),
        }
    }

    /// A [`Error::Device`] error.
    pub fn device(who: impl Into<String>, what: impl fmt::Display) -> Self {
        Self::Device {
            who: who.into(),
            what: what.to_string(),
        }
    }

    /// A [`Error::Numerical`] error.
    pub fn numerical(who: impl Into<String>, what: impl fmt::Display) -> Self {
        Self::Numerical {
            who: who.into(),
            what: what.to_string(),
        }
    }

    /// The parameter, field or key the error is about (`None` for candle's own errors).
    pub fn who(&self) -> Option<&str> {
        match self {
            Self::NonFiniteGradient { param } => Some(param),
            Self::Shape { who, .. }
            | Self::Config { who, .. }
            | Self::Checkpoint { who, .. }
            | Self::Device { who, .. }
            | Self::Numerical { who, .. } => Some(who),
            Self::Candle(_) => None,
        }
    }

    /// The same error reported for `new_who` (the parameter a generic
    /// routine ran on), keeping the routine's name in the message.
    pub(crate) fn about(self, new_who: &str) -> Self {
        let re = |who: String, what: String| (new_who.to_string(), format!("{who}: {what}"));
        match self {
            Self::Shape { who, what } => {
                let (who, what) = re(who, what);
                Self::Shape { who, what }
            }
            Self::Config { who, what } => {
                let (who, what) = re(who, what);
                Self::Config { who, what }
            }
            Self::Checkpoint { who, what } => {
                let (who, what) = re(who, what);
                Self::Checkpoint { who, what }
            }
            Self::Device { who, what } => {
                let (who, what) = re(who, what);
                Self::Device { who, what }
            }
            Self::Numerical { who, what } => {
                let (who, what) = re(who, what);
                Self::Numerical { who, what }
            }
            e => e,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NonFiniteGradient { param } => write!(
                f,
                "steepest: {param}: gradient contains NaN or Inf; the step was not applied \
                 (no parameter or state changed)"
            ),
            Self::Shape { who, what }
            | Self::Config { who, what }
            | Self::Checkpoint { who, what }
            | Self::Device { who, what }
            | Self::Numerical { who, what } => write!(f, "steepest: {who}: {what}"),
            Self::Candle(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Candle(e) => Some(e),
            _ => None,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(e)
    }
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            e => candle_core::Error::Wrapped(Box::new(e)),
        }
    }
}

/// Early-return an error of the given kind: `fail!(Config, "AdamWConfig.lr", "must be …, got {x}")`.
macro_rules! fail {
    ($kind:ident, $who:expr, $($fmt:tt)+) => {
        return Err($crate::error::Error::$kind {
            who: ::std::string::ToString::to_string(&$who),
            what: format!($($fmt)+),
        })
    };
}
pub(crate) use fail;
