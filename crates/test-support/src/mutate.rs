//! Edits of valid inputs, as a fuzzer makes them, for property tests that must reach a
//! parser's depths: random bytes are refused at the first byte, a valid body with one bit
//! flipped or a token out of place is not. Positions wrap around the input.

use proptest::prelude::*;

/// One edit.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Flip one bit.
    Flip(prop::sample::Index, u8),
    /// Insert bytes: random ones, or one of the format's tokens out of place.
    Insert(prop::sample::Index, Vec<u8>),
    /// Delete up to `n` bytes.
    Delete(prop::sample::Index, usize),
    /// Cut the input short.
    Truncate(prop::sample::Index),
    /// Copy up to `n` bytes from one place to another.
    Splice {
        /// Where the copied bytes start.
        from: prop::sample::Index,
        /// How many.
        n: usize,
        /// Where they go.
        to: prop::sample::Index,
    },
}

/// Any edit; inserted bytes are random or one of `tokens` (the format's own syntax).
pub fn mutation(tokens: &'static [&'static [u8]]) -> impl Strategy<Value = Mutation> {
    let token = prop::sample::select(tokens);
    prop_oneof![
        (any::<prop::sample::Index>(), 0..8u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (
            any::<prop::sample::Index>(),
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 1..4),
                token.prop_map(<[u8]>::to_vec),
            ]
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<prop::sample::Index>(), 1..16usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (
            any::<prop::sample::Index>(),
            1..32usize,
            any::<prop::sample::Index>()
        )
            .prop_map(|(from, n, to)| Mutation::Splice { from, n, to }),
    ]
}

impl Mutation {
    /// Applies the edit to `b`.
    pub fn apply(&self, b: &mut Vec<u8>) {
        let at = |i: &prop::sample::Index| if b.is_empty() { 0 } else { i.index(b.len()) };
        match self {
            Self::Flip(i, bit) if !b.is_empty() => {
                let i = at(i);
                b[i] ^= 1 << bit;
            }
            Self::Flip(..) => {}
            Self::Insert(i, bytes) => {
                let i = at(i);
                b.splice(i..i, bytes.iter().copied());
            }
            Self::Delete(i, n) => {
                let i = at(i);
                b.drain(i..(i + n).min(b.len()));
            }
            Self::Truncate(i) => b.truncate(at(i)),
            Self::Splice { from, n, to } => {
                let from = at(from);
                let piece = b[from..(from + n).min(b.len())].to_vec();
                let to = at(to);
                b.splice(to..to, piece);
            }
        }
    }

    /// `input` with every edit of `edits` applied, in order.
    pub fn apply_all(edits: &[Self], input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for edit in edits {
            edit.apply(&mut out);
        }
        out
    }
}
