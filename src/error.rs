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

    /// The same error with `note` appended to what is wrong (a candle
    /// error becomes a [`Error::Device`] error, a non-finite gradient a
    /// [`Error::Numerical`] one: neither has room for a note).
    pub(crate) fn noted(self, note: &str) -> Self {
        match self {
            Self::NonFiniteGradient { param } => Self::Numerical {
                who: param,
                what: format!("gradient contains NaN or Inf; {note}"),
            },
            Self::Shape { who, what } => Self::Shape {
                who,
                what: format!("{what}; {note}"),
            },
            Self::Config { who, what } => Self::Config {
                who,
                what: format!("{what}; {note}"),
            },
            Self::Checkpoint { who, what } => Self::Checkpoint {
                who,
                what: format!("{what}; {note}"),
            },
            Self::Device { who, what } => Self::Device {
                who,
                what: format!("{what}; {note}"),
            },
            Self::Numerical { who, what } => Self::Numerical {
                who,
                what: format!("{what}; {note}"),
            },
            Self::Candle(e) => Self::Device {
                who: "candle".into(),
                what: format!("{e}; {note}"),
            },
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

/// A candle error becomes [`Error::Candle`] — except one that carries a
/// steepest error (made by the conversion below, e.g. by
/// `candle_nn::Optimizer::step` of one of the crate's optimizers), which
/// comes back as that error, with its kind: a round trip through candle
/// keeps the variant you match on. (Not through candle's `.context(…)` or
/// `with_path`, which wrap it further: that stays [`Error::Candle`].)
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::Wrapped(payload) => Carried::decode(&*payload)
                .unwrap_or(Self::Candle(candle_core::Error::Wrapped(payload))),
            candle_core::Error::WithBacktrace { inner, backtrace } => match *inner {
                candle_core::Error::Wrapped(payload) => Carried::decode(&*payload).unwrap_or(
                    Self::Candle(candle_core::Error::WithBacktrace {
                        inner: Box::new(candle_core::Error::Wrapped(payload)),
                        backtrace,
                    }),
                ),
                inner => Self::Candle(candle_core::Error::WithBacktrace {
                    inner: Box::new(inner),
                    backtrace,
                }),
            },
            e => Self::Candle(e),
        }
    }
}

/// A steepest error becomes `candle_core::Error::Wrapped`, displayed as
/// itself; converting it back gives the same error (see above).
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            e => candle_core::Error::Wrapped(Box::new(Carried(e))),
        }
    }
}

/// A steepest error inside `candle_core::Error::Wrapped`, whose box holds a
/// `dyn Display` only (no downcast): `{}` displays the error, and the
/// alternate form `{:#}`, which only [`Carried::decode`] asks for, writes
/// its variant and fields after a marker, to rebuild it on the way back.
struct Carried(Error);

/// Starts `{:#}` of a [`Carried`]; no other type writes it.
const CARRIED: &str = "\u{0}steepest::Error\u{0}";

impl fmt::Display for Carried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !f.alternate() {
            return self.0.fmt(f);
        }
        let (kind, who, what) = match &self.0 {
            Error::NonFiniteGradient { param } => ("NonFiniteGradient", param.as_str(), ""),
            Error::Shape { who, what } => ("Shape", who.as_str(), what.as_str()),
            Error::Config { who, what } => ("Config", who.as_str(), what.as_str()),
            Error::Checkpoint { who, what } => ("Checkpoint", who.as_str(), what.as_str()),
            Error::Device { who, what } => ("Device", who.as_str(), what.as_str()),
            Error::Numerical { who, what } => ("Numerical", who.as_str(), what.as_str()),
            Error::Candle(e) => return e.fmt(f),
        };
        write!(f, "{CARRIED}{}", serde_json::json!([kind, who, what]))
    }
}

impl Carried {
    /// The steepest error `payload` carries, if it is a [`Carried`].
    fn decode(payload: &(dyn fmt::Display + Send + Sync)) -> Option<Error> {
        let text = format!("{payload:#}");
        let json = text.strip_prefix(CARRIED)?;
        let (kind, who, what): (String, String, String) = serde_json::from_str(json).ok()?;
        Some(match kind.as_str() {
            "NonFiniteGradient" => Error::NonFiniteGradient { param: who },
            "Shape" => Error::Shape { who, what },
            "Config" => Error::Config { who, what },
            "Checkpoint" => Error::Checkpoint { who, what },
            "Device" => Error::Device { who, what },
            "Numerical" => Error::Numerical { who, what },
            _ => return None,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<Error> {
        vec![
            Error::NonFiniteGradient {
                param: "h.0.w \"q\"".into(),
            },
            Error::shape("a", "b: ü\n{}"),
            Error::config("lr", "must be ≥ 0"),
            Error::checkpoint("k", "crc"),
            Error::device("d", "cuda"),
            Error::numerical("w", "rank-deficient"),
        ]
    }

    /// Every kind survives a round trip through `candle_core::Error`, plain
    /// or with a backtrace, and displays the same on the candle side.
    #[test]
    fn a_round_trip_through_candle_keeps_the_kind_and_fields() {
        for e in all_kinds() {
            let (debug, shown) = (format!("{e:?}"), e.to_string());
            let c = candle_core::Error::from(e);
            assert_eq!(c.to_string(), shown);
            assert_eq!(format!("{:?}", Error::from(c)), debug);
            let c = candle_core::Error::WithBacktrace {
                inner: Box::new(candle_core::Error::from(
                    all_kinds()
                        .into_iter()
                        .find(|k| format!("{k:?}") == debug)
                        .unwrap(),
                )),
                backtrace: Box::new(std::backtrace::Backtrace::disabled()),
            };
            assert_eq!(format!("{:?}", Error::from(c)), debug);
        }
    }

    /// `who()` names the parameter or key of every kind (a non-finite
    /// gradient's `param` included: data-parallel training finds the plan's
    /// parameter by it) and nothing for candle's own errors.
    #[test]
    fn who_names_the_field_of_every_kind() {
        let expected = ["h.0.w \"q\"", "a", "lr", "k", "d", "w"];
        for (e, want) in all_kinds().iter().zip(expected) {
            assert_eq!(e.who(), Some(want), "{e:?}");
        }
        assert_eq!(
            Error::Candle(candle_core::Error::Msg("x".into())).who(),
            None
        );
    }

    /// `noted` appends the note after `; `, keeping kind and `who`; a
    /// non-finite gradient becomes a numerical error about the same
    /// parameter and a candle error a device error about `candle`.
    #[test]
    fn noted_appends_the_note_and_gives_candle_errors_a_name() {
        match Error::shape("a", "b").noted("n") {
            Error::Shape { who, what } => assert_eq!((who.as_str(), what.as_str()), ("a", "b; n")),
            e => panic!("{e:?}"),
        }
        match (Error::NonFiniteGradient { param: "w".into() }).noted("n") {
            Error::Numerical { who, what } => {
                assert_eq!(who, "w");
                assert!(
                    what.contains("NaN or Inf") && what.ends_with("; n"),
                    "{what}"
                );
            }
            e => panic!("{e:?}"),
        }
        match Error::Candle(candle_core::Error::Msg("boom".into())).noted("n") {
            Error::Device { who, what } => {
                assert_eq!(who, "candle");
                assert_eq!(what, "boom; n");
            }
            e => panic!("{e:?}"),
        }
    }

    /// Other candle errors, wrapped ones included, stay `Error::Candle`;
    /// the alternate form of a steepest error itself has no marker.
    #[test]
    fn other_candle_errors_stay_candle_errors() {
        for c in [
            candle_core::Error::Msg("x".into()),
            candle_core::Error::Wrapped(Box::new("plain text")),
            candle_core::Error::Wrapped(Box::new(format!("{CARRIED}not json"))),
        ] {
            let shown = c.to_string();
            match Error::from(c) {
                Error::Candle(c) => assert_eq!(c.to_string(), shown),
                e => panic!("{e:?}"),
            }
        }
        for e in all_kinds() {
            assert!(!format!("{e:#}").contains(CARRIED));
        }
    }
}
