//! An ordered, named list of transforms: one optimizer's algorithm.

use std::collections::HashSet;

use super::transform::{Stage, Transform};
use crate::error::{fail, Result};

/// Transforms run in order on each group of parameters (see
/// [`transform`](super::transform)). Each has a name, unique in the chain,
/// that keys its state in checkpoints (`<param>.<name>.<field>`); by default
/// the transform's kind.
///
/// ```
/// use steepest::optim::{transform::{Adam, Decay, Retract}, Chain, Manifold};
/// use steepest::WeightDecay;
/// # fn main() -> steepest::Result<()> {
/// // Adam preconditioning, then back onto the spectral sphere ‖W‖₂ = 2.
/// let chain = Chain::new()
///     .then(Decay::new(WeightDecay::None, false)?)
///     .then(Adam::default())
///     .then(Retract::new(Manifold::SpectralSphere { radius: 2.0 })?);
/// assert_eq!(chain.names(), ["decay", "adam", "retract"]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Chain {
    items: Vec<(String, Box<dyn Transform>)>,
}

impl Chain {
    /// An empty chain (plain gradient descent: `w ← w − η·g`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `t`, named by its kind.
    pub fn then(self, t: impl Transform + 'static) -> Self {
        let name = t.kind().to_string();
        self.then_named(name, t)
    }

    /// Appends `t` under `name` (for two transforms of one kind).
    pub fn then_named(mut self, name: impl Into<String>, t: impl Transform + 'static) -> Self {
        self.items.push((name.into(), Box::new(t)));
        self
    }

    /// Appends a boxed transform under `name`.
    pub fn push(&mut self, name: impl Into<String>, t: Box<dyn Transform>) {
        self.items.push((name.into(), t));
    }

    /// The transforms' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.items.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The transforms with their names, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &dyn Transform)> {
        self.items.iter().map(|(n, t)| (n.as_str(), t.as_ref()))
    }

    /// The transform named `name`, and its position.
    pub fn get(&self, name: &str) -> Option<(usize, &dyn Transform)> {
        self.items
            .iter()
            .position(|(n, _)| n == name)
            .map(|k| (k, self.items[k].1.as_ref()))
    }

    pub(crate) fn get_mut(&mut self, k: usize) -> &mut Box<dyn Transform> {
        &mut self.items[k].1
    }

    /// Number of transforms.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the chain is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether some transform can fail after validation.
    pub(crate) fn fallible(&self) -> bool {
        self.items.iter().any(|(_, t)| t.fallible())
    }

    /// Whether every transform after position `k` is `Stage::Post`.
    pub(crate) fn only_post_after(&self, k: usize) -> bool {
        self.items[k + 1..]
            .iter()
            .all(|(_, t)| t.stage() == Stage::Post)
    }

    /// Names unique and usable as key parts; `Post` transforms last; after
    /// a transform that runs the update itself, only `Post` transforms.
    pub(crate) fn validate(&self, who: &str) -> Result<()> {
        let mut seen = HashSet::new();
        let mut post = None;
        let mut updater: Option<&str> = None;
        let mut rank1: Option<&str> = None;
        for (name, t) in &self.items {
            if name.is_empty() || name.contains('.') {
                fail!(
                    Config,
                    who,
                    "transform name `{name}` must be non-empty and contain no `.` (it keys checkpoints)"
                );
            }
            if !seen.insert(name.as_str()) {
                fail!(
                    Config,
                    who,
                    "two transforms are named `{name}`; name one with Chain::then_named"
                );
            }
            if let (Some(u), true) = (updater, t.stage() != Stage::Post) {
                fail!(
                    Config,
                    who,
                    "`{name}` comes after `{u}`, which runs the update itself: only \
                     post-update transforms (retractions) may follow it"
                );
            }
            if t.applies_update() {
                updater = Some(name);
            }
            if t.sets_rank1_decay() {
                if let Some(first) = rank1 {
                    fail!(
                        Config,
                        who,
                        "`{name}` and `{first}` are both spectral decays: a step applies one \
                         rank-1 decay per parameter (the second would replace the first's); \
                         use one Decay with their λ summed"
                    );
                }
                rank1 = Some(name);
            }
            match (t.stage(), post) {
                (Stage::Post, _) => post = Some(name),
                (_, Some(p)) => fail!(
                    Config,
                    who,
                    "`{name}` changes the direction after `{p}`, which acts after the update"
                ),
                _ => {}
            }
        }
        Ok(())
    }
}
